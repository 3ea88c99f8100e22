"""Stored stage embeddings: computed once per recording and settings, then reused unchanged;
a result of another recording is refused, never silently overwritten."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from attribution.record import SIGN_CONVENTION
from attribution.record.errors import TrajectoryError
from attribution.record.pipeline import run_pipeline
from attribution.record.spec import PipelineSpec
from attribution.record.trajectory import Trajectory
from estimators import E1, StageEmbeddings, stored_embeddings
from tests.attribution import tiny
from tests.helpers import check_message, tree_bytes


class CountingE1(E1):
    """E1 that counts how often it really computes (same name and settings as E1)."""

    calls = 0

    def offsets(self, traj: Trajectory, counts: dict[str, int]) -> dict[str, Any]:
        type(self).calls += 1
        return super().offsets(traj, counts)


class TunedE1(E1):
    """E1 with other settings: its embeddings must be stored apart from E1's."""

    def settings(self) -> dict[str, Any]:
        return {"variant": "tuned", "steps": 3}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("storage") / "run"
    run_pipeline(PipelineSpec.from_dict(tiny.three_stage()), root)
    return root


@pytest.fixture
def run(recorded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(recorded, tmp_path / "run"))


def folders(run: Path) -> list[Path]:
    return sorted(p for p in (run / "embeddings").iterdir() if p.is_dir())


def assert_same_embeddings(a: StageEmbeddings, b: StageEmbeddings) -> None:
    assert (a.estimator, dict(a.settings), a.seconds, dict(a.counts)) == (
        b.estimator,
        dict(b.settings),
        b.seconds,
        dict(b.counts),
    )
    assert a.sign_convention == b.sign_convention == SIGN_CONVENTION
    assert list(a.offsets) == list(b.offsets)
    for stage in a.offsets:
        assert set(a.offsets[stage]) == set(b.offsets[stage]), stage
        for name, value in a.offsets[stage].items():
            other = b.offsets[stage][name]
            assert value.dtype == other.dtype and torch.equal(value, other), (stage, name)


def test_embeddings_are_computed_once_then_reused_unchanged(run):
    CountingE1.calls = 0
    first, reused = stored_embeddings(CountingE1(), Trajectory.open(run))
    assert reused is False and CountingE1.calls == 1
    assert first.estimator == "e1" and first.seconds >= 0
    after_first = tree_bytes(run)

    second, reused = stored_embeddings(CountingE1(), Trajectory.open(run))
    assert reused is True and CountingE1.calls == 1  # nothing recomputed
    assert_same_embeddings(first, second)
    assert tree_bytes(run) == after_first  # reuse writes nothing

    # A plain E1 has the same name and settings: it finds the same stored result.
    third, reused = stored_embeddings(E1(), Trajectory.open(run))
    assert reused is True
    assert_same_embeddings(first, third)


def test_stored_folder_holds_the_offsets_and_their_metadata(run):
    traj = Trajectory.open(run)
    result, _ = stored_embeddings(E1(), traj)
    (folder,) = folders(run)
    assert folder.parent.name == "embeddings" and folder.name.startswith("e1-")
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "offsets.safetensors"]

    meta = json.loads((folder / "meta.json").read_text())
    assert meta["sign_convention"] == SIGN_CONVENTION
    assert meta["schema"] == "stagetrace.embeddings"
    assert meta["estimator"] == "e1" and meta["settings"] == {}
    assert meta["stages"] == traj.names == ["pretrain", "finetune", "adapt"]
    assert meta["seconds"] == result.seconds and meta["counts"] == dict(result.counts)
    assert meta["trajectory_fingerprint"] == traj.fingerprint()

    stored = load_file(folder / "offsets.safetensors")
    expected = {f"{s}/{n}": v for s, offset in result.offsets.items() for n, v in offset.items()}
    assert set(stored) == set(expected)
    for key, value in expected.items():
        assert torch.equal(stored[key], value), key


def test_other_settings_are_stored_in_a_new_folder_leaving_the_first_untouched(run):
    base, _ = stored_embeddings(E1(), Trajectory.open(run))
    (first,) = folders(run)
    first_bytes = tree_bytes(first)

    tuned, reused = stored_embeddings(TunedE1(), Trajectory.open(run))
    assert reused is False
    assert dict(tuned.settings) == {"variant": "tuned", "steps": 3}
    after = folders(run)
    assert len(after) == 2 and first in after
    (second,) = [f for f in after if f != first]
    assert second.name.startswith("e1-") and second.name != first.name
    assert tree_bytes(first) == first_bytes  # byte-identical
    assert json.loads((second / "meta.json").read_text())["settings"] == {
        "variant": "tuned",
        "steps": 3,
    }

    # Each setting finds its own folder again.
    again, reused = stored_embeddings(TunedE1(), Trajectory.open(run))
    assert reused is True and dict(again.settings) == dict(tuned.settings)
    plain, reused = stored_embeddings(E1(), Trajectory.open(run))
    assert reused is True
    assert_same_embeddings(base, plain)


def test_embeddings_of_another_recording_are_refused_and_left_alone(run):
    stored_embeddings(E1(), Trajectory.open(run))
    (folder,) = folders(run)
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["trajectory_fingerprint"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    before = tree_bytes(run)

    with pytest.raises(TrajectoryError) as info:
        stored_embeddings(E1(), Trajectory.open(run))
    check_message(info.value, str(meta_path), "trajectory_fingerprint", f"delete {folder}")
    assert info.value.field == "trajectory_fingerprint"
    assert tree_bytes(run) == before


def test_in_memory_trajectories_store_and_reuse_embeddings_too():
    traj = run_pipeline(PipelineSpec.from_dict(tiny.three_stage()), None)
    assert traj.root is None
    first, reused = stored_embeddings(E1(), traj)
    assert reused is False
    names = sorted(n for n in traj.store.blobs if n.startswith("embeddings/"))
    assert len(names) == 2 and names[0].startswith("embeddings/e1-")
    assert [n.rsplit("/", 1)[1] for n in names] == ["meta.json", "offsets.safetensors"]
    assert json.loads(traj.store.blobs[names[0]])["sign_convention"] == SIGN_CONVENTION

    second, reused = stored_embeddings(E1(), traj)
    assert reused is True
    assert_same_embeddings(first, second)

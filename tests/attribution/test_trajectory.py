"""Manifest and spec round trips, and what the manifest promises to its readers."""

import json

import pytest

from attribution.record import SIGN_CONVENTION
from attribution.record.errors import SpecError, TrajectoryError
from attribution.record.pipeline import replay, run_pipeline
from attribution.record.spec import PipelineSpec
from attribution.record.trajectory import SCHEMA_VERSION, StageRecord, Trajectory
from tests.attribution import tiny


def test_pipeline_spec_round_trips_through_its_dict():
    spec = PipelineSpec.from_dict(tiny.three_stage("carry"))
    assert PipelineSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_manifest_round_trip_keeps_every_stage_record(tmp_path):
    traj = run_pipeline(PipelineSpec.from_dict(tiny.three_stage("carry")), tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["sign_convention"] == SIGN_CONVENTION
    assert manifest["complete"] is True
    for record, entry in zip(traj.stages, manifest["stages"], strict=True):
        assert StageRecord.from_dict(entry, "manifest.json", "stage") == record
        assert set(entry["files"]) == {"start", "end", "optimizer_start", "optimizer_end", "steps"}
    reopened = Trajectory.open(tmp_path / "run")
    assert reopened.stages == traj.stages
    assert reopened.fingerprint() == traj.fingerprint()
    adapt = reopened.stages[2]
    assert adapt.entry[0].kind == "add_lora" and adapt.trainable == (
        "fc1.lora_A",
        "fc1.lora_B",
        "head.weight",
        "head.bias",
    )


def test_a_hydra_run_directory_opens_its_trajectory(tmp_path):
    run_pipeline(PipelineSpec.from_dict(tiny.three_stage()), tmp_path / "trajectory")
    assert Trajectory.open(tmp_path).names == ["pretrain", "finetune", "adapt"]


def test_files_are_readable_by_others_like_any_output(tmp_path):
    run_pipeline(PipelineSpec.from_dict(tiny.three_stage()), tmp_path / "run")
    modes = {p.stat().st_mode & 0o777 for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert modes == {0o644}


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("entry", [{"kind": "bogus", "modules": ["head"]}], r"stages\[1\]\.entry\[0\]\.kind"),
        ("name", "../escape", r"stages\[1\]\.name"),
    ],
)
def test_manifest_fields_are_validated_on_open(tmp_path, field, value, message):
    run_pipeline(PipelineSpec.from_dict(tiny.three_stage()), tmp_path / "run")
    path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["stages"][1][field] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(TrajectoryError, match=message):
        Trajectory.open(tmp_path / "run")


def test_file_paths_must_stay_inside_the_trajectory(tmp_path):
    run_pipeline(PipelineSpec.from_dict(tiny.three_stage()), tmp_path / "run")
    path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["stages"][0]["files"]["end"]["path"] = "../outside.safetensors"
    path.write_text(json.dumps(manifest))
    with pytest.raises(TrajectoryError, match="inside the trajectory"):
        Trajectory.open(tmp_path / "run")


def test_unsafe_stage_names_are_refused_before_anything_runs():
    cfg = tiny.config(**{"a/b": tiny.stage("pretrain", 1, tiny.SGD_MOMENTUM, 0.05)})
    with pytest.raises(SpecError, match="folder name"):
        PipelineSpec.from_dict(cfg)


def test_a_manifest_without_the_newer_stage_fields_opens_as_unclipped_and_unchecked(tmp_path):
    """Manifests written before ``clip_grad_norm`` and ``verified`` existed: no clipping, not
    checked (so not refused). Shown on a run that did clip its second stage: stripped of the
    field, its replay no longer reaches the recorded end of that stage, while the first is exact.
    """
    cfg = tiny.config(
        a=tiny.stage("pretrain", 1, tiny.SGD_MOMENTUM, 0.05),
        b=tiny.stage("finetune", 2, tiny.ADAMW, 1e-3, clip_grad_norm=0.05),
    )
    run_pipeline(PipelineSpec.from_dict(cfg), tmp_path / "run")
    path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert [s.get("clip_grad_norm") for s in manifest["stages"]] == [None, 0.05]
    assert [s["verified"] for s in manifest["stages"]] == [True, True]
    for stage in manifest["stages"]:
        stage.pop("clip_grad_norm", None)
        stage.pop("verified")
    path.write_text(json.dumps(manifest))
    traj = Trajectory.open(tmp_path / "run")
    assert [(s.clip_grad_norm, s.verified, s.verification) for s in traj.stages] == [
        (None, None, None)
    ] * 2
    diffs = replay(traj)
    assert (diffs[0].end, diffs[1].start) == (0.0, 0.0) and diffs[1].end > 0

"""Checkpoints inside a stage (``checkpoint_every``), and datasets that carry group ids.

Truths used: a hand-written torch.optim loop over the recorded batches and rates, an
uninterrupted run, and a plain ``TensorDataset(inputs, labels)`` of the same rows.
"""

import hashlib
import json

import pytest
import torch
from torch.utils.data import TensorDataset

from attribution.record.counterfactual import skip_stage
from attribution.record.errors import SpecError, StagetraceError, TrajectoryError
from attribution.record.pipeline import replay, run_pipeline
from attribution.record.spec import PipelineSpec
from attribution.record.trajectory import Trajectory
from experiments.data import mnist
from experiments.models import MLP
from tests.attribution import tiny


def run(cfg, root=None, **kwargs):
    return run_pipeline(PipelineSpec.from_dict(cfg), root, **kwargs)


def three_stage(**every):
    """``tiny.three_stage`` with ``checkpoint_every`` set per stage name."""
    cfg = tiny.three_stage()
    for name, n in every.items():
        cfg["stages"][name]["checkpoint_every"] = n
    return cfg


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def edit_manifest(root, change):
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_inner_checkpoints_are_the_states_of_a_hand_written_torch_loop(tmp_path):
    cosine = {"name": "cosine"}
    cfg = tiny.config(
        only=tiny.stage(
            "pretrain", 5, tiny.SGD_MOMENTUM, 0.05, steps=7, checkpoint_every=3, schedule=cosine
        )
    )
    traj = run(cfg, tmp_path / "run")
    torch.manual_seed(0)
    model = MLP(hidden=[16])
    hyper = {k: v for k, v in tiny.SGD_MOMENTUM.items() if k != "type"}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, **hyper)
    x, y = mnist(stop=600).tensors
    log = traj.steps("only")
    hand = {}
    for t in range(7):
        hand[t] = {k: v.clone() for k, v in model.state_dict().items()}
        opt.param_groups[0]["lr"] = float(log.lr[t, 0])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[log.batch(t)]), y[log.batch(t)]).backward()
        opt.step()
    reopened = Trajectory.open(tmp_path / "run")
    assert reopened.stages[0].checkpoint_every == 3
    assert reopened.inner_steps("only") == [3, 6]
    for t in (3, 6):
        saved = reopened.inner_checkpoint("only", t)
        assert set(saved) == set(hand[t])
        assert all(torch.equal(saved[k], hand[t][k]) for k in saved), t


def test_the_manifest_lists_each_file_with_its_checksum(tmp_path):
    run(three_stage(pretrain=2, adapt=6), tmp_path / "run")
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    pretrain, finetune, adapt = manifest["stages"]
    assert pretrain["checkpoint_every"] == 2
    assert [c["step"] for c in pretrain["inner_checkpoints"]] == [2, 4]
    assert "checkpoint_every" not in finetune and "inner_checkpoints" not in finetune
    assert adapt["checkpoint_every"] == 6 and adapt["inner_checkpoints"] == []  # 6 steps
    for saved in pretrain["inner_checkpoints"]:
        assert saved["path"] == f"stages/00-pretrain/inner/step-{saved['step']:06d}.safetensors"
        data = (tmp_path / "run" / saved["path"]).read_bytes()
        assert saved["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_damaged_or_missing_inner_checkpoint_is_named(tmp_path):
    run(three_stage(pretrain=2), tmp_path / "run")
    path = tmp_path / "run/stages/00-pretrain/inner/step-000004.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b" ")
    traj = Trajectory.open(tmp_path / "run")
    with pytest.raises(TrajectoryError, match=r"step-000004\.safetensors: contents do not match"):
        traj.inner_checkpoint("pretrain", 4)
    path.unlink()
    with pytest.raises(TrajectoryError, match=r"step-000004.*\(state before step 4\) is missing"):
        Trajectory.open(tmp_path / "run")


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda s: s["inner_checkpoints"].reverse(), "inner_checkpoints[1].step"),
        (lambda s: s["inner_checkpoints"][1].update(step=6), "inner_checkpoints[1].step"),
        (lambda s: s["inner_checkpoints"][0].pop("sha256"), "inner_checkpoints[0].sha256"),
        (lambda s: s["inner_checkpoints"][0].update(path="../x"), "inner_checkpoints[0].path"),
        (lambda s: s.update(checkpoint_every=0), "checkpoint_every"),
        (lambda s: s.update(inner_checkpoints={}), "inner_checkpoints"),
    ],
    ids=["unordered", "past-the-end", "no-checksum", "outside", "every-0", "not-a-list"],
)
def test_bad_inner_checkpoint_entries_are_refused_naming_the_field(tmp_path, change, field):
    run(three_stage(pretrain=2), tmp_path / "run")
    edit_manifest(tmp_path / "run", lambda m: change(m["stages"][0]))
    with pytest.raises(TrajectoryError) as info:
        Trajectory.open(tmp_path / "run")
    assert info.value.field == f"stages[0].{field}"
    assert "Fix:" in str(info.value)


def test_an_unknown_step_names_the_saved_ones(recorded_run):
    traj = run(three_stage(pretrain=2))
    with pytest.raises(StagetraceError, match=r"before step 3\. Fix: use one of .* \[2, 4\]"):
        traj.inner_checkpoint("pretrain", 3)
    with pytest.raises(StagetraceError, match="Fix: record the stage with checkpoint_every"):
        traj.inner_checkpoint("finetune", 2)
    old = Trajectory.open(recorded_run)
    assert [old.inner_steps(name) for name in old.names] == [[], [], []]


def test_a_manifest_without_the_fields_opens_with_no_inner_checkpoints(tmp_path):
    run(three_stage(pretrain=2, adapt=1), tmp_path / "run")

    def strip(manifest):
        for stage in manifest["stages"]:
            stage.pop("checkpoint_every", None)
            stage.pop("inner_checkpoints", None)

    edit_manifest(tmp_path / "run", strip)
    traj = Trajectory.open(tmp_path / "run")
    assert [traj.inner_steps(n) for n in traj.names] == [[], [], []]
    assert all(record.checkpoint_every is None for record in traj.stages)
    assert [d.worst for d in replay(traj)] == [0.0, 0.0, 0.0]


def test_replays_and_counterfactuals_write_nothing_into_the_record(tmp_path):
    traj = run(three_stage(pretrain=2, finetune=1, adapt=3), tmp_path / "run")
    before = files(tmp_path / "run")
    assert [d.worst for d in replay(traj)] == [0.0, 0.0, 0.0]
    skip_stage(traj, "pretrain")
    after = files(tmp_path / "run")
    added = sorted(set(after) - set(before))
    assert all(name.startswith("counterfactuals/skip-pretrain/") for name in added), added
    assert {name: after[name] for name in before} == before


class Interrupt(Exception):
    pass


def test_an_interrupted_run_with_inner_checkpoints_resumes_to_the_same_bits(tmp_path):
    cfg = three_stage(pretrain=2, adapt=1)

    def stop_in_adapt(stage, t, total, loss):
        if stage == "adapt" and t == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(cfg, tmp_path / "run", on_step=stop_in_adapt)
    assert Trajectory.open(tmp_path / "run").names == ["pretrain", "finetune"]
    resumed = run(cfg, tmp_path / "run")
    uninterrupted = run(cfg)
    assert resumed.complete
    for name in resumed.names:
        assert resumed.inner_steps(name) == uninterrupted.inner_steps(name)
        for t in resumed.inner_steps(name):
            a, b = resumed.inner_checkpoint(name, t), uninterrupted.inner_checkpoint(name, t)
            assert all(torch.equal(a[k], b[k]) for k in b), (name, t)
        a, b = resumed.checkpoint(name, "end"), uninterrupted.checkpoint(name, "end")
        assert all(torch.equal(a[k], b[k]) for k in b), name
    assert resumed.inner_steps("adapt") == [1, 2, 3, 4, 5]
    assert [d.worst for d in replay(resumed)] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("value", [0, -2, 1.5, "3", True])
def test_a_bad_checkpoint_every_is_refused_before_training(value):
    with pytest.raises(SpecError) as info:
        PipelineSpec.from_dict(three_stage(finetune=value))
    assert info.value.field == "pipeline.stages.finetune.checkpoint_every"
    assert "Fix:" in str(info.value)


def with_groups(stop: int = 600) -> TensorDataset:
    """The tiny MNIST rows with a third tensor of group ids."""
    x, y = mnist(stop=stop).tensors
    return TensorDataset(x, y, y % 3)


def as_rows(stop: int = 600) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The same rows as a plain list of (input, label, group) tuples."""
    return list(zip(*with_groups(stop).tensors, strict=True))


@pytest.mark.parametrize("target", ["with_groups", "as_rows"])
def test_group_ids_in_the_data_change_nothing_in_training(target):
    plain = run(tiny.three_stage())
    cfg = tiny.three_stage()
    for stage in cfg["stages"].values():
        stage["data"]["target"] = f"tests.attribution.test_inner_checkpoints:{target}"
    grouped = run(cfg)
    for name in plain.names:
        a, b = grouped.checkpoint(name, "end"), plain.checkpoint(name, "end")
        assert all(torch.equal(a[k], b[k]) for k in b), name
    assert [d.worst for d in replay(grouped)] == [0.0, 0.0, 0.0]
    assert torch.equal(
        skip_stage(grouped, "pretrain").state["head.weight"],
        skip_stage(plain, "pretrain").state["head.weight"],
    )

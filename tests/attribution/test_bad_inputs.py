"""Bad input fails loudly and early: the right error type, a message that names the offending
file, field or stage and says how to fix it, and a recorded run left byte-for-byte untouched."""

from __future__ import annotations

import json
import math
import re

import pytest
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from attribution.record.counterfactual import skip_stage
from attribution.record.errors import (
    SpecError,
    StagetraceError,
    TrainingError,
    TrajectoryError,
    UnknownStageError,
)
from attribution.record.pipeline import run_pipeline
from attribution.record.spec import PipelineSpec
from attribution.record.trajectory import Trajectory
from tests.helpers import (
    PRETRAIN_END,
    check_cli_error,
    check_message,
    cli,
    edit_manifest,
    manifest,
    set_sha256,
    tree_bytes,
)

FINETUNE_END = "stages/01-finetune/end.safetensors"
STAGE_NAMES = ("pretrain", "finetune", "adapt")


# 1. A missing checkpoint file.


def test_missing_checkpoint_is_named_when_opening(run_copy, capsys):
    (run_copy / FINETUNE_END).unlink()
    before = tree_bytes(run_copy)

    with pytest.raises(TrajectoryError) as info:
        Trajectory.open(run_copy)
    check_message(info.value, str(run_copy / FINETUNE_END), "finetune", "missing")
    assert info.value.path == run_copy / FINETUNE_END

    code, out, err = cli(capsys, "replay", run_copy, "--verify")
    assert (code, out) == (2, "")
    check_cli_error(err, FINETUNE_END)
    assert tree_bytes(run_copy) == before


# 2. A truncated safetensors file.


def test_truncated_checkpoint_fails_its_checksum(run_copy, capsys):
    path = run_copy / PRETRAIN_END
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = tree_bytes(run_copy)

    traj = Trajectory.open(run_copy)  # opening checks presence, not contents
    with pytest.raises(TrajectoryError) as info:
        traj.checkpoint("pretrain", "end")
    check_message(info.value, str(path), "checksum")
    with pytest.raises(TrajectoryError):
        traj.load_model("pretrain", "end")

    for argv in (("replay", run_copy), ("replay", run_copy, "--verify")):
        code, out, err = cli(capsys, *argv)
        assert (code, out) == (2, "")
        check_cli_error(err, PRETRAIN_END)
    assert tree_bytes(run_copy) == before


def test_truncated_checkpoint_with_a_matching_checksum_is_unreadable(run_copy):
    path = run_copy / PRETRAIN_END
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    set_sha256(run_copy, 0, "end")
    before = tree_bytes(run_copy)

    with pytest.raises(TrajectoryError) as info:
        Trajectory.open(run_copy).checkpoint("pretrain", "end")
    check_message(info.value, str(path), "not a readable safetensors file")
    assert tree_bytes(run_copy) == before


# 3. A manifest of an unknown schema version.


def test_unknown_schema_version_is_refused(run_copy, capsys):
    edit_manifest(run_copy, lambda m: m.update(schema_version=99))
    before = tree_bytes(run_copy)

    with pytest.raises(TrajectoryError) as info:
        Trajectory.open(run_copy)
    message = check_message(info.value, "manifest.json", "schema_version")
    assert info.value.field == "schema_version"
    assert re.search(r"schema_version 99 is not supported", message), message

    code, _, err = cli(capsys, "inspect", run_copy)
    assert code == 2
    check_cli_error(err, "schema_version", "99")
    assert tree_bytes(run_copy) == before


# 4. A manifest damaged in one field.


@pytest.mark.parametrize(
    ("field", "damage"),
    [
        ("stages[1].num_steps", lambda m: m["stages"][1].update(num_steps=0)),
        ("stages[1].optimizer.type", lambda m: m["stages"][1]["optimizer"].update(type="rmsprop")),
        ("stages[2].kind", lambda m: m["stages"][2].update(kind="distill")),
        ("stages[0].files.end", lambda m: m["stages"][0]["files"].pop("end")),
        ("stages[2].optimizer_policy", lambda m: m["stages"][2].update(optimizer_policy="keep")),
        ("stages[1].clip_grad_norm", lambda m: m["stages"][1].update(clip_grad_norm=-1)),
        ("stages[1].verified", lambda m: m["stages"][1].update(verified="yes")),
        (
            "stages[1].verification.steps",
            lambda m: m["stages"][1].update(verification={"step": 0}),
        ),
    ],
)
def test_damaged_manifest_field_is_named(run_copy, capsys, field, damage):
    edit_manifest(run_copy, damage)
    before = tree_bytes(run_copy)

    with pytest.raises(TrajectoryError) as info:
        Trajectory.open(run_copy)
    check_message(info.value, str(run_copy / "manifest.json"), f"(field {field})")
    assert info.value.field == field

    code, _, err = cli(capsys, "replay", run_copy, "--verify")
    assert code == 2
    check_cli_error(err, field)
    assert tree_bytes(run_copy) == before


def test_manifest_that_is_not_json_is_named(run_copy):
    (run_copy / "manifest.json").write_text('{"schema": "stagetrace.trajectory",')
    before = tree_bytes(run_copy)
    with pytest.raises(TrajectoryError) as info:
        Trajectory.open(run_copy)
    check_message(info.value, str(run_copy / "manifest.json"), "not valid JSON")
    assert tree_bytes(run_copy) == before


# 5. An unknown stage name.


def test_skipping_an_unknown_stage_lists_the_real_ones(run_copy, capsys):
    before = tree_bytes(run_copy)

    with pytest.raises(UnknownStageError) as info:
        skip_stage(Trajectory.open(run_copy), "nope")
    check_message(info.value, "'nope'", "pretrain, finetune, adapt")

    code, out, err = cli(capsys, "counterfactual", run_copy, "--skip", "nope")
    assert (code, out) == (2, "")
    check_cli_error(err, "'nope'", "pretrain, finetune, adapt")
    assert not (run_copy / "counterfactuals" / "skip-nope").exists()
    assert tree_bytes(run_copy) == before


# 6. A declared stage with zero steps.


@pytest.mark.parametrize(("stage", "length"), [("finetune", "steps"), ("pretrain", "epochs")])
def test_stage_that_never_trains_is_refused_before_anything_is_written(
    tiny_config, tmp_path, stage, length
):
    cfg = tiny_config(**{stage: {"steps": None, length: 0}})
    with pytest.raises(SpecError) as info:
        PipelineSpec.from_dict(cfg)
    check_message(info.value, f"pipeline.stages.{stage}.{length}", "at least once")
    assert info.value.field == f"pipeline.stages.{stage}.{length}"
    assert not (tmp_path / "run").exists()


# 7. Other declaration errors.


@pytest.mark.parametrize(
    ("overrides", "field", "named"),
    [
        ({"pretrain": {"optimizer": {"type": "rmsprop"}}}, "pretrain.optimizer.type", "rmsprop"),
        ({"pretrain": {"optimizer_policy": "carry"}}, "pretrain.optimizer_policy", "first stage"),
        (
            {"finetune": {"optimizer_policy": "carry"}},
            "finetune.optimizer_policy",
            "cannot carry sgd state",
        ),
        ({"adapt": {"optimizer_policy": "keep"}}, "adapt.optimizer_policy", "'keep'"),
        ({"adapt": {"kind": "distill"}}, "adapt.kind", "'distill'"),
        ({"finetune": {"lr": -1.0}}, "finetune.optimizer.lr", "-1.0"),
        ({"pretrain": {"optimizer": {"type": "sgd", "betas": [0.9, 0.99]}}}, "pretrain", "betas"),
        (
            {"finetune": {"entry": [{"kind": "prune", "modules": ["head"]}]}},
            "finetune.entry[0].kind",
            "prune",
        ),
        ({"adapt": {"batch_size": 0}}, "adapt.batch_size", "got 0"),
        ({"finetune": {"clip_grad_norm": 0}}, "finetune.clip_grad_norm", "got 0"),
        ({"finetune": {"clip_grad_norm": -1.0}}, "finetune.clip_grad_norm", "got -1.0"),
        ({"finetune": {"clip_grad_norm": "1"}}, "finetune.clip_grad_norm", "got '1'"),
        ({"finetune": {"clip_grad_norm": True}}, "finetune.clip_grad_norm", "got True"),
        ({"finetune": {"clip_grad_norm": math.inf}}, "finetune.clip_grad_norm", "got inf"),
    ],
)
def test_invalid_declaration_is_a_spec_error_naming_the_field(tiny_config, overrides, field, named):
    with pytest.raises(SpecError) as info:
        PipelineSpec.from_dict(tiny_config(**overrides))
    check_message(info.value, f"pipeline.stages.{field}", named)


@pytest.mark.parametrize(
    "stage,settings,named",
    [
        ("pretrain", {"trainable": ["encoder.*"]}, ("'encoder.*'", "fc1.weight")),
        ("adapt", {"trainable": ["*.lora_C"]}, ("'*.lora_C'", "fc1.lora_A")),
    ],
)
def test_trainable_pattern_matching_nothing_is_refused_before_any_stage_trains(
    tiny_config, tmp_path, stage, settings, named
):
    # Parameter names exist only once the model is built: run_pipeline resolves every stage
    # against a throwaway model first, so even a late stage's typo costs no training.
    spec = PipelineSpec.from_dict(tiny_config(**{stage: settings}))
    root = tmp_path / "run"
    with pytest.raises(SpecError) as info:
        run_pipeline(spec, root)
    check_message(info.value, f"pipeline.stages.{stage}.trainable", *named)
    assert info.value.field == f"pipeline.stages.{stage}.trainable"
    assert not root.exists()


@pytest.mark.parametrize(
    "stage,action,module",
    [
        ("adapt", {"kind": "add_lora", "modules": ["fc9"]}, "'fc9'"),
        ("pretrain", {"kind": "reinit", "modules": ["decoder"]}, "'decoder'"),
    ],
)
def test_entry_action_on_a_missing_module_is_refused_before_any_stage_trains(
    tiny_config, tmp_path, stage, action, module
):
    spec = PipelineSpec.from_dict(tiny_config(**{stage: {"entry": [action]}}))
    root = tmp_path / "run"
    with pytest.raises(SpecError) as info:
        run_pipeline(spec, root)
    check_message(info.value, stage, "entry[0].modules", module, "fc1, head")
    assert not root.exists()


def test_a_run_whose_first_stage_failed_can_be_recorded_again_corrected(tiny_config, tmp_path):
    root = tmp_path / "run"
    with pytest.raises(TrainingError):
        run_pipeline(PipelineSpec.from_dict(tiny_config(pretrain={"lr": 1e6})), root)
    assert manifest(root)["stages"] == []
    traj = run_pipeline(PipelineSpec.from_dict(tiny_config()), root)
    assert traj.complete and traj.names == ["pretrain", "finetune", "adapt"]


# 8. NaN in a checkpoint whose checksum is consistent.


def test_nan_in_a_checkpoint_names_the_tensor_and_the_file(run_copy, capsys):
    path = run_copy / PRETRAIN_END
    data = path.read_bytes()
    tensors = load_safetensors(data)
    key = "fc1.weight"
    assert key in tensors
    tensors[key][0, 0] = math.nan
    metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    path.write_bytes(save_safetensors(tensors, metadata=metadata))
    set_sha256(run_copy, 0, "end")
    before = tree_bytes(run_copy)

    traj = Trajectory.open(run_copy)
    with pytest.raises(TrajectoryError) as info:
        traj.checkpoint("pretrain", "end")
    check_message(info.value, str(path), f"'{key}'", "NaN")
    assert info.value.field == key

    code, _, err = cli(capsys, "replay", run_copy, "--verify")
    assert code == 2
    check_cli_error(err, PRETRAIN_END, key)
    assert tree_bytes(run_copy) == before


# 9. A diverging run.


def test_diverging_stage_names_stage_and_step_and_records_nothing(tiny_config, tmp_path):
    root = tmp_path / "diverged"
    with pytest.raises(TrainingError) as info:
        run_pipeline(PipelineSpec.from_dict(tiny_config(pretrain={"lr": 1e6})), root)
    message = check_message(info.value, "'pretrain'")
    assert re.search(r"stage 'pretrain' step \d+", message), message
    assert manifest(root)["stages"] == [] and manifest(root)["complete"] is False
    assert not (root / "stages").exists()

    fixed = run_pipeline(PipelineSpec.from_dict(tiny_config()), tmp_path / "fixed")
    assert fixed.names == list(STAGE_NAMES) and fixed.complete


# 10. A stored counterfactual of another recording.


def test_stale_counterfactual_is_refused_and_left_alone(run_copy, capsys):
    skip_stage(Trajectory.open(run_copy), "finetune")
    meta_path = run_copy / "counterfactuals" / "skip-finetune" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["trajectory_fingerprint"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    before = tree_bytes(run_copy)

    with pytest.raises(TrajectoryError) as info:
        skip_stage(Trajectory.open(run_copy), "finetune")
    message = check_message(info.value, str(meta_path), "trajectory_fingerprint")
    assert f"delete {run_copy / 'counterfactuals' / 'skip-finetune'}" in message
    assert info.value.field == "trajectory_fingerprint"

    code, _, err = cli(capsys, "counterfactual", run_copy, "--skip", "finetune")
    assert code == 2
    check_cli_error(err, "skip-finetune", "delete")
    assert tree_bytes(run_copy) == before


def test_damaged_counterfactual_result_fails_its_checksum(run_copy):
    skip_stage(Trajectory.open(run_copy), "pretrain")
    final = run_copy / "counterfactuals" / "skip-pretrain" / "final.safetensors"
    final.write_bytes(final.read_bytes()[:-16])
    before = tree_bytes(run_copy)
    with pytest.raises(TrajectoryError) as info:
        skip_stage(Trajectory.open(run_copy), "pretrain")
    check_message(info.value, str(final), "checksum")
    assert tree_bytes(run_copy) == before


def test_counterfactual_meta_that_is_not_json_is_named(run_copy):
    skip_stage(Trajectory.open(run_copy), "adapt")
    meta_path = run_copy / "counterfactuals" / "skip-adapt" / "meta.json"
    meta_path.write_text("{not json")
    before = tree_bytes(run_copy)
    with pytest.raises(TrajectoryError) as info:
        skip_stage(Trajectory.open(run_copy), "adapt")
    check_message(info.value, str(meta_path), "not valid JSON")
    assert tree_bytes(run_copy) == before


# 11. Recording into a directory that already holds a run.


def test_recording_a_different_pipeline_over_a_run_is_refused(run_copy, tiny_config):
    before = tree_bytes(run_copy)
    other = PipelineSpec.from_dict(tiny_config(adapt={"steps": 5}))
    with pytest.raises(TrajectoryError) as info:
        run_pipeline(other, run_copy)
    check_message(info.value, str(run_copy / "manifest.json"), "different pipeline")
    assert info.value.field == "pipeline"
    assert tree_bytes(run_copy) == before


def test_recording_the_same_pipeline_again_returns_the_run_untouched(run_copy, tiny_config):
    before = tree_bytes(run_copy)
    inodes = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in run_copy.rglob("*")}
    traj = run_pipeline(PipelineSpec.from_dict(tiny_config()), run_copy)
    assert traj.names == list(STAGE_NAMES) and traj.complete
    assert tree_bytes(run_copy) == before
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in run_copy.rglob("*")} == inodes


# Stage names become folder names.


@pytest.mark.parametrize("name", ["", "x/../../../escaped", ".hidden", "a b"])
def test_stage_name_that_is_not_a_folder_name_is_refused_before_anything_is_written(
    tiny_config, tmp_path, name
):
    cfg = tiny_config()
    cfg["stages"] = {name: cfg["stages"]["pretrain"]}
    with pytest.raises(SpecError) as info:
        PipelineSpec.from_dict(cfg)
    check_message(info.value, f"pipeline.stages.{name}", repr(name), "folder name")
    assert list(tmp_path.iterdir()) == []


# Stored counterfactuals and runs that cannot have one.


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda meta: [meta], "not stagetrace.counterfactual metadata"),
        (lambda meta: {**meta, "schema_version": 99}, "schema_version 99"),
        (lambda meta: {k: v for k, v in meta.items() if k != "seconds"}, "(field seconds)"),
        (lambda meta: {k: v for k, v in meta.items() if k != "sha256"}, "(field sha256)"),
    ],
    ids=["not-an-object", "schema-version", "no-seconds", "no-sha256"],
)
def test_damaged_counterfactual_meta_is_refused_and_left_alone(run_copy, damage, named):
    skip_stage(Trajectory.open(run_copy), "adapt")
    folder = run_copy / "counterfactuals" / "skip-adapt"
    meta_path = folder / "meta.json"
    meta_path.write_text(json.dumps(damage(json.loads(meta_path.read_text()))))
    before = tree_bytes(run_copy)
    with pytest.raises(TrajectoryError) as info:
        skip_stage(Trajectory.open(run_copy), "adapt")
    check_message(info.value, str(meta_path), named, f"delete {folder}")
    assert tree_bytes(run_copy) == before


def test_counterfactual_of_an_incomplete_run_is_refused(tiny_config, tmp_path, capsys):
    root = tmp_path / "run"

    def interrupt_adapt(stage: str, t: int, total: int, loss: float) -> None:
        if stage == "adapt":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # pretrain and finetune are recorded, adapt is not
        run_pipeline(PipelineSpec.from_dict(tiny_config()), root, on_step=interrupt_adapt)
    before = tree_bytes(root)

    with pytest.raises(TrajectoryError) as info:
        skip_stage(Trajectory.open(root), "pretrain")
    check_message(info.value, str(root / "manifest.json"), "incomplete", "2 stage(s)")
    assert info.value.field == "complete"

    code, out, err = cli(capsys, "counterfactual", root, "--skip", "pretrain")
    assert (code, out) == (2, "")
    check_cli_error(err, "incomplete")
    assert tree_bytes(root) == before


def test_skip_that_would_carry_state_across_optimizer_types_is_refused(tiny_config, tmp_path):
    # pretrain (sgd) -> finetune (adamw) -> adapt (adamw, carry): without finetune, adapt would
    # be handed pretrain's SGD momentum.
    cfg = tiny_config(
        adapt={"optimizer": {"type": "adamw"}, "lr": 1e-3, "optimizer_policy": "carry"}
    )
    root = tmp_path / "run"
    traj = run_pipeline(PipelineSpec.from_dict(cfg), root)
    before = tree_bytes(root)
    with pytest.raises(StagetraceError) as info:
        skip_stage(traj, "finetune")
    check_message(info.value, "'finetune'", "sgd", "adamw", "'adapt'", "optimizer_policy reset")
    assert tree_bytes(root) == before
    assert skip_stage(traj, "adapt").reused is False  # skipping the others is well defined


# Malformed declarations and empty runs get messages, not Python errors.


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda cfg: cfg.update(seed="abc"), "pipeline.seed"),
        (lambda cfg: cfg.update(seed=None), "pipeline.seed"),
        (lambda cfg: cfg["stages"].update(adapt=None), "pipeline.stages.adapt"),
        (lambda cfg: cfg["stages"].update(adapt="lora"), "pipeline.stages.adapt"),
        (
            lambda cfg: cfg["stages"]["finetune"].update(
                entry={"kind": "reinit", "modules": ["head"]}
            ),
            "pipeline.stages.finetune.entry",
        ),
        # A string where a list is expected must not be iterated by character.
        (
            lambda cfg: cfg["stages"]["adapt"].update(trainable="*.lora_*"),
            "pipeline.stages.adapt.trainable",
        ),
        (
            lambda cfg: cfg["stages"]["finetune"].update(
                entry=[{"kind": "reinit", "modules": "head"}]
            ),
            "pipeline.stages.finetune.entry[0].modules",
        ),
    ],
    ids=[
        "seed-not-int",
        "seed-null",
        "stage-null",
        "stage-string",
        "entry-mapping",
        "trainable-string",
        "modules-string",
    ],
)
def test_malformed_declaration_is_a_spec_error_not_a_python_error(tiny_config, change, field):
    cfg = tiny_config()
    change(cfg)
    with pytest.raises(SpecError) as info:
        PipelineSpec.from_dict(cfg)
    check_message(info.value, field)


@pytest.mark.parametrize(
    "argv", [("replay", "--verify"), ("counterfactual", "--skip", "pretrain")], ids=["replay", "cf"]
)
def test_run_without_recorded_stages_says_so(tiny_config, tmp_path, capsys, argv):
    # What a run whose first stage diverged leaves behind; `inspect` shows it as INCOMPLETE.
    root = tmp_path / "diverged"
    with pytest.raises(TrainingError):
        run_pipeline(PipelineSpec.from_dict(tiny_config(pretrain={"lr": 1e6})), root)
    command, *rest = argv
    code, _, err = cli(capsys, command, root, *rest)
    assert code == 2
    check_cli_error(err)
    # Not "no stage named '0' ... use one of " (an empty list, and a stage the user never named).
    assert "'0'" not in err, err
    assert err.partition("Fix:")[2].strip().removeprefix("use one of").strip(), err

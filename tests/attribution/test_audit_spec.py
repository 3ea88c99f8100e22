"""`stagetrace audit SPEC.yaml` on checkpoints as people have them (docs/audit.md).

A tiny three-stage pipeline is recorded with the tool, then exported as people have such runs:
the pretraining's end as an HF folder with sharded safetensors, the fine-tune as an HF folder
with a Trainer-style checkpoint folder, the adapter as a PEFT folder written by peft itself
(``experiments.audit_example``). Auditing the spec must give exactly the recorded run's answer:
the truth when the spec declares every stage's pipeline, E0 or E1 when it declares less. Bad
specs exit 2 with one line and leave the spec's folder as it was.

Sign convention: effect_k(f) = f(theta_T) - f(theta_T^(-k)).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from attribution.record.checkpoint_spec import build, load_spec
from attribution.record.pipeline import flatten_state
from experiments import audit_example
from tests.helpers import check_cli_error, cli, installed, tree_bytes

peft = installed("peft")


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    root = tmp_path_factory.mktemp("audit_spec")
    traj = audit_example.record(root / "recorded")
    out = root / "checkpoints"
    audit_example.export(traj, out)
    audit_example.write_spec(traj, out / "audit.yaml")
    audit_example.write_spec(traj, out / "estimate.yaml", blocks=None)
    audit_example.write_spec(traj, out / "optimizer.yaml", blocks="optimizer")
    audit_example.write_spec(traj, out / "unknown.yaml", blocks=None, start=None)
    audit_example.write_spec(traj, out / "stand_in.yaml", blocks=None, start=None, stand_in="init")
    return traj, out


def _audit(capsys, target: Path, out: Path, *extra: str) -> tuple[dict, str]:
    code, stdout, err = cli(capsys, "audit", target, "--out", out, *extra)
    assert code == 0, err
    return json.loads(out.read_text()), stdout


def _recorded(capsys, example, estimator: str, tmp: Path) -> dict:
    traj, out = example
    result, _ = _audit(
        capsys,
        traj.root,
        tmp / f"recorded-{estimator}.json",
        "--estimator",
        estimator,
        "--behaviors",
        out / "behaviors.yaml",
    )
    return result


def _same_effects(got: dict, want: dict, stages: list[str], merged: bool = False) -> None:
    """Identical effects; ``merged``: the adapter was merged into the base weights (W + ΔW in
    one float32 matrix instead of the LoRA layer's two products), which moves the final
    model's outputs by float32 rounding only."""
    for name, behavior in want["behaviors"].items():
        for stage in stages:
            if merged:
                torch.testing.assert_close(
                    torch.tensor(got["behaviors"][name]["effects"][stage]),
                    torch.tensor(behavior["effects"][stage]),
                    rtol=0,
                    atol=1e-5,
                )
                continue
            assert got["behaviors"][name]["effects"][stage] == behavior["effects"][stage]
            assert got["behaviors"][name]["mean_effect"][stage] == behavior["mean_effect"][stage]


def test_the_trajectory_read_from_the_files_is_the_recorded_one(example) -> None:
    traj, out = example
    built = build(load_spec(out / "audit.yaml"))
    mine = built.trajectory
    assert [r.to_dict() for r in mine.stages] == [
        {k: v for k, v in r.to_dict().items() if k != "verified"} for r in traj.stages
    ]
    for k in range(3):
        for which in ("start", "end"):
            a, b = mine.checkpoint(k, which), traj.checkpoint(k, which)
            assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
        steps, recorded = mine.steps(k), traj.steps(k)
        assert torch.equal(steps.lr, recorded.lr) and torch.equal(steps.indices, recorded.indices)
    # the Trainer's optimizer.pt gives the fine-tune's end state, by parameter name
    a = flatten_state(mine.optimizer_state("finetune", "end"))
    b = flatten_state(traj.optimizer_state("finetune", "end"))
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    ev = built.evidence["finetune"]
    assert ev.lr_logged and ev.lr_check["offset"] == 0 and ev.lr_check["max_rel_error"] == 0
    assert built.evidence["adapt"].changes["added"] == ["fc1.lora_A", "fc1.lora_B"]
    assert built.held >= {"batch_order", "stage_data", "learning_rates"}


def test_with_pipeline_blocks_the_audit_is_the_truth_identical_to_the_recorded_run(
    example, capsys, tmp_path
) -> None:
    traj, out = example
    before = tree_bytes(out)
    got, stdout = _audit(capsys, out / "audit.yaml", tmp_path / "spec.json")
    assert "method: truth" in stdout and "evidence per stage:" in stdout
    assert got["plan"]["estimator"] == "truth"
    _same_effects(got, _recorded(capsys, example, "truth", tmp_path), traj.names)
    assert got["sign_convention"].startswith("effect_k(f) = f(theta_T) - f(theta_T^(-k))")
    assert got["evidence"]["pretrain"]["replay"] is True
    assert got["spec"]["stages"]["adapt"]["adapter"] == str(out / "lora")
    assert tree_bytes(out) == before  # nothing written beside the spec but --out


@pytest.mark.parametrize(("spec", "method"), [("estimate.yaml", "e0"), ("optimizer.yaml", "e1")])
def test_without_replay_the_estimate_equals_the_recorded_runs(
    example, capsys, tmp_path, spec, method
) -> None:
    traj, out = example
    got, stdout = _audit(capsys, out / spec, tmp_path / "spec.json")
    assert f"method: {method}" in stdout and "missing for a better answer" in stdout
    assert got["estimator"]["name"] == method
    assert got["evidence"]["adapt"]["replay"] is False
    merged = spec == "estimate.yaml"  # no add_lora declared: the adapter is merged
    assert got["evidence"]["adapt"]["replay_problem"].startswith(
        "no pipeline" if merged else "the pipeline block names no data"
    )
    _same_effects(got, _recorded(capsys, example, method, tmp_path), traj.names, merged)


def test_an_estimator_the_evidence_does_not_support_is_refused(example, capsys, tmp_path) -> None:
    _, out = example
    code, _, err = cli(
        capsys, "audit", out / "estimate.yaml", "--estimator", "e1", "--out", tmp_path / "a.json"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    check_cli_error(err, "e1", "pipeline block")
    assert not (tmp_path / "a.json").exists()


def test_an_unknown_start_gives_no_number_and_a_stand_in_is_stated(
    example, capsys, tmp_path
) -> None:
    traj, out = example
    got, stdout = _audit(capsys, out / "unknown.yaml", tmp_path / "u.json")
    assert got["labels"]["pretrain"]["label"] == "unknown start"
    assert got["behaviors"]["test_loss"]["mean_effect"]["pretrain"] is None
    assert "no number" in stdout and got["unknown_start"] == ["pretrain"]
    recorded = _recorded(capsys, example, "e0", tmp_path)
    _same_effects(got, recorded, ["finetune", "adapt"], merged=True)
    # the factory's own initialisation under seed 0 is what the recording started from
    got, stdout = _audit(capsys, out / "stand_in.yaml", tmp_path / "s.json")
    assert "STAND-IN" in stdout and "seed 0" in got["stand_ins"]["pretrain"]
    _same_effects(got, recorded, traj.names, merged=True)


def _edit_spec(folder: Path, change) -> Path:
    spec = folder / "audit.yaml"
    obj = yaml.safe_load(spec.read_text())
    change(obj)
    spec.write_text(yaml.safe_dump(obj, sort_keys=False))
    return spec


def _rename_adapter_module(folder: Path) -> None:
    weights = folder / "lora" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k.replace("fc1", "fc9"): v for k, v in tensors.items()}, weights)
    config = folder / "lora" / "adapter_config.json"
    obj = json.loads(config.read_text())
    obj["target_modules"] = ["fc9"]
    config.write_text(json.dumps(obj))


def _short_log(folder: Path) -> None:
    run = folder / "finetune_run"
    (run / "checkpoint-5").rename(run / "checkpoint-4")
    path = run / "checkpoint-4" / "trainer_state.json"
    state = json.loads(path.read_text())
    state.update(global_step=4, max_steps=4)
    state["log_history"] = state["log_history"][:4]
    path.write_text(json.dumps(state))


def _swap(obj: dict) -> None:
    stages = obj["stages"]
    obj["stages"] = {
        "pretrain": stages["pretrain"],
        "adapt": stages["adapt"],
        "finetune": stages["finetune"],
    }


BAD = {
    "shapes": (
        lambda f: _edit_spec(f, lambda o: o["model"]["kwargs"].update(hidden=[8])),
        ["does not fit the model", "fc1.weight"],
    ),
    "adapter module": (_rename_adapter_module, ["fc9", "does not have"]),
    "missing shard": (
        lambda f: (f / "pretrained" / "model-00002-of-00002.safetensors").unlink(),
        ["shard is missing"],
    ),
    "log steps": (_short_log, ["finetune_run", "4 steps", "declares 5"]),
    "order": (lambda f: _edit_spec(f, _swap), ["stages.finetune", "training order"]),
    "unknown key": (
        lambda f: _edit_spec(f, lambda o: o["stages"]["adapt"].update(lr=1)),
        ["stages.adapt", "unknown key", "lr"],
    ),
    "missing file": (lambda f: shutil.rmtree(f / "finetuned"), ["finetuned", "does not exist"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_specs_exit_2_with_one_line_and_write_nothing(example, capsys, tmp_path, case) -> None:
    _, out = example
    folder = tmp_path / "spec"
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns("recorded"))
    damage, names = BAD[case]
    damage(folder)
    before = tree_bytes(folder)
    code, _, err = cli(capsys, "audit", folder / "audit.yaml")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    check_cli_error(err, *names)
    assert tree_bytes(folder) == before


def test_a_hydra_spec_with_defaults_is_composed_from_its_folder(example, capsys, tmp_path) -> None:
    _, out = example
    folder = tmp_path / "spec"
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns("recorded"))
    spec = yaml.safe_load((folder / "estimate.yaml").read_text())
    stages = yaml.safe_dump({"stages": spec.pop("stages")}, sort_keys=False)
    (folder / "shared").mkdir()
    (folder / "shared" / "stages.yaml").write_text("# @package _global_\n" + stages)
    spec["defaults"] = ["shared/stages", "_self_"]
    (folder / "composed.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    composed, _ = _audit(capsys, folder / "composed.yaml", tmp_path / "c.json")
    plain, _ = _audit(capsys, folder / "estimate.yaml", tmp_path / "p.json")
    assert composed["behaviors"] == plain["behaviors"]
    assert composed["spec"]["stages"] == plain["spec"]["stages"]

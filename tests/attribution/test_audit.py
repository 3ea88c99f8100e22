"""The audit and its validation on a real recorded run: ``stagetrace audit`` / ``validate`` and the
Python API, checked against effects computed here independently (plain forward passes of the final
and the skip-stage models), and bad input refused with the run left untouched.

Sign convention: effect_k(f) = f(theta_T) - f(theta_T^(-k)).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch.utils.data import TensorDataset

from attribution.analysis.audit import audit, load_behaviors
from attribution.analysis.validate import validate
from attribution.record import SIGN_CONVENTION
from attribution.record.counterfactual import (
    as_model,
    shuffled_order,
    skip_stage,
    skip_stage_shuffled,
)
from attribution.record.errors import SpecError, StagetraceError
from attribution.record.pipeline import run_pipeline
from attribution.record.recorder import Recorder
from attribution.record.references import Ref
from attribution.record.spec import PipelineSpec
from attribution.record.trajectory import Trajectory
from estimators import EVIDENCE
from experiments.data import mnist
from tests.estimators import toy
from tests.helpers import (
    PRETRAIN_END,
    check_cli_error,
    check_message,
    cli,
    set_sha256,
    tree_bytes,
)

STAGES = ["pretrain", "finetune", "adapt"]
TEST_SET = {"target": "experiments.data:mnist", "kwargs": {"split": "test", "stop": 200}}
N = 200
GROUPS = {"low": [0, 1, 2, 3, 4], "high": [5, 6, 7, 8, 9]}
BEHAVIORS = f"""\
test_loss: {{data: {json.dumps(TEST_SET)}, quantity: loss}}
test_margin: {{data: {json.dumps(TEST_SET)}, quantity: margin}}
groups:
  data: {json.dumps(TEST_SET)}
  aggregate: group_mean
  groups: {{low: [0, 1, 2, 3, 4], high: [5, 6, 7, 8, 9]}}
"""
PER_EXAMPLE = ("test_loss", "test_margin")
METRICS = ("pearson", "spearman", "sign_agreement", "top_stage_agreement")


def write_behaviors(folder: Path, text: str = BEHAVIORS, name: str = "behaviours.yaml") -> Path:
    """A behaviours file (never named behaviors.yaml unless asked: that is picked up by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def behaviors_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_behaviors(tmp_path_factory.mktemp("behaviours"))


@pytest.fixture(scope="module")
def shared_run(recorded_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One copy of the recorded run that this module's audits write into (and reuse)."""
    return Path(shutil.copytree(recorded_run, tmp_path_factory.mktemp("audited") / "run"))


def labels() -> np.ndarray:
    return mnist(split="test", stop=N).tensors[1].numpy()


def true_effects(run: Path, quantity: str, order_seed: int | None = None) -> dict[str, np.ndarray]:
    """f(theta_T) - f(theta_T^(-k)) per stage, by plain forward passes of the two models; with
    ``order_seed``, theta_T^(-k) retrained under that reshuffled later batch order."""
    traj = Trajectory.open(run)
    inputs, targets = mnist(split="test", stop=N).tensors
    final = as_model(traj, traj.checkpoint(len(traj.stages) - 1, "end")).double()

    def quantity_of(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            logits = model(inputs.double())
        if quantity == "loss":
            return F.cross_entropy(logits, targets, reduction="none")
        true = logits[torch.arange(len(targets)), targets]
        others = logits.clone()
        others[torch.arange(len(targets)), targets] = -math.inf
        return true - others.max(1).values

    out = {}
    for stage in traj.names:
        skipped = (
            skip_stage(traj, stage)
            if order_seed is None
            else skip_stage_shuffled(traj, stage, order_seed)
        )
        without = as_model(traj, skipped.state).double()
        out[stage] = (quantity_of(final) - quantity_of(without)).numpy()
    return out


# The audit through the command line.


def test_audit_prints_every_stage_and_writes_attribution_json(shared_run, behaviors_file, capsys):
    code, out, err = cli(
        capsys, "audit", shared_run, "--estimator", "e1", "--behaviors", behaviors_file
    )
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert "e1" in lines[0] and "evaluated" in lines[0]
    header = lines[1].split()
    assert header == ["stage", "test_loss", "test_margin", "groups", "trust"]
    for stage in STAGES:
        row = next(line.split() for line in lines if line.startswith(f"{stage} "))
        assert len(row) == 5 and all(math.isfinite(float(v)) for v in row[1:4]), row
        assert row[4] == ("exact" if stage == STAGES[-1] else "unreliable")
    assert f"sign convention: {SIGN_CONVENTION}" in out
    assert lines[-1] == f"-> {shared_run / 'attribution.json'}"

    result = json.loads((shared_run / "attribution.json").read_text())
    assert result["sign_convention"] == SIGN_CONVENTION
    assert result["estimator"]["name"] == "e1"
    assert result["readout"] == "evaluated"
    assert result["stages"] == STAGES
    assert set(result["behaviors"]) == {"test_loss", "test_margin", "groups"}
    for name, behavior in result["behaviors"].items():
        width = 2 if name == "groups" else N
        assert list(behavior["effects"]) == STAGES and list(behavior["mean_effect"]) == STAGES
        assert len(behavior["outputs"]) == width
        for stage in STAGES:
            effects = behavior["effects"][stage]
            assert len(effects) == width and all(math.isfinite(v) for v in effects)
            assert behavior["mean_effect"][stage] == pytest.approx(np.mean(effects), abs=1e-12)
    assert result["behaviors"]["groups"]["outputs"] == ["groups[low]", "groups[high]"]
    assert result["behaviors"]["test_loss"]["quantity"] == "loss"
    assert result["behaviors"]["test_margin"]["quantity"] == "margin"

    # The printed table shows the stored mean effects.
    for stage in STAGES:
        row = next(line.split() for line in lines if line.startswith(f"{stage} "))
        for value, name in zip(row[1:4], ("test_loss", "test_margin", "groups"), strict=True):
            assert float(value) == pytest.approx(
                result["behaviors"][name]["mean_effect"][stage], abs=1e-5
            )


def test_group_effect_is_the_mean_of_the_per_example_effects_over_its_labels(
    shared_run, behaviors_file, tmp_path, capsys
):
    out = tmp_path / "groups.json"
    code, _, err = cli(capsys, "audit", shared_run, "--behaviors", behaviors_file, "--out", out)
    assert (code, err) == (0, "")
    result = json.loads(out.read_text())
    y = labels()
    for stage in STAGES:
        per_example = np.array(result["behaviors"]["test_loss"]["effects"][stage])
        expected = [per_example[np.isin(y, GROUPS[g])].mean() for g in ("low", "high")]
        got = result["behaviors"]["groups"]["effects"][stage]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_behaviours_over_the_same_data_and_quantity_share_one_readout(
    shared_run, behaviors_file, monkeypatch
):
    from attribution.analysis import audit as audit_module

    calls = []
    real = dict(audit_module.READOUTS)

    def counted(name):
        def readout(model, offsets, inputs, targets, quantity, batch_size):
            calls.append(quantity)
            return real[name](model, offsets, inputs, targets, quantity, batch_size)

        return readout

    monkeypatch.setattr(audit_module, "READOUTS", {n: counted(n) for n in real})
    result = audit(Trajectory.open(shared_run), "e1", load_behaviors(behaviors_file))
    # test_loss and groups: one loss read-out; test_margin: its own
    assert sorted(calls) == ["loss", "margin"]
    monkeypatch.setattr(audit_module, "READOUTS", real)
    alone = audit(
        Trajectory.open(shared_run), "e1", {"groups": load_behaviors(behaviors_file)["groups"]}
    )
    assert alone.behaviors["groups"] == result.behaviors["groups"]


def test_audit_of_a_hydra_run_directory_writes_beside_the_trajectory(
    recorded_run, tmp_path, capsys
):
    hydra = tmp_path / "hydra-run"
    shutil.copytree(recorded_run, hydra / "trajectory")
    write_behaviors(hydra, name="behaviors.yaml")
    code, out, err = cli(capsys, "audit", hydra)  # behaviours of the run directory, by default
    assert (code, err) == (0, "")
    result = json.loads((hydra / "attribution.json").read_text())
    assert set(result["behaviors"]) == {"test_loss", "test_margin", "groups"}
    assert not (hydra / "trajectory" / "attribution.json").exists()
    assert out.splitlines()[-1] == f"-> {hydra / 'attribution.json'}"


def test_out_writes_the_result_where_asked(run_copy, behaviors_file, tmp_path, capsys):
    out = tmp_path / "reports" / "mine.json"
    code, printed, err = cli(capsys, "audit", run_copy, "--behaviors", behaviors_file, "--out", out)
    assert (code, err) == (0, "")
    assert printed.splitlines()[-1] == f"-> {out}"
    assert json.loads(out.read_text())["estimator"]["name"] == "truth"  # auto: it fits
    assert not (run_copy / "attribution.json").exists()


def test_behaviors_yaml_of_the_run_directory_is_the_default(run_copy, capsys):
    write_behaviors(run_copy, BEHAVIORS.split("\n", 1)[0] + "\n", name="behaviors.yaml")
    code, out, err = cli(capsys, "audit", run_copy)
    assert (code, err) == (0, "")
    result = json.loads((run_copy / "attribution.json").read_text())
    assert list(result["behaviors"]) == ["test_loss"]
    assert "test_loss" in out.splitlines()[2]


@pytest.mark.parametrize("command", ["audit", "validate"])
def test_without_a_behaviours_file_nothing_is_done(run_copy, capsys, command):
    before = tree_bytes(run_copy)
    code, out, err = cli(capsys, command, run_copy)
    assert (code, out) == (2, "")
    check_cli_error(err, str(run_copy / "behaviors.yaml"), "no such behaviours file", "--behaviors")
    assert tree_bytes(run_copy) == before


def test_audit_given_the_manifest_path_writes_inside_the_trajectory(
    run_copy, behaviors_file, capsys
):
    # ``Trajectory.open`` (and so every command) accepts RUN/manifest.json for RUN.
    code, _, err = cli(capsys, "audit", run_copy / "manifest.json", "--behaviors", behaviors_file)
    assert (code, err) == (0, "")
    assert (run_copy / "attribution.json").is_file()


# The audit against the truth, through the Python API.


@pytest.mark.parametrize("quantity", ["loss", "margin"])
def test_e0_evaluated_audit_of_the_last_stage_is_the_true_effect(
    shared_run, behaviors_file, quantity
):
    traj = Trajectory.open(shared_run)
    result = audit(traj, "e0", load_behaviors(behaviors_file), readout="evaluated")
    assert result.estimator.name == "e0" and result.estimator.label == "e0"
    assert result.readout == "evaluated" and result.sign_convention == SIGN_CONVENTION
    truth = true_effects(shared_run, quantity)["adapt"]
    assert np.abs(truth).max() > 1e-4  # the last stage matters, so the check has teeth
    name = f"test_{quantity}"
    np.testing.assert_allclose(result.behaviors[name].effects["adapt"], truth, rtol=0, atol=1e-5)
    assert result.behaviors[name].mean_effect["adapt"] == pytest.approx(truth.mean(), abs=1e-6)
    assert result.to_json()["behaviors"][name]["effects"]["adapt"] == list(
        result.behaviors[name].effects["adapt"]
    )


# Validation.


def test_validate_compares_every_estimator_and_readout_with_retraining(
    shared_run, behaviors_file, capsys
):
    code, out, err = cli(
        capsys,
        "validate",
        shared_run,
        "--estimators",
        "e0,e1,e2",
        "--readouts",
        "linear,evaluated",
        "--behaviors",
        behaviors_file,
    )
    assert (code, err) == (0, "")
    result = json.loads((shared_run / "validation.json").read_text())
    assert result["sign_convention"] == SIGN_CONVENTION
    assert result["ground_truth_seconds"] > 0
    rows = result["rows"]
    assert len(rows) == 3 * 2 * 2 * 3
    keys = {(r["estimator"], r["readout"], r["behavior"], r["stage"]) for r in rows}
    assert keys == {
        (e, r, b, s)
        for e in ("e0", "e1", "e2")
        for r in ("linear", "evaluated")
        for b in PER_EXAMPLE
        for s in STAGES
    }
    for row in rows:
        for metric in METRICS:
            low = -1.0 if metric in ("pearson", "spearman") else 0.0
            assert low - 1e-12 <= row[metric] <= 1.0 + 1e-12, (metric, row)
        assert math.isfinite(row["mean_effect_error"]) and row["seconds"] >= 0, row
        assert row["cost_ratio"] == pytest.approx(row["seconds"] / result["ground_truth_seconds"])

    # E0 with the evaluated read-out is exact for the last stage.
    for behavior in PER_EXAMPLE:
        (last,) = [
            r
            for r in rows
            if (r["estimator"], r["readout"], r["behavior"], r["stage"])
            == ("e0", "evaluated", behavior, "adapt")
        ]
        assert last["pearson"] == pytest.approx(1.0, abs=1e-6)
        assert abs(last["mean_effect_error"]) < 1e-6
        assert last["sign_agreement"] == 1.0

    # The true mean effects are those computed here independently.
    for quantity in ("loss", "margin"):
        truth = true_effects(shared_run, quantity)
        for row in (r for r in rows if r["behavior"] == f"test_{quantity}"):
            assert row["mean_effect_true"] == pytest.approx(truth[row["stage"]].mean(), abs=1e-6)

    # The group behaviour: one row per estimator, read-out, output and stage, its true effect
    # the group mean of the independent per-example effects.
    group_rows = result["group_rows"]
    assert len(group_rows) == 3 * 2 * 2 * 3
    loss, y = true_effects(shared_run, "loss"), labels()
    for row in group_rows:
        group = row["output"].removeprefix("groups[").removesuffix("]")
        expected = loss[row["stage"]][np.isin(y, GROUPS[group])].mean()
        assert row["true"] == pytest.approx(expected, abs=1e-6)
        assert row["abs_error"] == pytest.approx(abs(row["estimated"] - row["true"]), abs=1e-12)
    for row in (r for r in group_rows if (r["estimator"], r["readout"]) == ("e0", "evaluated")):
        if row["stage"] == "adapt":
            assert row["estimated"] == pytest.approx(row["true"], abs=1e-6) and row["sign_right"]

    # The printed Markdown tables: a header, a rule and one line per row, each.
    lines = out.splitlines()
    assert lines[0].startswith("| estimator | read-out | behaviour | stage |")
    assert set(lines[1]) == {"|", "-"}
    table = [line for line in lines if line.startswith(("| e0 |", "| e1 |", "| e2 |"))]
    assert len(table) == len(rows) + len(group_rows)
    per_example_lines = [line for line in table if "| groups[" not in line]
    assert all(line.count("|") == lines[0].count("|") for line in per_example_lines)
    for line, row in zip(per_example_lines, rows, strict=True):
        assert line.startswith(f"| {row['estimator']} | {row['readout']} | {row['behavior']} |")
        assert f"| {row['pearson']:.3f} |" in line
    group_lines = [line for line in table if "| groups[" in line]
    for line, row in zip(group_lines, group_rows, strict=True):
        assert line.startswith(f"| {row['estimator']} | {row['readout']} | {row['output']} |")
        assert f"| {row['estimated']:+.4f} | {row['true']:+.4f} |" in line
    assert "stage ranking right" in out
    assert out.splitlines()[-1] == f"-> {shared_run / 'validation.json'}"


def test_validate_ceiling_scores_reshuffled_retraining_against_the_recorded_truth(
    shared_run, behaviors_file, capsys
):
    argv = ["validate", shared_run, "--estimators", "e0", "--readouts", "evaluated"]
    code, out, err = cli(capsys, *argv, "--behaviors", behaviors_file, "--ceiling", "2")
    assert (code, err) == (0, "")
    result = json.loads((shared_run / "validation.json").read_text())
    ceiling = result["ceiling"]
    assert ceiling["seeds"] == [0, 1] and ceiling["seconds"] > 0
    for stage in STAGES:  # stored and reused like counterfactuals, keyed by the seed
        for seed in (0, 1):
            assert (shared_run / "counterfactuals" / f"skip-{stage}-order-{seed}").is_dir()
    for quantity in ("loss", "margin"):
        recorded = true_effects(shared_run, quantity)
        draws = [true_effects(shared_run, quantity, seed) for seed in (0, 1)]
        for row in (r for r in ceiling["rows"] if r["behavior"] == f"test_{quantity}"):
            stage = row["stage"]
            pearsons = [np.corrcoef(d[stage], recorded[stage])[0, 1] for d in draws]
            assert row["pearson"] == pytest.approx(np.mean(pearsons), abs=1e-6)
            assert row["pearson_min"] == pytest.approx(min(pearsons), abs=1e-6)
            difference = np.mean([d[stage].mean() - recorded[stage].mean() for d in draws])
            assert row["mean_effect_difference"] == pytest.approx(difference, abs=1e-6)
            if stage == "adapt":  # no later stage to reshuffle: the recorded truth itself
                assert row["pearson"] == pytest.approx(1.0) and row["sign_agreement"] == 1.0
            else:  # another batch order is another model
                assert row["pearson"] < 1.0 - 1e-9
        expected = (draws[0]["adapt"] + draws[1]["adapt"]) / 2
        for row in (r for r in result["rows"] if r["behavior"] == f"test_{quantity}"):
            key = (row["behavior"], row["stage"])
            (match,) = [c for c in ceiling["rows"] if (c["behavior"], c["stage"]) == key]
            assert row["ceiling_pearson"] == match["pearson"]
            assert row["pearson_of_ceiling"] == pytest.approx(row["pearson"] / match["pearson"])
            if row["stage"] == "adapt":  # e0 evaluated is the truth there
                assert row["pearson_expected"] == pytest.approx(
                    np.corrcoef(recorded["adapt"], expected)[0, 1], abs=1e-6
                )
    assert "| behaviour | stage | ceiling Pearson (mean, seeds 0, 1) |" in out
    assert "of ceiling | Pearson (expected) |" in out


def test_validate_refuses_a_ceiling_of_one_retraining_before_any(run_copy, behaviors_file, capsys):
    before = tree_bytes(run_copy)
    argv = ["validate", run_copy, "--estimators", "e0", "--behaviors", behaviors_file]
    code, _, err = cli(capsys, *argv, "--ceiling", "1")
    assert code == 2
    check_cli_error(err, "ceiling", "at least 2")
    assert tree_bytes(run_copy) == before


def test_a_reshuffled_order_keeps_each_stage_s_examples_sizes_and_rates(recorded_run):
    traj = Trajectory.open(recorded_run)
    steps = traj.steps("finetune")
    shuffled = shuffled_order(steps, 0, 1)
    assert torch.equal(shuffled.lr, steps.lr) and torch.equal(shuffled.offsets, steps.offsets)
    assert torch.equal(shuffled.indices.sort().values, steps.indices.sort().values)
    assert not torch.equal(shuffled.indices, steps.indices)
    assert torch.equal(shuffled_order(steps, 0, 1).indices, shuffled.indices)  # seeded
    assert not torch.equal(shuffled_order(steps, 1, 1).indices, shuffled.indices)


@pytest.mark.parametrize("loss,same", [("linear_loss", True), ("mse", False)])
def test_the_order_matters_only_where_the_steps_interact(loss, same):
    """Plain SGD at a constant rate on a loss linear in theta ends at theta_0 - lr * (sum of the
    batch-mean gradients), the same for any partition of the examples into equal batches: the
    reshuffled retraining equals the recorded one (to rounding). On a quadratic loss it does not."""
    target = f"tests.estimators.toy:{loss}" if loss == "linear_loss" else "mse"
    cfg = toy.pipeline(target, [{"type": "sgd"}] * 2, ["reset"] * 2, [0.1, 0.05])
    for spec in cfg["stages"].values():
        spec["schedule"] = {"name": "constant"}
    traj = run_pipeline(PipelineSpec.from_dict(cfg), None)
    recorded, shuffled = skip_stage(traj, "s0").state, skip_stage_shuffled(traj, "s0", 0).state
    gap = max(float((recorded[n] - shuffled[n]).abs().max()) for n in recorded)
    assert (gap < 1e-12) if same else (gap > 1e-6), gap


def test_validate_api_reports_group_behaviours_alone_too(shared_run, behaviors_file):
    behaviors = load_behaviors(behaviors_file)
    result = validate(Trajectory.open(shared_run), ["e0"], ["evaluated"], behaviors)
    assert {r.behavior for r in result.rows} == set(PER_EXAMPLE)
    assert {r.behavior for r in result.group_rows} == {"groups"}
    alone = validate(Trajectory.open(shared_run), ["e0"], ["evaluated"], {"g": behaviors["groups"]})
    assert alone.rows == [] and len(alone.group_rows) == 2 * 3
    assert [r.true for r in alone.group_rows] == [r.true for r in result.group_rows]
    with pytest.raises(SpecError) as info:
        validate(Trajectory.open(shared_run), ["e0"], ["evaluated"], {})
    check_message(info.value, "behaviour")


def test_validate_refuses_settings_for_an_estimator_not_run(shared_run, behaviors_file):
    before = tree_bytes(shared_run)
    with pytest.raises(SpecError) as info:
        validate(
            Trajectory.open(shared_run),
            ["e0"],
            ["evaluated"],
            load_behaviors(behaviors_file),
            settings={"e3": {"rank": 2}},
        )
    check_message(info.value, "settings.e3", "not run")
    assert tree_bytes(shared_run) == before


# Bad input: exit 2, a message naming the thing and the fix, the run untouched.


def assert_no_results(run: Path) -> None:
    assert not (run / "attribution.json").exists() and not (run / "validation.json").exists()


def assert_only_complete_artifacts_added(run: Path, before: dict[str, bytes]) -> None:
    """The recording is byte-for-byte as it was; anything new is a complete stored result."""
    assert_no_results(run)
    after = tree_bytes(run)
    assert {n: after.get(n) for n in before} == before
    added = set(after) - set(before)
    assert all(n.startswith(("counterfactuals/", "embeddings/")) for n in added), added
    for folder in {n.rsplit("/", 1)[0] for n in added}:
        assert f"{folder}/meta.json" in after, folder


BROKEN = f"""\
test_loss: {{data: {json.dumps(TEST_SET)}, quantity: loss}}
broken: {{data: {{target: "experiments.data:nope", kwargs: {{split: test}}}}, quantity: loss}}
"""


def test_behaviour_whose_data_does_not_exist_is_named(run_copy, tmp_path, capsys):
    path = write_behaviors(tmp_path / "b", BROKEN)
    before = tree_bytes(run_copy)
    code, out, err = cli(capsys, "audit", run_copy, "--behaviors", path)
    assert (code, out) == (2, "")
    check_cli_error(err, "behaviors.broken", "experiments.data:nope")
    assert tree_bytes(run_copy) == before

    with pytest.raises(SpecError) as info:
        audit(Trajectory.open(run_copy), "e1", load_behaviors(path))
    check_message(info.value, "behaviors.broken", "'experiments.data:nope'")
    assert tree_bytes(run_copy) == before


def test_validate_names_a_behaviour_whose_data_does_not_exist(run_copy, tmp_path, capsys):
    path = write_behaviors(tmp_path / "b", BROKEN)
    before = tree_bytes(run_copy)
    code, out, err = cli(capsys, "validate", run_copy, "--behaviors", path)
    assert (code, out) == (2, "")
    check_cli_error(err, "behaviors.broken", "experiments.data:nope")
    assert_only_complete_artifacts_added(run_copy, before)


def test_validate_checks_behaviours_before_retraining(run_copy, tmp_path, capsys):
    # A typo in a data reference costs nothing to detect; retraining without every stage is the
    # most expensive thing stagetrace does. Bad input should fail before it, leaving no trace.
    path = write_behaviors(tmp_path / "b", BROKEN)
    before = tree_bytes(run_copy)
    code, _, err = cli(capsys, "validate", run_copy, "--behaviors", path)
    assert code == 2
    check_cli_error(err, "experiments.data:nope")
    assert not (run_copy / "counterfactuals").exists(), "retrained before checking behaviours"
    assert tree_bytes(run_copy) == before


def empty_set() -> TensorDataset:
    """A user data function that (by mistake) selects no example."""
    return TensorDataset(torch.zeros(0, 784), torch.zeros(0, dtype=torch.int64))


def test_behaviour_over_an_empty_dataset_is_refused_with_a_message(run_copy, tmp_path, capsys):
    path = write_behaviors(
        tmp_path / "b",
        'empty: {data: {target: "tests.attribution.test_audit:empty_set"}, quantity: loss}\n',
    )
    before = tree_bytes(run_copy)
    code, out, err = cli(capsys, "audit", run_copy, "--behaviors", path)
    assert (code, out) == (2, "")
    check_cli_error(err, "behaviors.empty")
    assert_only_complete_artifacts_added(run_copy, before)


# A run recorded without batch order (Recorder.stage(..., log_batches=False)).


def record_without_batches(root: Path, logged_steps: int = 0) -> Trajectory:
    """Two short stages of a user loop that logs the batches of its first ``logged_steps``
    steps only (by default none), recorded with ``log_batches=False``."""
    model_ref = Ref("experiments.models:MLP", {"hidden": [16]})
    torch.manual_seed(0)
    model = model_ref.call()
    recorder = Recorder(root, model, model_ref)
    data = Ref("experiments.data:mnist", {"stop": 600})
    inputs, targets = data.call().tensors
    for seed, name in enumerate(("pretrain", "finetune"), start=1):
        with recorder.stage(
            name, kind=name, data=data, seed=seed, batch_size=32, log_batches=False
        ) as stage:
            if name == "pretrain":
                optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            else:
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            stage.attach(optimizer)
            shuffler = torch.Generator().manual_seed(seed)
            for t in range(4):
                batch = torch.randint(len(targets), (32,), generator=shuffler)
                if t < logged_steps:
                    stage.log_batch(batch)
                optimizer.zero_grad()
                F.cross_entropy(model(inputs[batch]), targets[batch]).backward()
                optimizer.step()
    return recorder.finish()


@pytest.fixture(scope="module")
def unlogged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unlogged") / "run"
    record_without_batches(root)
    return root


@pytest.fixture
def unlogged_copy(unlogged_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(unlogged_run, tmp_path / "unlogged"))


def test_estimator_that_needs_batch_order_is_refused_without_it(
    unlogged_copy, behaviors_file, capsys
):
    before = tree_bytes(unlogged_copy)
    code, out, err = cli(
        capsys, "audit", unlogged_copy, "--estimator", "e2", "--behaviors", behaviors_file
    )
    assert (code, out) == (2, "")
    assert EVIDENCE["batch_order"] == "the batch indices of every step"
    check_cli_error(err, "e2", "batch indices of every step")
    assert "e0 or e1" in err.partition("Fix:")[2], err
    assert tree_bytes(unlogged_copy) == before

    with pytest.raises(StagetraceError) as info:
        audit(Trajectory.open(unlogged_copy), "e2", load_behaviors(behaviors_file))
    check_message(info.value, "e2", "batch indices of every step", "e0 or e1")
    assert tree_bytes(unlogged_copy) == before


@pytest.mark.parametrize("estimator", ["e0", "e1"])
def test_estimators_that_need_no_batches_audit_such_a_run(
    unlogged_copy, behaviors_file, capsys, estimator
):
    code, _, err = cli(
        capsys, "audit", unlogged_copy, "--estimator", estimator, "--behaviors", behaviors_file
    )
    assert (code, err) == (0, "")
    result = json.loads((unlogged_copy / "attribution.json").read_text())
    assert result["estimator"]["name"] == estimator
    assert result["stages"] == ["pretrain", "finetune"]
    for stage in ("pretrain", "finetune"):
        effects = result["behaviors"]["test_loss"]["effects"][stage]
        assert len(effects) == N and all(math.isfinite(v) for v in effects)
        assert any(v != 0 for v in effects)


@pytest.mark.parametrize(
    "argv",
    [("replay",), ("replay", "--verify"), ("validate", "--estimators", "e0,e1")],
    ids=["replay", "replay-verify", "validate"],
)
def test_replay_and_retraining_need_batch_order(unlogged_copy, behaviors_file, capsys, argv):
    command, *rest = argv
    extra = ["--behaviors", behaviors_file] if command == "validate" else []
    before = tree_bytes(unlogged_copy)
    code, out, err = cli(capsys, command, unlogged_copy, *rest, *extra)
    assert (code, out) == (2, "")
    check_cli_error(err, "no batch order")
    assert tree_bytes(unlogged_copy) == before


def test_a_stage_that_logged_only_some_batches_is_not_taken_for_batch_order(
    tmp_path, behaviors_file, capsys
):
    # log_batches=False, yet the loop logs the batch of its first step only: the step log holds
    # some indices, but not "the batch indices of every step". Either the recorder refuses the
    # stage, or every command that needs batch order refuses the run: never a Python error.
    root = tmp_path / "partly"
    try:
        record_without_batches(root, logged_steps=1)
    except StagetraceError as exc:
        check_message(exc, "pretrain")
        return
    before = tree_bytes(root)
    for argv in (
        ("replay", root, "--verify"),
        ("audit", root, "--estimator", "e2", "--behaviors", behaviors_file),
    ):
        code, out, err = cli(capsys, *argv)
        assert (code, out) == (2, ""), argv
        check_cli_error(err, "batch")
        assert tree_bytes(root) == before


# A NaN in a checkpoint whose checksum is consistent.


def test_nan_in_a_checkpoint_is_named_by_the_audit(run_copy, behaviors_file, capsys):
    shutil.rmtree(run_copy / "embeddings", ignore_errors=True)  # nothing stored to reuse
    path = run_copy / PRETRAIN_END
    data = path.read_bytes()
    tensors = load_safetensors(data)
    tensors["fc1.weight"][0, 0] = math.nan
    metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    path.write_bytes(save_safetensors(tensors, metadata=metadata))
    set_sha256(run_copy, 0, "end")
    before = tree_bytes(run_copy)

    for estimator in ("e0", "e1"):
        code, out, err = cli(
            capsys, "audit", run_copy, "--estimator", estimator, "--behaviors", behaviors_file
        )
        assert (code, out) == (2, ""), estimator
        check_cli_error(err, PRETRAIN_END, "'fc1.weight'", "NaN")
        assert tree_bytes(run_copy) == before
    assert_no_results(run_copy)


# Unknown estimator or read-out.


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (("audit", "--estimator", "e9"), ("'e9'", "e0, e1, e2")),
        (("audit", "--readout", "exact"), ("'exact'", "linear, evaluated")),
        (("validate", "--estimators", "e0,e9"), ("'e9'", "e0, e1, e2")),
        (("validate", "--readouts", "linear,exact"), ("exact", "linear, evaluated")),
    ],
    ids=["audit-estimator", "audit-readout", "validate-estimators", "validate-readouts"],
)
def test_unknown_estimator_or_readout_names_the_choices(
    run_copy, behaviors_file, capsys, argv, named
):
    command, *rest = argv
    before = tree_bytes(run_copy)
    code, out, err = cli(capsys, command, run_copy, *rest, "--behaviors", behaviors_file)
    assert (code, out) == (2, "")
    check_cli_error(err, *named)
    assert tree_bytes(run_copy) == before


def test_unknown_estimator_or_readout_in_the_api(run_copy, behaviors_file):
    traj, behaviors = Trajectory.open(run_copy), load_behaviors(behaviors_file)
    before = tree_bytes(run_copy)
    with pytest.raises(StagetraceError) as info:
        audit(traj, "e9", behaviors)
    check_message(info.value, "'e9'", "e0, e1, e2")
    with pytest.raises(StagetraceError) as info:
        audit(traj, "e1", behaviors, readout="exact")
    check_message(info.value, "'exact'", "linear, evaluated")
    assert tree_bytes(run_copy) == before


def test_setting_reaches_the_estimator_and_bad_ones_are_refused(run_copy, behaviors_file, capsys):
    argv = ["--estimator", "e3", "--behaviors", behaviors_file]
    code, _, err = cli(
        capsys,
        "audit",
        run_copy,
        *argv,
        "--setting",
        "e3.rank=2",
        "--setting",
        "e3.at=end",
        "--setting",
        "e3.sample=16",
    )
    assert (code, err) == (0, "")
    result = json.loads((run_copy / "attribution.json").read_text())
    assert result["estimator"]["settings"] == {
        "rank": 2,
        "sample": 16,
        "at": "end",
        "curvature": "hessian",
        "seed": 0,
    }
    api = audit(
        Trajectory.open(run_copy),
        "e3",
        load_behaviors(behaviors_file),
        settings={"rank": 2, "at": "end", "sample": 16},
    )
    assert api.behaviors["test_loss"].effects == result["behaviors"]["test_loss"]["effects"]
    assert api.estimator.label == result["estimator"]["label"] == "e3(at=end, rank=2, sample=16)"
    before = tree_bytes(run_copy)
    for bad, named in [("e3.rank", "EST.KEY=VALUE"), ("e3.rank=-1", "e3.rank")]:
        code, out, err = cli(capsys, "audit", run_copy, *argv, "--setting", bad)
        assert (code, out) == (2, "")
        check_cli_error(err, named)
    assert tree_bytes(run_copy) == before

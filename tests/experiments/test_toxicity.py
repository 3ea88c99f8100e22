"""The toxicity experiment's smoke preset, run as a user runs it (under a minute), then its
report checked against independent truths: the last stage's true effect on the false-positive
surrogate read from the trajectory's own checkpoints (no retraining code), which E1 with the
evaluated read-out must equal; the final model's metrics recomputed from its logits with
scikit-learn's AUC; the tokenizer saved with the run; the LoRA stage's checkpoints."""

import json
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import yaml

from attribution.record import SIGN_CONVENTION
from attribution.record.counterfactual import as_model
from attribution.record.references import Ref, load_dataset
from attribution.record.trajectory import Trajectory
from experiments.data.text import Tokenizer, comments, tokenizer
from experiments.toxicity_report import main as toxicity_summary

SMOKE = {"vocab_size": 1000, "max_len": 24}  # conf/preset/toxicity_smoke.yaml
IDENTITY_NONTOXIC = list(range(2, 17, 2))


def toxicity(run_dir, *overrides, check=True):
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "experiment=toxicity",
        "preset=toxicity_smoke",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    return subprocess.run(command, capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("toxicity")
    began = time.perf_counter()
    done = toxicity(run_dir)
    assert time.perf_counter() - began < 60  # CI budget of the preset
    assert "Blamed stage" in done.stdout and "[5/5]" in done.stdout
    return run_dir


def evaluation_data(run_dir):
    """The test set the run declared (its resolved config's evaluation.data), built anew."""
    config = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    return load_dataset(Ref.from_dict(config["evaluation"]["data"], "evaluation.data")).tensors


def fp_loss(model, data):
    """Mean cross-entropy of the non-toxic comments that carry an identity term."""
    tokens, labels, groups = data
    with torch.no_grad():
        losses = F.cross_entropy(model(tokens), labels, reduction="none")
    return float(losses[torch.isin(groups, torch.tensor(IDENTITY_NONTOXIC))].mean())


def test_report_holds_the_audit_the_truth_and_every_intervention(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    assert report["sign_convention"] == SIGN_CONVENTION
    traj = Trajectory.open(smoke_run / "trajectory")
    data = evaluation_data(smoke_run)
    final = as_model(traj, traj.checkpoint("adapt", "end")).eval()
    entered = as_model(traj, traj.checkpoint("adapt", "start")).eval()
    true_last = fp_loss(final, data) - fp_loss(entered, data)
    assert report["truth"]["adapt"]["identity_fp_loss"] == pytest.approx(true_last, abs=1e-5)
    estimated = report["audit"]["effects"]["identity_fp_loss"]
    assert estimated["adapt"] == pytest.approx(true_last, abs=1e-5)  # E1 is exact there
    assert report["audit"]["blamed"] == max(estimated, key=estimated.get)
    assert report["chosen"]["oracle"] == max(
        report["stages"], key=lambda s: report["truth"][s]["identity_fp_loss"]
    )
    rows = report["interventions"]
    assert {(r["intervention"], r["choice"]) for r in rows} == {
        (i, c) for i in ("undo", "skip", "filter") for c in ("estimator", "random", "oracle")
    }
    for row in (r for r in rows if r["intervention"] == "filter"):
        assert row["dropped"] > 0 and 0.0 <= row["dropped_carrier_share"] <= 1.0
    assert {r["estimator"] for r in report["fidelity"]["rows"]} == {"e0", "e1"}
    assert "Sign convention" in (smoke_run / "report.md").read_text()


def test_final_metrics_recomputed_from_the_logits(smoke_run):
    metrics = pytest.importorskip("sklearn.metrics")
    report = json.loads((smoke_run / "report.json").read_text())
    traj = Trajectory.open(smoke_run / "trajectory")
    tokens, labels, groups = evaluation_data(smoke_run)
    with torch.no_grad():
        p = torch.softmax(as_model(traj, traj.checkpoint("adapt", "end")).eval()(tokens), -1)
    toxic = p[:, 1].double().numpy()
    final = report["final"]
    assert final["auc"] == pytest.approx(metrics.roc_auc_score(labels.numpy(), toxic))
    assert final["accuracy"] == pytest.approx(float(((toxic > 0.5) == labels.numpy()).mean()))
    identity = (groups // 2).numpy()
    clean = labels.numpy() == 0
    fpr_with = (toxic[clean & (identity > 0)] > 0.5).mean()
    fpr_without = (toxic[clean & (identity == 0)] > 0.5).mean()
    assert final["identity_fpr_gap"] == pytest.approx(fpr_with - fpr_without)
    muslim = next(g for g in final["subgroups"] if g["name"] == "muslim")
    in_group = identity == 6  # the sixth group in alphabetical order
    background_toxic = (identity != 6) & ~clean
    bpsn = in_group & clean | background_toxic
    assert muslim["bpsn_auc"] == pytest.approx(
        metrics.roc_auc_score(labels.numpy()[bpsn], toxic[bpsn])
    )


def test_the_tokenizer_is_saved_with_the_run_and_rebuilds_its_tokens(smoke_run):
    saved = Tokenizer.load(smoke_run / "tokenizer.json")
    config = yaml.safe_load((smoke_run / "config.resolved.yaml").read_text())
    assert saved == tokenizer(config["text"]["terms"], **SMOKE)
    assert saved.max_len == 24 and len(saved.vocabulary) == 1000
    tokens, _, _ = evaluation_data(smoke_run)
    texts, _ = comments("test")
    assert torch.equal(saved.encode(texts[:200]), tokens[:200])  # the originals


def test_the_lora_stage_changes_only_adapter_parameters(smoke_run):
    traj = Trajectory.open(smoke_run / "trajectory")
    start, end = traj.checkpoint("adapt", "start"), traj.checkpoint("adapt", "end")
    adapters = {n for n in end if ".lora_" in n}
    assert adapters <= set(start)  # added by the stage's entry action, at the start
    for name, value in start.items():
        if name not in adapters:
            assert torch.equal(value, end[name]), name
    for name in (n for n in adapters if n.endswith("lora_B")):
        assert not start[name].any() and end[name].any(), name  # from zero, trained


def test_summary_over_runs(smoke_run, capsys, tmp_path):
    out_file = tmp_path / "results.md"
    out_file.write_text("before\n<!-- toxicity:start -->\nold\n<!-- toxicity:end -->\nafter\n")
    argv = [str(smoke_run), "--figures", str(tmp_path / "figures"), "--out", str(out_file)]
    assert toxicity_summary(argv) == 0
    out = capsys.readouterr().out
    assert "| seed | blamed |" in out and "named the biased stage in" in out
    assert (tmp_path / "figures" / "toxicity_gaps.png").stat().st_size > 0
    written = out_file.read_text()
    assert "old" not in written and "| seed | blamed |" in written
    assert written.startswith("before\n") and written.endswith("after\n")
    assert "python -m experiments.toxicity_report" in written
    nothing = [str(smoke_run / "nothing"), "--figures", str(tmp_path / "figures")]
    assert toxicity_summary(nothing) == 2

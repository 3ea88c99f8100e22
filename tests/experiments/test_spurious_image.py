"""The spurious_image experiment's smoke preset, run as a user runs it, then its seed report.

Independent truths: the last stage's true effect on the misled groups' loss is that loss of the
final model minus that of the model that entered the stage (read from the trajectory, no
retraining code involved); E1 with the evaluated read-out is exact for the last stage; accuracies
are recomputed by hand from the stored states.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from attribution.record import SIGN_CONVENTION
from attribution.record.counterfactual import as_model
from attribution.record.references import Ref, load_dataset
from attribution.record.trajectory import Trajectory
from experiments.sections import markers
from experiments.spurious_report import main as spurious_report


def spurious(run_dir, *overrides, check=True):
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "experiment=spurious_image",
        "preset=spurious_smoke",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=check,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("spurious")
    done = spurious(run_dir)
    assert "Blamed stage" in done.stdout and "[4/4]" in done.stdout  # report and progress
    return run_dir, done.stdout


@pytest.fixture(scope="module")
def smoke_run(smoke):
    return smoke[0]


def test_the_run_ends_with_the_report_path_and_speaks_in_words(smoke):
    run_dir, out = smoke
    assert out.rstrip().splitlines()[-1] == f"report: {run_dir / 'report.md'}"
    log = (run_dir / "run.log").read_text()
    assert "{'" not in log and '{"' not in log  # no raw Python dict
    report = json.loads((run_dir / "report.json").read_text())
    blamed, oracle = report["audit"]["blamed"], report["chosen"]["oracle"]
    assert f"on the blamed stage {blamed}," in log and f"the oracle's stage {oracle}" in log
    # the reruns show progress as the training does: every filtered stage, to its last step
    for row in (r for r in report["interventions"] if r["intervention"] == "filter"):
        stage = row["stage"]
        assert f"[filtered {stage}: {stage}] step" in log
        assert f"[filtered {stage}: adapt] step 10/10" in log
    assert "[without pretrain: finetune] step 30/30" in log
    text = (run_dir / "report.md").read_text()
    for intervention in ("undo", "skip", "filter"):
        assert f"- **{intervention}**: " in text
    assert "the 25% of its training examples" in text


def misled_loss(model, data):
    """Mean cross-entropy of the groups whose marker contradicts the label (1 and 2)."""
    inputs, labels, groups = data
    with torch.no_grad():
        losses = F.cross_entropy(model(inputs), labels, reduction="none")
    return float(losses[(groups == 1) | (groups == 2)].mean())


def test_report_holds_the_audit_the_truth_and_every_intervention(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    assert report["sign_convention"] == SIGN_CONVENTION
    traj = Trajectory.open(smoke_run / "trajectory")
    data = load_dataset(
        Ref(
            "experiments.data:patch_mnist",
            {"split": "test", "stop": 400, "correlation": 0.5, "label_noise": 0.0, "seed": 14},
        )
    ).tensors
    final = as_model(traj, traj.checkpoint("adapt", "end")).eval()
    entered = as_model(traj, traj.checkpoint("adapt", "start")).eval()
    true_last = misled_loss(final, data) - misled_loss(entered, data)
    assert report["truth"]["adapt"]["misled_loss"] == pytest.approx(true_last, abs=1e-5)
    assert report["audit"]["estimator"] == "e1" and report["audit"]["behavior"] == "misled_loss"
    estimated = report["audit"]["effects"]["misled_loss"]
    assert estimated["adapt"] == pytest.approx(true_last, abs=1e-5)  # E1 is exact there
    assert report["audit"]["blamed"] == max(estimated, key=estimated.get)
    assert report["chosen"]["oracle"] == max(
        report["stages"], key=lambda s: report["truth"][s]["misled_loss"]
    )

    with torch.no_grad():
        correct = (final(data[0]).argmax(-1) == data[1]).double()
    assert report["final"]["average"] == pytest.approx(float(correct.mean()))
    worst = min(float(correct[data[2] == g].mean()) for g in range(4))
    assert report["final"]["worst_group"] == pytest.approx(worst)

    rows = report["interventions"]
    assert {(r["intervention"], r["choice"]) for r in rows} == {
        (i, c) for i in ("undo", "skip", "filter") for c in ("estimator", "random", "oracle")
    }
    for row in rows:
        assert 0.0 <= row["worst_group"] <= row["average"] <= 1.0 and row["seconds"] >= 0
    for row in (r for r in rows if r["intervention"] == "filter"):
        assert row["dropped"] > 0
        assert 0.0 <= row["dropped_carrier_share"] <= 1.0
        assert 0.0 <= row["random_carrier_share"] <= 1.0
    skipped_oracle = next(
        r for r in rows if r["intervention"] == "skip" and r["choice"] == "oracle"
    )
    assert skipped_oracle["stage"] == report["chosen"]["oracle"]
    assert "Sign convention" in (smoke_run / "report.md").read_text()


def test_seed_report_writes_only_its_section(smoke_run, tmp_path):
    start, end = markers("spurious")
    out = tmp_path / "results.md"
    out.write_text(f"above\n{start}\n{end}\nbelow\n")
    assert spurious_report([str(smoke_run), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(f"above\n{start}\n") and text.endswith(f"{end}\nbelow\n")
    assert "from 1 runs" in text and f"--out {out}" in text and "carrier share" in text
    assert spurious_report([str(tmp_path / "nothing")]) == 2


def test_estimator_settings_reach_the_audit_and_undo_alike(tmp_path):
    done = spurious(tmp_path, "audit.estimator=e3", "+settings.e3={rank:2,sample:64}")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["audit"]["estimator"] == "e3(rank=2, sample=64)"
    # one set of embeddings: the audit blamed with the ones undo used
    stored = sorted(p.name for p in (tmp_path / "trajectory" / "embeddings").iterdir())
    assert len(stored) == 1 and stored[0].startswith("e3-"), stored
    assert "e3(rank=2, sample=64)" in done.stdout


def test_settings_for_an_estimator_not_run_are_refused_before_training(tmp_path):
    run_dir = tmp_path / "run"
    done = spurious(run_dir, "+settings.e3={rank:2}", check=False)
    assert done.returncode == 2
    assert "settings.e3" in done.stderr and "Fix:" in done.stderr, done.stderr[-2000:]
    assert not run_dir.exists()  # nothing was trained, nothing written

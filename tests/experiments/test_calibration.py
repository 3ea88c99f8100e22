"""The calibration report: labels from ``stagetrace audit`` against the truth of fidelity runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from attribution.analysis.choice import SUBSET, SUBSET_SETTINGS, subset_replay
from experiments.calibration_report import main

REPO = Path(__file__).resolve().parents[2]


def test_labels_are_set_against_the_truth_the_run_measured(tmp_path, capsys):
    run = tmp_path / "run"
    settings = ", ".join(f"{k}: {v}" for k, v in SUBSET_SETTINGS.items())
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "experiment=fidelity",
        "preset=fidelity_smoke",
        f"estimators=[{SUBSET}]",
        "readouts=[evaluated]",
        "baselines=[]",
        "peers=[]",
        "ceiling=2",
        "plots=false",
        "~settings",
        f"+settings={{subset: {{{settings}}}}}",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    out = tmp_path / "results.md"
    out.write_text("<!-- calibration:start -->\n<!-- calibration:end -->\n")
    assert main([str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert (
        "| label | stage estimates |" in text and "python -m experiments.calibration_report" in text
    )
    label = subset_replay().label  # the audit's subset replay, as rows name it
    rows = json.loads((run / "fidelity.json").read_text())["rows"]
    truth = {
        r["stage"]: r["pearson"]
        for r in rows
        if r["estimator"] == label and r["readout"] == "evaluated" and r["behavior"] == "test_loss"
    }
    for stage in ("pretrain", "finetune"):  # every stage before the last, with its truth
        line = next(x for x in text.splitlines() if x.startswith(f"| {run} | {stage} |"))
        assert f"| {truth[stage]:.3f} |" in line
        assert line.split(" | ")[2] in ("reliable", "uncertain", "unreliable")
    # The aggregate outputs (digit_halves[low], [high], halves_gap[low - high]), against the
    # recorded truth's group rows of the run.
    total = next(x for x in text.splitlines() if x.startswith("| all | "))
    agreed = int(total.split(" | ")[1])
    summary = next(x for x in text.splitlines() if x.startswith("3 aggregate outputs"))
    assert f"{3 * 3} stage effects of which" in summary and f"agree in sign on {agreed};" in summary
    group = json.loads((run / "fidelity.json").read_text())["group_rows"]
    subset = [r for r in group if r["estimator"] == label]
    ranked = len({r["output"] for r in subset if r["ranking_matches"]})
    assert f"for {ranked} of the 3 outputs" in summary
    # with the truth for every stage after the first, only pretrain is estimated
    hybrid = 0
    for output in {r["output"] for r in subset}:
        rows_of = {r["stage"]: r for r in subset if r["output"] == output}
        true = [rows_of[s]["true"] for s in ("pretrain", "finetune", "adapt")]
        mixed = [rows_of["pretrain"]["estimated"], *true[1:]]
        hybrid += sorted(range(3), key=lambda i: -mixed[i]) == sorted(
            range(3), key=lambda i: -true[i]
        )
    assert f"for {hybrid} of the 3 outputs" in next(
        x for x in text.splitlines() if x.startswith("With the truth for every stage after")
    )
    # what the audit itself chooses there: the smoke run's retraining fits the default budget
    chosen = next(x for x in text.splitlines() if x.startswith("What `stagetrace audit RUN`"))
    assert "`truth` for 1, retraining predicted at" in chosen
    assert f"the sign right for all {agreed} stage effects" in text
    capsys.readouterr()
    assert main([str(tmp_path / "none")]) == 2

"""The fidelity study's smoke preset, run as a user runs it (Hydra, fresh process), then its report.

Independent truths: E0's evaluated read-out of the last stage is the true effect exactly; the
regime quantities follow from the recorded checkpoints and the declared constant learning rates;
a random stage choice agrees with the truth's most accountable stage about 1/K of the time.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attribution.record import SIGN_CONVENTION
from attribution.record.trajectory import Trajectory
from experiments.fidelity_report import main as fidelity_report
from experiments.sections import markers

REPO = Path(__file__).resolve().parents[2]
ESTIMATORS = ["e0", "e1", "e3", "e4:2", "e2", "subset"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fidelity")
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "experiment=fidelity",
        "preset=fidelity_smoke",
        f"estimators=[{','.join(ESTIMATORS)}]",
        f"hydra.run.dir={run_dir}",
    ]
    subprocess.run(command, capture_output=True, text=True, check=True)
    return run_dir


def test_every_estimator_readout_and_stage_is_scored(smoke_run):
    result = json.loads((smoke_run / "fidelity.json").read_text())
    assert result["sign_convention"] == SIGN_CONVENTION
    assert result["knobs"] == {
        "model": "MLP",
        "stages": 3,
        "later": "sgd_momentum",
        "lr_scale": 1.0,
        "seed": 0,
    }
    rows = result["rows"]
    assert result["failures"] == {}
    # The aggregate behaviours (digit halves and their gap): every estimator is exact for the
    # last stage under the evaluated read-out.
    groups = result["group_rows"]
    assert {r["output"] for r in groups} == {
        "digit_halves[low]",
        "digit_halves[high]",
        "halves_gap[low - high]",
    }
    for r in groups:
        if r["stage"] == "adapt" and r["readout"] == "evaluated":
            assert r["estimated"] == pytest.approx(r["true"], abs=1e-6) and r["sign_right"]
    stages = ["pretrain", "finetune", "adapt"]
    # the smoke preset runs E3 at rank 5 on 128 examples: its rows say so
    labels = [
        {"e3": "e3(rank=5, sample=128)", "subset": "subset:0.25"}.get(e, e) for e in ESTIMATORS
    ]
    for estimator in labels:
        for readout in ["linear", "evaluated"]:
            for behavior in ["test_loss", "test_margin"]:
                got = [
                    r["stage"]
                    for r in rows
                    if (r["estimator"], r["readout"], r["behavior"])
                    == (estimator, readout, behavior)
                ]
                assert got == stages
    last = [r for r in rows if r["estimator"] == "e0" and r["readout"] == "evaluated"]
    for row in (r for r in last if r["stage"] == "adapt"):
        assert row["pearson"] == pytest.approx(1.0) and row["sign_agreement"] == 1.0
        assert row["mean_effect_error"] == pytest.approx(0.0, abs=1e-6)  # float32 rounding
    tracin = [r for r in rows if r["estimator"] == "tracin"]
    assert {r["stage"] for r in tracin} == set(stages)
    assert all(-1.0 <= r["pearson"] <= 1.0 for r in tracin)
    random = [r for r in rows if r["estimator"] == "random"]
    assert all(0.2 < r["top_stage_agreement"] < 0.47 for r in random)  # 1/3, 300 examples
    assert (smoke_run / "scatter_test_loss.png").stat().st_size > 0
    table = (smoke_run / "fidelity.md").read_text()
    assert "| e3(rank=5, sample=128) | linear | finetune |" in table


def test_the_noise_ceiling_is_measured_by_default_and_scores_every_row(smoke_run):
    result = json.loads((smoke_run / "fidelity.json").read_text())
    ceiling = result["ceiling"]
    assert ceiling["seeds"] == [0, 1]  # the study's default: two reshuffled later orders
    by_stage = {(c["behavior"], c["stage"]): c["pearson"] for c in ceiling["rows"]}
    assert by_stage[("test_loss", "adapt")] == pytest.approx(1.0)  # nothing later to reshuffle
    assert by_stage[("test_loss", "pretrain")] < 1.0
    for row in (r for r in result["rows"] if r["estimator"] not in ("random",)):
        assert row["ceiling_pearson"] == by_stage[(row["behavior"], row["stage"])]
        assert row["pearson_of_ceiling"] == pytest.approx(row["pearson"] / row["ceiling_pearson"])
        assert -1.0 <= row["pearson_expected"] <= 1.0
    # the subset replay's last stage is exact, as every estimator's
    (last,) = [
        r
        for r in result["rows"]
        if (r["estimator"], r["readout"], r["behavior"], r["stage"])
        == ("subset:0.25", "evaluated", "test_loss", "adapt")
    ]
    assert last["pearson"] == pytest.approx(1.0) and last["sign_agreement"] == 1.0


def test_regime_quantities_follow_from_the_record_and_the_declared_rates(smoke_run):
    result = json.loads((smoke_run / "fidelity.json").read_text())
    traj = Trajectory.open(smoke_run / "trajectory")
    start, end = traj.checkpoint("finetune", "start"), traj.checkpoint("finetune", "end")
    names = [n for n, _ in traj.build_model(2).named_parameters() if n in start]
    norm = math.sqrt(
        sum(float((start[n].double() - end[n].double()).square().sum()) for n in names)
    )
    finetune = result["regime"]["finetune"]
    assert finetune["displacement"] == pytest.approx(norm, rel=1e-9)
    # later stages of the smoke preset: adapt, constant lr 0.01, 10 steps, momentum 0.9
    assert finetune["later_lr_mass"] == pytest.approx(0.01 * 10)
    assert finetune["later_effective_mass"] == pytest.approx(0.01 * 10 / (1 - 0.9))
    assert result["regime"]["pretrain"]["later_lr_mass"] == pytest.approx(0.01 * 30)
    assert result["regime"]["adapt"]["later_lr_mass"] == 0.0


def test_report_writes_only_its_section_and_the_figures(smoke_run, tmp_path):
    start, end = markers("fidelity")
    out = tmp_path / "results.md"
    out.write_text(f"above\n{start}\nstale\n{end}\nbelow\n")
    figures = tmp_path / "figures"
    assert fidelity_report([str(smoke_run), "--out", str(out), "--figures", str(figures)]) == 0
    text = out.read_text()
    assert text.startswith(f"above\n{start}\n") and text.endswith(f"{end}\nbelow\n")
    assert "stale" not in text and "from 1 runs" in text
    assert "| later mass/(1-μ) | ceiling |" in text  # the regime map's noise-ceiling column
    assert "| × truth seconds | of ceiling | runs |" in text
    # the audit's target, per configuration, from the run's own rows
    rows = json.loads((smoke_run / "fidelity.json").read_text())["rows"]
    line = next(x for x in text.splitlines() if x.startswith("- `later="))
    if "no estimator cost" not in line:
        best = line.split("the best is `")[1].split("`")[0]
        readout = line.split(f"`{best}` (")[1].split(")")[0]
        finetune = next(
            r["pearson"]
            for r in rows
            if (r["estimator"], r["readout"], r["stage"], r["behavior"])
            == (best, readout, "finetune", "test_loss")
        )
        assert f"finetune Pearson {finetune:.3f}" in line
    assert "At any cost, the closest is `" in line
    assert f"--out {out}" in text  # the command that reproduces it
    assert (figures / "fidelity_cost.png").stat().st_size > 0
    assert (figures / "fidelity_regime.png").stat().st_size > 0
    unmarked = tmp_path / "unmarked.md"
    unmarked.write_text("no markers\n")
    assert fidelity_report([str(smoke_run), "--out", str(unmarked)]) == 2
    assert unmarked.read_text() == "no markers\n"
    assert fidelity_report([str(tmp_path / "empty")]) == 2


@pytest.mark.parametrize(
    "overrides,stages",
    [
        ([], ["pretrain", "finetune", "adapt"]),
        (["stages=four"], ["pretrain", "finetune", "refine", "adapt"]),
    ],
)
def test_sweep_knobs_compose(overrides, stages):
    """`stages=four`, `later=...` and `later.lr_scale` are plain overrides, as in the sweeps."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config", ["experiment=fidelity", "later=adamw", "later.lr_scale=0.5", *overrides]
        )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert list(resolved["pipeline"]["stages"]) == stages
    finetune = resolved["pipeline"]["stages"]["finetune"]
    assert finetune["optimizer"]["type"] == "adamw" and finetune["lr"] == pytest.approx(0.5e-3)

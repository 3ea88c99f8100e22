"""The stages_mnist experiment, run as a user runs it: through Hydra, in a fresh process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from attribution.analysis.cli import main as stagetrace
from attribution.record import SIGN_CONVENTION
from attribution.record.trajectory import Trajectory


def hydra_run(run_dir, *overrides, env=None):
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "experiment=stages_mnist",
        "preset=smoke",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_smoke_run_records_a_replayable_trajectory_and_its_ground_truth(tmp_path, model, capsys):
    out = hydra_run(tmp_path, f"model={model}").stdout
    traj = Trajectory.open(tmp_path / "trajectory")
    assert traj.names == ["pretrain", "finetune", "adapt"] and traj.complete
    assert "effect" in out and all(name in out for name in traj.names)
    log = (tmp_path / "run.log").read_text()  # the table is logged, not only printed
    assert "true effect of each stage on the test set" in log
    assert all(f"\n{name} " in log for name in traj.names)

    truth = json.loads((tmp_path / "ground_truth.json").read_text())
    assert truth["sign_convention"] == SIGN_CONVENTION
    for row in truth["stages"]:
        assert row["effect"]["loss"] == pytest.approx(row["with"]["loss"] - row["without"]["loss"])
    assert (tmp_path / "config.resolved.yaml").read_text().count("${") == 0

    assert stagetrace(["replay", str(tmp_path / "trajectory"), "--verify"]) == 0
    assert "largest parameter difference from the record: 0" in capsys.readouterr().out
    # Skipping the last stage gives back exactly the parameters that entered it.
    skipped = Trajectory.open(tmp_path).store.get_tensors(
        "counterfactuals/skip-adapt/final.safetensors"
    )
    start = traj.checkpoint("adapt", "start")
    assert all(torch.equal(skipped[k], start[k]) for k in start)


def test_offline_logger_logs_the_effects_and_keeps_its_files_in_the_run_directory(tmp_path):
    home = tmp_path / "home"
    run_dir = tmp_path / "run"
    hydra_run(run_dir, "logger=offline", env={"HOME": str(home)})
    (run,) = (run_dir / "wandb").glob("offline-run-*")
    assert Trajectory.open(run_dir).complete
    (table,) = (run / "files" / "media" / "table").glob("ground_truth_*.table.json")
    logged = json.loads(table.read_text())
    truth = json.loads((run_dir / "ground_truth.json").read_text())
    column = logged["columns"].index("loss_effect")
    assert [row[column] for row in logged["data"]] == pytest.approx(
        [row["effect"]["loss"] for row in truth["stages"]]
    )
    # nothing of wandb's outside the run directory (its cache and staging folders included)
    assert not (home / ".cache" / "wandb").exists()
    assert not (home / ".local" / "share" / "wandb").exists()

"""The stages_mnist experiment, run as a user runs it: through Hydra, in a fresh process."""

import json
import subprocess
import sys

import pytest
import torch

from attribution.analysis.cli import main as stagetrace
from attribution.record import SIGN_CONVENTION
from attribution.record.trajectory import Trajectory


def hydra_run(run_dir, *overrides):
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "experiment=stages_mnist",
        "preset=smoke",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    return subprocess.run(command, capture_output=True, text=True, check=True)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_smoke_run_records_a_replayable_trajectory_and_its_ground_truth(tmp_path, model, capsys):
    out = hydra_run(tmp_path, f"model={model}").stdout
    traj = Trajectory.open(tmp_path / "trajectory")
    assert traj.names == ["pretrain", "finetune", "adapt"] and traj.complete
    assert "effect" in out and all(name in out for name in traj.names)

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


def test_offline_logger_writes_wandb_files_inside_the_run_directory(tmp_path):
    hydra_run(tmp_path, "logger=offline", "ground_truth=false")
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert Trajectory.open(tmp_path).complete

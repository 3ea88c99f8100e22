"""The ``stagetrace`` command line on a real recorded run: inspect, replay, counterfactual."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attribution.analysis.cli import main
from attribution.record.store import DiskStore
from attribution.record.trajectory import Trajectory

REPO = Path(__file__).resolve().parents[2]
STAGE_NAMES = ("pretrain", "finetune", "adapt")
ADAPT_END = "stages/02-adapt/end.safetensors"
VERIFIED = "largest parameter difference from the record: 0\n"


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_lists_the_stages_in_order(recorded_run, capsys):
    code, out, err = cli(capsys, "inspect", recorded_run)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert "complete" in lines[0] and "experiments.models:MLP" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == list(STAGE_NAMES)
    assert [r[3] for r in rows] == ["6", "5", "4"]  # steps
    assert [r[5] for r in rows] == ["reset"] * 3  # policy


def test_replay_verify_reproduces_the_record_exactly(recorded_run, capsys):
    code, out, err = cli(capsys, "replay", recorded_run, "--verify")
    assert (code, err) == (0, "")
    assert out.endswith(VERIFIED)
    for name in STAGE_NAMES:
        row = next(line.split() for line in out.splitlines() if line.startswith(f"{name} "))
        assert row[1:] and all(value == "0" for value in row[1:]), out


def test_replay_of_a_perturbed_record_fails_only_with_verify(run_copy, capsys):
    traj = Trajectory.open(run_copy)
    tensors = traj.checkpoint("adapt", "end")
    tensors["head.bias"] = tensors["head.bias"] + 0.25
    sha = DiskStore(run_copy).put_tensors(
        ADAPT_END, tensors, {"schema": "stagetrace.trajectory", "stage": "adapt", "role": "end"}
    )
    manifest = json.loads((run_copy / "manifest.json").read_text())
    assert manifest["stages"][2]["files"]["end"]["path"] == ADAPT_END
    manifest["stages"][2]["files"]["end"]["sha256"] = sha
    (run_copy / "manifest.json").write_text(json.dumps(manifest, indent=2))

    code, out, err = cli(capsys, "replay", run_copy, "--verify")
    assert (code, err) == (1, "")
    assert "largest parameter difference from the record: 0.25\n" in out
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[1:-1]}
    assert rows == {"pretrain": ["0", "0"], "finetune": ["0", "0"], "adapt": ["0", "0.25"]}, out

    code, out, err = cli(capsys, "replay", run_copy)
    assert (code, err) == (0, "")
    assert "largest parameter difference from the record: 0.25\n" in out


def test_counterfactual_skipping_the_last_stage_is_its_start(run_copy, capsys):
    code, out, err = cli(capsys, "counterfactual", run_copy, "--skip", "adapt")
    assert (code, err) == (0, "")
    folder = run_copy / "counterfactuals" / "skip-adapt"
    assert "skip adapt: computed in" in out and str(folder) in out
    assert "sign convention: effect_k(f) = f(theta_T) - f(theta_T^(-k))" in out

    final = load_file(folder / "final.safetensors")
    start = Trajectory.open(run_copy).checkpoint("adapt", "start")
    assert sorted(final) == sorted(start)
    for key in start:
        assert torch.equal(final[key], start[key]), key
    stored = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(stored) == ["final.safetensors", "meta.json"]

    code, out, err = cli(capsys, "counterfactual", run_copy, "--skip", "adapt")
    assert (code, err) == (0, "")
    assert "skip adapt: reused (computed earlier in" in out
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == stored


def test_counterfactual_moves_the_final_parameters_when_skipping_pretrain(run_copy, capsys):
    code, out, err = cli(capsys, "counterfactual", run_copy, "--skip", "pretrain")
    assert (code, err) == (0, "")
    moved = float(out.split("max |theta_T^(-k) - theta_T| = ")[1].split()[0])
    assert moved > 0
    meta = json.loads((run_copy / "counterfactuals/skip-pretrain/meta.json").read_text())
    assert meta["retrained_stages"] == ["finetune", "adapt"] and meta["retrained_steps"] == 9


def test_a_hydra_run_directory_works_in_place_of_the_trajectory(recorded_run, tmp_path, capsys):
    hydra = tmp_path / "outputs" / "2024-01-01" / "12-00-00"
    shutil.copytree(recorded_run, hydra / "trajectory")

    code, out, _ = cli(capsys, "inspect", hydra)
    assert code == 0 and str(hydra / "trajectory") in out.splitlines()[0]
    code, out, _ = cli(capsys, "replay", hydra, "--verify")
    assert code == 0 and out.endswith(VERIFIED)
    code, out, err = cli(capsys, "counterfactual", hydra, "--skip", "adapt")
    assert (code, err) == (0, "")
    assert (hydra / "trajectory" / "counterfactuals" / "skip-adapt" / "final.safetensors").is_file()
    assert not (hydra / "counterfactuals").exists()


def test_a_directory_without_a_run_is_bad_input(tmp_path, capsys):
    for argv in (("inspect", tmp_path), ("replay", tmp_path / "absent", "--verify")):
        code, out, err = cli(capsys, *argv)
        assert (code, out) == (2, "")
        assert err.startswith("stagetrace: error:") and "Fix:" in err


def test_module_entry_point_replays_and_verifies(recorded_run):
    done = subprocess.run(
        [sys.executable, "-m", "attribution.analysis.cli", "replay", str(recorded_run), "--verify"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(VERIFIED)

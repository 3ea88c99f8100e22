"""Run directories under concurrency, read-only use and another environment (docs/trajectory.md,
sections 1 and 5.2): one recording per directory, one computation per stored result, derived
results kept elsewhere or nowhere, and replays run with the recorded thread count."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attribution.analysis.cli import main
from attribution.record.artifacts import check_writable
from attribution.record.counterfactual import skip_stage
from attribution.record.errors import TrajectoryError
from attribution.record.pipeline import recorded_threads, replay, run_pipeline
from attribution.record.recorder import Recorder
from attribution.record.references import Ref
from attribution.record.spec import PipelineSpec
from attribution.record.trajectory import LOCK, Environment, Trajectory
from estimators.base import stored_embeddings
from estimators.e0 import E0
from tests.attribution.tiny import make_tiny_config

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["pretrain", "finetune", "adapt"]

# A recording (argv: run, signal folder, stage) that, at the first step of that stage, creates
# <signals>/started and then waits for <signals>/go.
RECORD_AND_WAIT = """
import sys, time
from pathlib import Path
from attribution.record.pipeline import run_pipeline
from attribution.record.spec import PipelineSpec
from tests.attribution.tiny import make_tiny_config
run, signals, where = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
def on_step(stage, t, n, loss):
    if stage == where and t == 0:
        (signals / "started").touch()
        while not (signals / "go").exists():
            time.sleep(0.02)
run_pipeline(PipelineSpec.from_dict(make_tiny_config()), run, on_step)
"""

# A counterfactual (argv: run, signal folder, name) that reports its first look for a stored
# result (<signals>/<name>-looked), creates <signals>/<name>-computing at its first retraining
# step and waits there for <signals>/go; prints whether it reused a stored result.
SKIP_AND_WAIT = """
import json, sys, time
from pathlib import Path
from attribution.record import counterfactual
from attribution.record.trajectory import Trajectory
run, signals, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
load = counterfactual.load_artifact
def looking(*args):
    found = load(*args)
    (signals / f"{name}-looked").touch()
    return found
counterfactual.load_artifact = looking
def on_step(stage, t, n, loss):
    (signals / f"{name}-computing").touch()
    while not (signals / "go").exists():
        time.sleep(0.02)
result = counterfactual.skip_stage(Trajectory.open(run), "pretrain", on_step)
state = {k: v.tolist() for k, v in result.state.items()}
print(json.dumps({"reused": result.reused, "state": state}))
"""

RECORD = """
import sys
from attribution.record.pipeline import run_pipeline
from attribution.record.spec import PipelineSpec
from tests.attribution.tiny import make_tiny_config
run_pipeline(PipelineSpec.from_dict(make_tiny_config()), sys.argv[1])
"""


def start(script: str, *argv: object, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, argv)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until ``path`` exists; fail with the process's stderr if it ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"process ended ({process.returncode}) early:\n{process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} never appeared")
        time.sleep(0.02)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def spec() -> PipelineSpec:
    return PipelineSpec.from_dict(make_tiny_config())


def exact(traj: Trajectory) -> bool:
    return replay(traj).worst == 0.0


# 1. One recording per directory; one computation per stored result.


def test_a_second_recording_into_a_directory_being_recorded_is_refused(tmp_path):
    run, signals = tmp_path / "run", tmp_path / "signals"
    signals.mkdir()
    first = start(RECORD_AND_WAIT, run, signals, "finetune")
    try:
        wait_for(signals / "started", first)  # pretrain recorded, finetune training
        with pytest.raises(TrajectoryError) as info:
            run_pipeline(spec(), run)
    finally:
        (signals / "go").touch()
        finish(first)
    message = str(info.value)
    assert info.value.path == run
    for named in (str(run), "another recording is in progress", str(run / LOCK), "Fix:"):
        assert named in message, message
    traj = Trajectory.open(run)  # the first recording is whole, the second changed nothing
    assert traj.complete and traj.names == STAGES and exact(traj)
    assert not (run / LOCK).exists()


def test_a_killed_recording_leaves_a_lock_that_blocks_nothing(tmp_path):
    run, signals = tmp_path / "run", tmp_path / "signals"
    signals.mkdir()
    first = start(RECORD_AND_WAIT, run, signals, "adapt")
    wait_for(signals / "started", first)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert (run / LOCK).exists()  # the killed process never released it
    assert Trajectory.open(run).names == STAGES[:2]
    traj = run_pipeline(spec(), run)  # resumes after finetune
    assert traj.complete and traj.names == STAGES and exact(traj)


def test_a_recorder_holds_its_directory_until_it_finishes(tmp_path):
    model_ref = Ref("experiments.models:MLP", {"hidden": [16]})
    first = Recorder(tmp_path / "run", model_ref.call(), model_ref)
    with pytest.raises(TrajectoryError, match="another recording is in progress"):
        Recorder(tmp_path / "run", model_ref.call(), model_ref)
    first.finish()
    assert not (tmp_path / "run" / LOCK).exists()
    Recorder(tmp_path / "run", model_ref.call(), model_ref)  # no stage recorded: replaced


def test_two_processes_asking_for_one_counterfactual_compute_it_once(run_copy, tmp_path):
    signals = tmp_path / "signals"
    signals.mkdir()
    first = start(SKIP_AND_WAIT, run_copy, signals, "first")
    try:
        wait_for(signals / "first-computing", first)  # holds the lock, result not stored
        second = start(SKIP_AND_WAIT, run_copy, signals, "second")
        wait_for(signals / "second-looked", second)  # found nothing stored: now at the lock
        time.sleep(0.5)
        assert second.poll() is None and not (signals / "second-computing").exists()
    finally:
        (signals / "go").touch()
    computed, waited = json.loads(finish(first)), json.loads(finish(second))
    assert (computed["reused"], waited["reused"]) == (False, True)
    assert not (signals / "second-computing").exists()  # it never retrained
    assert waited["state"] == computed["state"]
    folder = run_copy / "counterfactuals" / "skip-pretrain"
    assert sorted(p.name for p in folder.iterdir()) == ["final.safetensors", "meta.json"]


# 2. Derived results elsewhere, or nowhere.


def test_a_cache_elsewhere_leaves_the_run_unchanged(run_copy, tmp_path):
    before = tree_bytes(run_copy)
    cache = tmp_path / "cache"
    traj = Trajectory.open(run_copy, cache=cache)
    computed = skip_stage(traj, "finetune")
    _, reused = stored_embeddings(E0(), traj)
    assert not computed.reused and not reused
    assert tree_bytes(run_copy) == before
    folder = cache / traj.fingerprint()[:16]
    assert traj.cache.root == folder
    stored = sorted(tree_bytes(cache))
    assert "counterfactuals/skip-finetune/meta.json" in [s.split("/", 1)[1] for s in stored]
    assert any(s.startswith(f"{folder.name}/embeddings/e0-") for s in stored), stored

    again = Trajectory.open(run_copy, cache=cache)
    reused_cf = skip_stage(again, "finetune")
    assert reused_cf.reused and stored_embeddings(E0(), again)[1]
    for key, value in computed.state.items():
        assert torch.equal(reused_cf.state[key], value), key
    # the same numbers as a result computed with no cache at all
    fresh = skip_stage(Trajectory.open(run_copy, cache=False), "finetune")
    for key, value in computed.state.items():
        assert torch.equal(fresh.state[key], value), key
    assert tree_bytes(run_copy) == before


def test_no_cache_writes_nothing(run_copy, tmp_path):
    before = tree_bytes(tmp_path)
    traj = Trajectory.open(run_copy, cache=False)
    first = skip_stage(traj, "adapt")
    stored_embeddings(E0(), traj)
    assert not first.reused
    assert tree_bytes(tmp_path) == before
    assert skip_stage(traj, "adapt").reused  # kept in memory by this object
    assert not skip_stage(traj.with_cache(False), "adapt").reused  # a new memory
    assert not skip_stage(Trajectory.open(run_copy, cache=False), "adapt").reused


def test_an_unwritable_cache_or_output_is_refused_before_any_work(run_copy, tmp_path, monkeypatch):
    # root ignores permission bits, so the check's verdict is simulated for the run directory
    access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: not Path(p).is_relative_to(run_copy) and access(p, mode)
    )
    with pytest.raises(TrajectoryError) as info:
        check_writable(Trajectory.open(run_copy))
    message = str(info.value)
    assert info.value.path == run_copy
    for named in (str(run_copy), "is not writable", "--cache-dir DIR", "--no-cache", "Fix:"):
        assert named in message, message

    check_writable(Trajectory.open(run_copy, cache=tmp_path / "cache" / "new"))
    check_writable(Trajectory.open(run_copy, cache=False), tmp_path / "out" / "report.json")
    with pytest.raises(TrajectoryError) as info:
        check_writable(Trajectory.open(run_copy, cache=False), run_copy / "attribution.json")
    assert info.value.path == run_copy and "--out FILE" in str(info.value)
    with pytest.raises(TrajectoryError, match="cannot be created"):
        check_writable(Trajectory.open(run_copy, cache=run_copy / "cache"))


# 3. The recording's environment, and replays with its thread count.


def test_the_manifest_records_the_environment_and_old_manifests_still_open(run_copy, capsys):
    env = Trajectory.open(run_copy).environment
    assert env == Environment.current()
    assert (env.torch, env.threads) == (torch.__version__, torch.get_num_threads())

    manifest = json.loads((run_copy / "manifest.json").read_text())
    del manifest["environment"]
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    old = Trajectory.open(run_copy)
    assert old.environment is None
    result = replay(old)
    assert result.worst == 0.0 and "unknown" in result.environment[0]


def test_a_replay_names_what_it_cannot_set_back(run_copy, capsys):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["environment"]["torch"] = "2.12.0"
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    result = replay(Trajectory.open(run_copy))
    assert result.environment == (f"recorded with torch 2.12.0, replayed with {torch.__version__}",)
    assert main(["replay", str(run_copy), "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"recorded with torch 2.12.0, replayed with {torch.__version__}" in out


def test_a_bad_environment_field_names_it(run_copy):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["environment"]["threads"] = 0
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrajectoryError) as info:
        Trajectory.open(run_copy)
    assert info.value.field == "environment.threads"


def test_retraining_runs_with_the_recorded_thread_count_and_restores_the_callers(run_copy):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    recorded = 1 if torch.get_num_threads() != 1 else 2
    manifest["environment"]["threads"] = recorded
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    traj = Trajectory.open(run_copy, cache=False)
    caller = torch.get_num_threads()
    seen: set[int] = set()

    def on_step(*_: object) -> None:
        seen.add(torch.get_num_threads())

    replay(traj, on_step)
    skip_stage(traj, "pretrain", on_step)
    with recorded_threads(traj):
        seen.add(torch.get_num_threads())
    assert seen == {recorded}
    assert torch.get_num_threads() == caller


def test_a_run_recorded_with_one_thread_replays_exactly_with_others(tmp_path):
    """Without the thread rule the tiny MLP's replay differs (by ~1e-8) with two threads."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    finish(start(RECORD, run, env={**env, "OMP_NUM_THREADS": "1"}))
    assert Trajectory.open(run).environment.threads == 1
    for threads in ({}, {"OMP_NUM_THREADS": "2"}):
        replayed = subprocess.run(
            [sys.executable, "-m", "attribution.analysis.cli", "replay", str(run), "--verify"],
            cwd=ROOT,
            env={**env, **threads},
            capture_output=True,
            text=True,
        )
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert replayed.stdout.endswith("largest parameter difference from the record: 0\n")

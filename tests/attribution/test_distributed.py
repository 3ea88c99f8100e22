"""``stagetrace validate`` and ``counterfactual`` under torchrun (two gloo ranks on the CPU) give
what one process gives: validation.json equal in every number but the measured seconds, stored
counterfactuals equal byte for byte; bad input on one rank makes every rank exit 2 with one
message, without hanging. And the shares: every stage once, every example once, in whole batches.

Sign convention: effect_k(f) = f(theta_T) - f(theta_T^(-k)).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from attribution.record.distributed import World, rows, shard
from tests.helpers import cli

REPO = Path(__file__).resolve().parents[2]
TEST_SET = json.dumps(
    {"target": "experiments.data:mnist", "kwargs": {"split": "test", "stop": 200}}
)
BEHAVIORS = f"""\
test_loss: {{data: {TEST_SET}, quantity: loss}}
test_margin: {{data: {TEST_SET}, quantity: margin}}
groups:
  data: {TEST_SET}
  aggregate: group_mean
  groups: {{low: [0, 1, 2, 3, 4], high: [5, 6, 7, 8, 9]}}
"""
TIMED = {"seconds", "cost_ratio", "ground_truth_seconds"}
"""Fields that measure wall-clock time: the only ones allowed to differ."""

PER_RANK = """\
import json, os, sys, time
from pathlib import Path
from attribution.analysis.cli import main
from attribution.record.distributed import leave

rank, codes = os.environ["RANK"], Path(sys.argv[2])
for i, argv in enumerate(json.loads(Path(sys.argv[1]).read_text())):
    code = main([a.replace("{rank}", rank) for a in argv])  # joins the group once, for the process
    (codes / f"{i}-{rank}").write_text(str(code))
# leave only when every rank has said how every command ended: torchrun stops the others when
# one exits with a failure
deadline = time.monotonic() + 30
while len(list(codes.iterdir())) < (i + 1) * int(os.environ["WORLD_SIZE"]) and (
    time.monotonic() < deadline
):
    time.sleep(0.05)
leave(0)  # as python -m attribution.analysis.cli ends
"""
"""Runs ``stagetrace`` once per argument list of a JSON file, one torchrun launch for all (a
launch costs seconds), with ``{rank}`` replaced by the rank; writes each exit status to
``CODES/<command>-<rank>``."""


def torchrun(*argv: object, **env: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 ARGV`` (one thread per rank, as torchrun sets
    by default), failing the test if it has not finished in 300 s (a hang; a loaded machine
    takes minutes)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    return subprocess.run(
        [*command, "2", *map(str, argv)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The in-process run with the thread count each torchrun rank has (read-outs and
    estimators run with the caller's threads; retraining with the recorded ones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def untimed(obj: Any) -> Any:
    """``obj`` without its timing fields, NaN spelled out (NaN != NaN)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k not in TIMED}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return "NaN"
    return obj


def test_validate_under_torchrun_writes_what_one_process_writes(
    recorded_run, tmp_path, capsys, one_thread
):
    behaviors = tmp_path / "behaviours.yaml"
    behaviors.write_text(BEHAVIORS)
    before = sorted(p.name for p in recorded_run.iterdir())
    argv = [
        *("validate", recorded_run, "--estimators", "e0,e1,e2,truth"),
        *("--readouts", "linear,evaluated", "--behaviors", behaviors),
        *("--batch-size", "64", "--ceiling", "2"),  # 200 examples: batches 0-1 and 2-3
    ]
    code, _, err = cli(capsys, *argv, "--out", tmp_path / "one.json", "--cache-dir", tmp_path)
    assert (code, err) == (0, ""), err
    # the ranks keep the retrainings in memory: each broadcasts its stages to the other
    ran = torchrun(
        "-m", "attribution.analysis.cli", *argv, "--out", tmp_path / "two.json", "--no-cache"
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.count(f"-> {tmp_path / 'two.json'}") == 1  # rank 0 alone prints

    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert untimed(two) == untimed(one)
    assert len(one["rows"]) == 4 * 2 * 2 * 3 and len(one["ceiling"]["rows"]) == 2 * 3
    assert len(one["group_rows"]) == 4 * 2 * 2 * 3
    assert all(r["mean_effect_true"] != 0 for r in one["rows"])  # the effects are not all zero
    assert sorted(p.name for p in recorded_run.iterdir()) == before  # nothing written in the run


SKIPPED = ("pretrain", "finetune")


@pytest.fixture(scope="module")
def launched(recorded_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One torchrun launch of three commands: counterfactuals without pretrain and finetune
    (rank 0 retrains the first, rank 1 the second; each reads the other's from the cache on
    disk), a validation whose behaviours file is missing on rank 1 only, and a stage that does
    not exist. Their exit statuses per rank, output and folders."""
    folder = tmp_path_factory.mktemp("launched")
    (folder / "behaviours-0.yaml").write_text(BEHAVIORS)  # rank 1's does not exist
    skips = [arg for stage in SKIPPED for arg in ("--skip", stage)]
    bad = ["--cache-dir", folder / "bad"]
    commands = [
        ["counterfactual", recorded_run, *skips, "--cache-dir", folder / "cache"],
        ["validate", recorded_run, "--estimators", "e0", *bad, "--out", folder / "v.json"],
        ["counterfactual", recorded_run, "--skip", "nosuch", *bad],
    ]
    commands[1] += ["--behaviors", folder / "behaviours-{rank}.yaml"]
    (folder / "commands.json").write_text(json.dumps([list(map(str, c)) for c in commands]))
    (folder / "per_rank.py").write_text(PER_RANK)
    (folder / "codes").mkdir()
    ran = torchrun(folder / "per_rank.py", folder / "commands.json", folder / "codes")
    codes = {p.name: p.read_text() for p in (folder / "codes").iterdir()}
    return {"ran": ran, "codes": codes, "folder": folder}


def test_counterfactual_under_torchrun_stores_the_same_bytes(
    recorded_run, launched, tmp_path, capsys
):
    argv = ["counterfactual", recorded_run, *(a for s in SKIPPED for a in ("--skip", s))]
    code, out, err = cli(capsys, *argv, "--cache-dir", tmp_path)
    assert (code, err) == (0, "")
    ran = launched["ran"]
    assert launched["codes"]["0-0"] == launched["codes"]["0-1"] == "0", ran.stderr
    for stage in SKIPPED:
        assert out.count(f"skip {stage}: computed in") == 1, out
        # rank 0 reports rank 1's retraining as computed, once
        assert ran.stdout.count(f"skip {stage}: computed in") == 1, ran.stdout
        (one,) = tmp_path.glob(f"*/counterfactuals/skip-{stage}")
        (two,) = (launched["folder"] / "cache").glob(f"*/counterfactuals/skip-{stage}")
        final = (two / "final.safetensors").read_bytes()
        assert final == (one / "final.safetensors").read_bytes()
        metas = [json.loads((d / "meta.json").read_text()) for d in (one, two)]
        assert untimed(metas[1]) == untimed(metas[0])
        assert metas[0]["retrained_stages"][-1] == "adapt"
    assert ran.stdout.count("sign convention:") == 1


def test_bad_input_on_one_rank_or_all_exits_2_on_every_rank_with_one_message(launched):
    ran, codes, folder = launched["ran"], launched["codes"], launched["folder"]
    assert ran.returncode == 0, ran.stderr  # every command ended on every rank: no hang
    assert {c: codes[c] for c in ("1-0", "1-1", "2-0", "2-1")} == dict.fromkeys(
        ("1-0", "1-1", "2-0", "2-1"), "2"
    ), ran.stderr
    messages = [line for line in ran.stderr.splitlines() if "stagetrace: error:" in line]
    assert len(messages) == 2, ran.stderr  # one per command, from rank 0
    assert "behaviours-1.yaml" in messages[0] and "nosuch" in messages[1]
    assert all("Fix:" in m for m in messages)
    assert str(REPO / "attribution") not in ran.stderr  # no traceback from the ranks
    assert not (folder / "v.json").exists() and not (folder / "bad").exists()


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_shards_take_every_item_once_round_robin(size):
    items = list(range(11))
    shares = [shard(items, World(r, size)) for r in range(size)]
    assert sorted(i for share in shares for i in share) == items
    for r, share in enumerate(shares):
        assert all(i % size == r for i in share)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 200])
@pytest.mark.parametrize("batch_size", [1, 7, 64, 512])
def test_rows_are_contiguous_whole_batches_in_rank_order(size, n, batch_size):
    spans = [rows(n, batch_size, World(r, size)) for r in range(size)]
    covered = [i for s in spans for i in range(n)[s]]
    assert covered == list(range(n))
    for s in spans:
        assert s.start % batch_size == 0 and (s.stop % batch_size == 0 or s.stop == n)
    if n >= batch_size * size:  # enough batches: every rank gets some
        assert all(s.stop > s.start for s in spans)


def test_leave_flushes_the_output_and_exits_with_the_status_at_once():
    script = (
        "import atexit, sys\n"
        "from attribution.record.distributed import leave\n"
        "atexit.register(lambda: print('teardown ran'))\n"
        "print('out', end='')\n"
        "sys.stderr.write('err')\n"
        "leave(3)\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (ran.returncode, ran.stdout, ran.stderr) == (3, "out", "err")

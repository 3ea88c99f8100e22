"""Helpers shared by the test modules: reading and damaging run directories, driving the
command line, and comparing stage offsets with the retrained truth."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from attribution.analysis.cli import main
from attribution.record.counterfactual import skip_stage

PRETRAIN_END = "stages/00-pretrain/end.safetensors"


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative POSIX path, with its bytes."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / "manifest.json").read_text())


def edit_manifest(run: Path, change: Callable[[dict[str, Any]], None]) -> None:
    m = manifest(run)
    change(m)
    (run / "manifest.json").write_text(json.dumps(m, indent=2))


def set_sha256(run: Path, stage: int, role: str) -> None:
    """Make the manifest's checksum of a stage file match the file as it is now."""
    m = manifest(run)
    info = m["stages"][stage]["files"][role]
    info["sha256"] = hashlib.sha256((run / info["path"]).read_bytes()).hexdigest()
    (run / "manifest.json").write_text(json.dumps(m, indent=2))


def check_message(exc: BaseException, *names: str) -> str:
    """The message names every one of ``names`` and says how to fix the problem."""
    message = str(exc)
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    fix = message.partition("Fix:")[2]
    assert fix.strip(), f"no fix given in: {message}"
    return message


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def check_cli_error(err: str, *names: str) -> None:
    assert err.startswith("stagetrace: error:"), err
    assert "Fix:" in err, err
    for name in names:
        assert name in err, f"{name!r} not named in: {err}"


# Optimizers of the estimator tests, and the retrained truth they are checked against.

SGD = {"type": "sgd", "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.05}
NESTEROV = {"type": "sgd", "momentum": 0.8, "nesterov": True, "weight_decay": 0.1}
SGDW = {"type": "sgdw", "momentum": 0.7, "weight_decay": 0.2}
ADAMW = {"type": "adamw", "weight_decay": 0.3}


def true_offsets(traj, stage):
    final = traj.checkpoint(len(traj.stages) - 1, "end")
    skipped = skip_stage(traj, stage).state
    return {n: skipped[n].double() - final[n].double() for n in final}


def assert_offsets_equal(estimate, truth, atol):
    for name, value in truth.items():
        got = estimate.get(name, torch.zeros_like(value))
        torch.testing.assert_close(got, value, rtol=0, atol=atol, msg=name)


def installed(module: str) -> Any:
    """``module`` from an optional extra the project installs (``make setup``: the hf extra):
    skipped where it is missing, except under CI (``CI=true``), where a missing module means the
    set-up is broken and fails the test instead of hiding it."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)

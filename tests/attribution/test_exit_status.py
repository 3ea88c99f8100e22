"""The exit-status contract of ``stagetrace``: every error a user can cause ends with exit 2,
one message that names the thing and the fix, no traceback, and nothing written or changed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from attribution.analysis.cli import main
from tests.helpers import tree_bytes

GOOD_BEHAVIORS = (
    'test_loss: {data: {target: "experiments.data:mnist", '
    "kwargs: {split: test, stop: 50}}, quantity: loss}\n"
)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def bad_yaml(run: Path, tmp: Path) -> list[str]:
    return ["audit", run, "--behaviors", write(tmp / "b.yaml", "test_loss: {data: [\n")]


def python_tag(run: Path, tmp: Path) -> list[str]:
    text = "evil: !!python/object/apply:os.system ['touch " + str(tmp / "pwned") + "']\n"
    return ["audit", run, "--behaviors", write(tmp / "b.yaml", text)]


def model_kwargs(run: Path, tmp: Path) -> list[str]:
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["model"]["kwargs"]["hiden"] = [3]
    (run / "manifest.json").write_text(json.dumps(manifest))
    return ["replay", run]


def out_is_directory(run: Path, tmp: Path) -> list[str]:
    return ["audit", run, "--behaviors", write(tmp / "b.yaml", GOOD_BEHAVIORS), "--out", tmp]


def read_only_run(run: Path, tmp: Path) -> list[str]:
    return ["counterfactual", run, "--skip", "pretrain"]


def unknown_estimator(run: Path, tmp: Path) -> list[str]:
    behaviors = write(tmp / "b.yaml", GOOD_BEHAVIORS)
    return ["audit", run, "--behaviors", behaviors, "--estimator", "e9"]


def stray_setting(run: Path, tmp: Path) -> list[str]:
    behaviors = write(tmp / "b.yaml", GOOD_BEHAVIORS)
    return ["audit", run, "--behaviors", behaviors, "--estimator", "e1", "--setting", "e3.rank=5"]


def bad_setting(run: Path, tmp: Path) -> list[str]:
    behaviors = write(tmp / "b.yaml", GOOD_BEHAVIORS)
    return ["audit", run, "--behaviors", behaviors, "--setting", "rank=5"]


def unknown_stage(run: Path, tmp: Path) -> list[str]:
    return ["counterfactual", run, "--skip", "warmup"]


def missing_behaviors(run: Path, tmp: Path) -> list[str]:
    return ["audit", run, "--behaviors", tmp / "nope.yaml"]


def untrusted_data(run: Path, tmp: Path) -> list[str]:
    text = "evil: {data: {target: 'os:system', kwargs: {command: 'touch x'}}}\n"
    return ["audit", run, "--behaviors", write(tmp / "b.yaml", text)]


CASES: dict[str, tuple[Callable[[Path, Path], list], tuple[str, ...]]] = {
    "malformed behaviours YAML": (bad_yaml, ("b.yaml", "line 2")),
    "a !!python tag": (python_tag, ("b.yaml", "plain YAML")),
    "model kwargs the factory does not take": (model_kwargs, ("experiments.models:MLP", "hiden")),
    "--out names a directory": (out_is_directory, ("is a directory",)),
    "a read-only run": (read_only_run, ("--cache-dir", "--no-cache")),
    "an unknown estimator": (unknown_estimator, ("'e9'", "e0, e1, e2")),
    "a setting for an estimator not run": (stray_setting, ("e3", "not run")),
    "a setting not EST.KEY=VALUE": (bad_setting, ("rank=5", "EST.KEY=VALUE")),
    "an unknown stage": (unknown_stage, ("'warmup'", "pretrain")),
    "a missing behaviours file": (missing_behaviors, ("nope.yaml",)),
    "code outside the trusted modules": (untrusted_data, ("'os:system'", "--trust-module os")),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_message_and_writes_nothing(
    case, run_copy, tmp_path, capsys, monkeypatch
):
    make, names = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    argv = [str(a) for a in make(run_copy, work)]
    if case == "a read-only run":
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != run_copy)
    before, around = tree_bytes(run_copy), tree_bytes(work)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stagetrace: error:"), err
    assert "Fix:" in err and "Traceback" not in err + out
    for name in names:
        assert name in err, f"{name!r} not named in: {err}"
    assert tree_bytes(run_copy) == before
    assert tree_bytes(work) == around


def test_debug_shows_the_traceback_instead(run_copy, tmp_path):
    from attribution.record.errors import StagetraceError

    with pytest.raises(StagetraceError, match="warmup"):
        main(["--debug", "counterfactual", str(run_copy), "--skip", "warmup"])


def test_trust_module_lets_a_named_module_resolve(run_copy, tmp_path, capsys, monkeypatch):
    """``--trust-module`` is what the refusal's fix says: with it the reference resolves (and
    then fails for its own reason: json.loads is no dataset)."""
    from attribution.record import references

    monkeypatch.setattr(references, "_trusted", set(references._trusted))  # undone after
    text = "j: {data: {target: 'json:loads', kwargs: {s: '[1]'}}}\n"
    behaviors = write(tmp_path / "b.yaml", text)
    assert main(["audit", str(run_copy), "--behaviors", str(behaviors)]) == 2
    assert "not trusted" in capsys.readouterr().err
    argv = ["--trust-module", "json", "audit", str(run_copy), "--behaviors", str(behaviors)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not trusted" not in err and "TensorDataset" in err

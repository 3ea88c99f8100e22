"""The bfloat16 report (``experiments.precision_report``) on the tiny recorded run.

Independent truths: skipping the last stage retrains nothing, so its bfloat16 truth evaluated in
float32 is the float32 truth exactly; the run directory's bytes (nothing written to it); the
output file's bytes on bad input.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from attribution.record.pipeline import run_pipeline
from attribution.record.spec import PipelineSpec
from experiments.precision_report import main
from tests.attribution.tiny import make_tiny_config
from tests.helpers import tree_bytes

BEHAVIORS = {
    "test_loss": {
        "data": {"target": "experiments.data:mnist", "kwargs": {"split": "test", "stop": 100}},
        "quantity": "loss",
    },
    "again": {  # the same values: measured once
        "data": {"target": "experiments.data:mnist", "kwargs": {"split": "test", "stop": 100}},
        "quantity": "loss",
    },
    "groups": {
        "data": {"target": "experiments.data:mnist", "kwargs": {"split": "test", "stop": 100}},
        "aggregate": "group_mean",
        "groups": {"low": [0, 1, 2, 3, 4], "high": [5, 6, 7, 8, 9]},
    },
}
WORK = (
    "linear read-out in bfloat16",
    "evaluated read-out in bfloat16",
    "truth retrained in bfloat16, evaluated in float32",
    "truth retrained and evaluated in bfloat16",
)


def recorded(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run_pipeline(PipelineSpec.from_dict(make_tiny_config()), run / "trajectory")
    (run / "behaviors.yaml").write_text(yaml.safe_dump(BEHAVIORS))
    return run


def rows(text: str) -> dict[tuple[str, str], list[str]]:
    """(work, stage) -> the table row's cells after them."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in WORK:
            out[(cells[0], cells[2])] = cells[3:]
    return out


def test_the_report_compares_every_stage_and_writes_only_its_section(tmp_path, capsys):
    run = recorded(tmp_path)
    before = tree_bytes(run)
    out = tmp_path / "results.md"
    out.write_text("intro\n<!-- precision:start -->\nold\n<!-- precision:end -->\noutro\n")
    assert main([str(run), "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    found = rows(printed)
    stages = ["pretrain", "finetune", "adapt"]
    assert sorted(found) == sorted((w, s) for w in WORK for s in stages)  # one behaviour
    pearson, signs, _, error = found[(WORK[2], "adapt")]
    assert (pearson, signs, error) == ("1.000000", "1.000", "+0.00000")
    for cells in found.values():
        assert float(cells[0]) > 0.9  # Pearson of bfloat16 against float32
    text = out.read_text()
    assert text.startswith("intro\n<!-- precision:start -->\n### bfloat16 against float32")
    assert text.endswith("<!-- precision:end -->\noutro\n") and "old" not in text
    assert tree_bytes(run) == before  # computed in memory: nothing written to the run


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "results.md"
    out.write_text("no markers\n")
    assert main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "Fix:" in capsys.readouterr().err and out.read_text() == "no markers\n"
    assert main([str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "Fix:" in capsys.readouterr().err

"""Calibrate the audit's reliability labels against the truth (docs/design.md, section 5b).

``python -m experiments.calibration_report DIR [DIR ...] [--out docs/results.md]`` reads every
fidelity run under the directories (``fidelity.json`` beside a ``trajectory/``), audits it as
``stagetrace audit --estimator subset:0.25`` would (the same embeddings, stored by the run, and
the label's check: two independent half-budget replays), and compares each stage's label with
the truth the run measured: the per-example Pearson of the estimate (evaluated read-out,
per-example test loss) and whether the sign of the mean effect is right. It prints, and with
``--out`` writes between ``<!-- calibration:start -->`` and ``<!-- calibration:end -->``, one
table row per label: how many stage estimates got it, how often Pearson >= 0.9, how often the
sign was right. Exit 2 without runs.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from attribution.analysis.audit import audit, load_behaviors
from attribution.analysis.choice import LABELS
from attribution.record.trajectory import Trajectory
from experiments.sections import SectionError, provenance, publish

SECTION = "calibration"
ESTIMATOR = "subset:0.25"
BEHAVIOR = "test_loss"
GOOD = 0.9


@dataclass(frozen=True)
class Case:
    """One stage estimate of one run: its label and how it fared against the truth."""

    run: str
    stage: str
    label: str
    agreement: float | None
    pearson: float
    sign_right: bool


def cases(run: Path) -> list[Case]:
    """The labelled stage estimates of one fidelity run (its last stage is exact by
    construction and left out)."""
    result = json.loads((run / "fidelity.json").read_text())
    rows = {
        r["stage"]: r
        for r in result["rows"]
        if r["estimator"] == ESTIMATOR and r["readout"] == "evaluated" and r["behavior"] == BEHAVIOR
    }
    if not rows:
        return []
    traj = Trajectory.open(run / "trajectory")
    behaviors = {BEHAVIOR: load_behaviors(run / "behaviors.yaml")[BEHAVIOR]}
    labels = audit(traj, ESTIMATOR, behaviors).labels
    out = []
    for stage in traj.names[:-1]:
        row = rows[stage]
        true = row["mean_effect_true"]
        estimated = true + row["mean_effect_error"]
        out.append(
            Case(
                str(run),
                stage,
                labels[stage].label,
                labels[stage].agreement,
                row["pearson"],
                math.copysign(1, estimated) == math.copysign(1, true),
            )
        )
    return out


def table(found: Sequence[Case]) -> list[str]:
    """One row per label: estimates, share with Pearson >= GOOD, share with the sign right."""
    lines = [
        f"| label | stage estimates | Pearson >= {GOOD} | mean-effect sign right | mean Pearson |",
        "|---|---|---|---|---|",
    ]
    for label in LABELS[1:]:
        mine = [c for c in found if c.label == label]
        if not mine:
            lines.append(f"| {label} | 0 | - | - | - |")
            continue
        good = sum(c.pearson >= GOOD for c in mine)
        right = sum(c.sign_right for c in mine)
        mean = sum(c.pearson for c in mine) / len(mine)
        lines.append(
            f"| {label} | {len(mine)} | {good} ({good / len(mine):.0%}) | "
            f"{right} ({right / len(mine):.0%}) | {mean:.3f} |"
        )
    return lines


def section(dirs: Sequence[Path], command: str) -> str:
    runs = sorted({p.parent for d in dirs for p in Path(d).rglob("fidelity.json")})
    found = [c for run in runs for c in cases(run)]
    if not found:
        raise SectionError(
            f"no fidelity run with {ESTIMATOR} rows under {', '.join(map(str, dirs))}. Fix: run "
            "`python -m experiments.run -m experiment=fidelity ...` with subset among the "
            "estimators first",
            status=2,
        )
    detail = [
        "| run | stage | label | agreement of the halves | Pearson | sign right |",
        "|---|---|---|---|---|---|",
        *(
            f"| {c.run} | {c.stage} | {c.label} | "
            f"{'-' if c.agreement is None else f'{c.agreement:.3f}'} | {c.pearson:.3f} | "
            f"{'yes' if c.sign_right else 'no'} |"
            for c in found
        ),
    ]
    return "\n".join(
        [
            *provenance(
                "### Calibration of the reliability labels (generated)",
                f"from {len(runs)} fidelity runs ({len(found)} stage estimates before the last) "
                "by the command below.",
                command,
            ),
            "",
            *table(found),
            "",
            "<details><summary>Every stage estimate</summary>",
            "",
            *detail,
            "",
            "</details>",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m experiments.calibration_report DIR [DIR ...] [--out FILE]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="Markdown file holding the two marker lines")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "experiments.calibration_report", *argv])
    return publish(args.out, SECTION, lambda: section(args.dirs, command))


if __name__ == "__main__":
    sys.exit(main())

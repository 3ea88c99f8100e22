"""Gather ``spurious_image`` runs over seeds into the section of ``docs/results.md``.

``python -m experiments.spurious_report DIR [DIR ...] [--out docs/results.md] [--section NAME]``
reads every ``report.json`` under the given directories and writes, between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` of ``--out`` (NAME defaults to ``spurious``):
per seed, the blamed and the oracle stage; per intervention and stage choice, the worst-group
accuracy it recovers (after minus before); the best intervention's recovery as a share of the
oracle's; and filtering's share of shortcut-carrying examples among those dropped, against
random dropping.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.sections import SectionError, provenance, publish

SECTION = "spurious"
INTERVENTIONS = ("undo", "skip", "filter")
CHOICES = ("estimator", "random", "oracle")


def load_reports(dirs: Iterable[Path]) -> list[dict[str, Any]]:
    """Every ``report.json`` under ``dirs``, ordered by seed."""
    reports = [
        json.loads(path.read_text())
        for directory in dirs
        for path in sorted(Path(directory).rglob("report.json"))
    ]
    return sorted(reports, key=lambda r: r["seed"])


def recovery(report: Mapping[str, Any], intervention: str, choice: str) -> float:
    """Worst-group accuracy after the intervention minus the final model's."""
    row = next(
        r
        for r in report["interventions"]
        if r["intervention"] == intervention and r["choice"] == choice
    )
    return row["worst_group"] - report["final"]["worst_group"]


def best_share(report: Mapping[str, Any]) -> float:
    """The best intervention's recovery on the estimator's choice, as a share of the best
    recovery on the oracle's choice."""
    mine = max(recovery(report, i, "estimator") for i in INTERVENTIONS)
    oracle = max(recovery(report, i, "oracle") for i in INTERVENTIONS)
    return mine / oracle if oracle > 0 else float("nan")


def render(reports: Sequence[Mapping[str, Any]], command: str, title: str) -> str:
    """The Markdown section."""
    first = reports[0]
    named = sum(r["audit"]["blamed"] == r["chosen"]["oracle"] for r in reports)
    shares = [best_share(r) for r in reports]
    lines = [
        *provenance(
            f"### {title} (generated)",
            f"from {len(reports)} runs by the command below, after the sweep given above it. "
            f"Sign convention: {first['sign_convention']}",
            command,
        ),
        "",
        f"Estimator {first['audit']['estimator']} ({first['audit']['readout']} read-out) named "
        f"the oracle's stage in {named} of {len(reports)} seeds. The best intervention on its "
        f"choice recovered {np.nanmean(shares):.1%} (lowest {np.nanmin(shares):.1%}) of the "
        "worst-group accuracy that the best intervention on the oracle's choice recovered.",
        "",
        "| seed | blamed | oracle | final worst / avg | "
        + " | ".join(f"{i} ({c})" for i in INTERVENTIONS for c in CHOICES)
        + " | best / oracle |",
        "|" + "---|" * (5 + len(INTERVENTIONS) * len(CHOICES)),
    ]
    for report, share in zip(reports, shares, strict=True):
        cells = [
            f"{recovery(report, i, c):+.3f}" if _has(report, i, c) else "–"
            for i in INTERVENTIONS
            for c in CHOICES
        ]
        final = report["final"]
        lines.append(
            f"| {report['seed']} | {report['audit']['blamed']} | {report['chosen']['oracle']} | "
            f"{final['worst_group']:.3f} / {final['average']:.3f} | "
            + " | ".join(cells)
            + f" | {share:.1%} |"
        )
    lines += [
        "",
        "Cells: worst-group accuracy recovered (after minus before). Average accuracy and the",
        "seconds of every intervention are in each run's `report.md`.",
        "",
        "Within-stage filtering: shortcut carriers among the dropped examples.",
        "",
        "| seed | stage | dropped | carrier share (filter) | carrier share (random) |",
        "|---|---|---|---|---|",
    ]
    for report in reports:
        for row in report["interventions"]:
            if (
                row["intervention"] == "filter"
                and row["choice"] == "estimator"
                and row["dropped_carrier_share"] is not None  # None: not known for the data
            ):
                lines.append(
                    f"| {report['seed']} | {row['stage']} | {row['dropped']} | "
                    f"{row['dropped_carrier_share']:.3f} | {row['random_carrier_share']:.3f} |"
                )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the section; exit 0, or 2 (bad ``--out``, or no runs found)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m experiments.spurious_report")
    parser.add_argument("dirs", nargs="+", type=Path, help="directories holding the runs")
    parser.add_argument("--out", type=Path, help="Markdown file holding the two marker lines")
    parser.add_argument("--section", default=SECTION, help="name of the marked section")
    parser.add_argument("--title", default="Shortcut removal", help="the section's heading")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "experiments.spurious_report", *argv])
    return publish(args.out, args.section, lambda: report(args.dirs, command, args.title))


def report(dirs: Sequence[Path], command: str, title: str) -> str:
    """Read the runs under ``dirs`` and render the section."""
    reports = load_reports(dirs)
    if not reports:
        raise SectionError(
            f"no report.json under {', '.join(map(str, dirs))}. Fix: run "
            "`python -m experiments.run -m experiment=spurious_image seed=0,1,2,3,4` first",
            status=2,
        )
    return render(reports, command, title)


def _has(report: Mapping[str, Any], intervention: str, choice: str) -> bool:
    return any(
        r["intervention"] == intervention and r["choice"] == choice for r in report["interventions"]
    )


if __name__ == "__main__":
    sys.exit(main())

"""Gather ``toxicity`` runs into one table over seeds (docs/toxicity.md).

``python -m experiments.toxicity_report DIR [DIR ...]`` reads every ``report.json`` under the
directories and prints, per seed, the blamed, oracle and biased stage, the final identity FPR
gap and clean accuracy, the share of the gap each intervention on the blamed stage closes (with
its clean-accuracy change), the best one's share of the oracle's best, and the criterion; then
how often the audit named the biased stage and the criterion was met. Exit 2 without reports.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.tasks.toxicity import INTERVENTIONS


def summary(reports: Sequence[Mapping[str, Any]]) -> str:
    """One row per seed: blamed, oracle and biased stage, the final gap, each intervention's
    gap closed on the estimator's choice, the verdict."""
    head = (
        "| seed | blamed | oracle | biased | final gap | clean acc | "
        + " | ".join(f"{i} closed (acc change)" for i in INTERVENTIONS)
        + " | best / oracle best | criterion |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(reports, key=lambda r: r["seed"]):
        rows = {x["intervention"]: x for x in r["interventions"] if x["choice"] == "estimator"}
        v = r["verdict"]
        lines.append(
            f"| {r['seed']} | {r['audit']['blamed']} | {r['chosen']['oracle']} | "
            f"{r['biased_stage']} | {r['final']['identity_fpr_gap']:+.3f} | "
            f"{r['final']['clean_accuracy']:.3f} | "
            + " | ".join(
                f"{rows[i]['gap_closed']:.2f} ({rows[i]['clean_accuracy_change']:+.3f})"
                for i in INTERVENTIONS
            )
            + f" | {v['share_of_oracle']:.2f} | {'met' if v['passed'] else 'not met'} |"
        )
    named = sum(r["audit"]["blamed"] == r["biased_stage"] for r in reports)
    passed = sum(r["verdict"]["passed"] for r in reports)
    lines += [
        "",
        f"The audit named the biased stage in {named} of {len(reports)} runs; the criterion "
        f"was met in {passed} of {len(reports)}.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m experiments.toxicity_report DIR [DIR ...]``: the table over the runs."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    reports = [json.loads(p.read_text()) for d in args.dirs for p in sorted(d.rglob("report.json"))]
    if not reports:
        where = ", ".join(str(d) for d in args.dirs)
        print(
            f"stagetrace: error: no report.json under {where}. Fix: give the run directories of "
            "`python -m experiments.run experiment=toxicity`",
            file=sys.stderr,
        )
        return 2
    print(summary(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())

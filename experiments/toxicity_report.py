"""Gather ``toxicity`` runs into one table over seeds (docs/toxicity.md, docs/results.md).

``python -m experiments.toxicity_report DIR [DIR ...] [--out docs/results.md] [--figures DIR]``
reads every ``report.json`` under the directories and prints (and, with ``--out``, writes
between ``<!-- toxicity:start -->`` and ``<!-- toxicity:end -->``), per seed, the blamed, oracle
and biased stage, the final identity FPR gap and clean accuracy, the share of the gap each
intervention on the blamed stage closes (with its clean-accuracy change), the best one's share
of the oracle's best, and the criterion; then how often the audit named the biased stage and
the criterion was met; and a figure of the identity FPR gap before and after each intervention
on the estimator's, a random and the oracle's stage. Exit 2 without reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.sections import SectionError, provenance, publish
from experiments.tasks.toxicity import INTERVENTIONS

SECTION = "toxicity"
CHOICES = ("estimator", "random", "oracle")


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


def fidelity_table(reports: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each estimator and read-out against retraining on the per-example test loss, mean over
    the runs: Pearson per stage, and seconds against the truth's."""
    rows = [
        r for report in reports for r in report["fidelity"]["rows"] if r["behavior"] == "test_loss"
    ]
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    methods = list(dict.fromkeys((r["estimator"], r["readout"]) for r in rows))

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    lines = [
        "| estimator | read-out | "
        + " | ".join(f"Pearson: {s}" for s in stages)
        + " | x truth seconds | runs |",
        "|" + "---|" * (len(stages) + 4),
    ]
    for estimator, readout in methods:
        mine = [r for r in rows if (r["estimator"], r["readout"]) == (estimator, readout)]
        pearson = [mean([r["pearson"] for r in mine if r["stage"] == s]) for s in stages]
        runs = len(mine) // len(stages)
        lines.append(
            f"| {estimator} | {readout} | "
            + " | ".join(f"{p:.3f}" for p in pearson)
            + f" | {mean([r['cost_ratio'] for r in mine]):.3g} | {runs} |"
        )
    return lines


def plot_gaps(reports: Sequence[Mapping[str, Any]], path: Path) -> None:
    """The identity FPR gap of the final model and after each intervention, per stage choice,
    one point per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CHOICES), figsize=(3.2 * len(CHOICES), 2.8), sharey=True)
    for ax, choice in zip(axes, CHOICES, strict=True):
        for i, r in enumerate(sorted(reports, key=lambda r: r["seed"])):
            rows = {x["intervention"]: x for x in r["interventions"] if x["choice"] == choice}
            gaps = [r["final"]["identity_fpr_gap"]] + [
                rows[k]["metrics"]["identity_fpr_gap"] for k in INTERVENTIONS
            ]
            ax.plot(range(len(gaps)), gaps, marker="o", alpha=0.7, label=f"seed {r['seed']}")
            if i == 0:
                ax.set_xticks(range(len(gaps)), ["final", *INTERVENTIONS], fontsize=8)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{choice}'s stage", fontsize=9)
    axes[0].set_ylabel("identity FPR gap", fontsize=8)
    axes[-1].legend(fontsize=6)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def section(dirs: Sequence[Path], figures: Path, out: Path | None, command: str) -> str:
    """The Markdown section: provenance, the table over seeds, the figure."""
    reports = [json.loads(p.read_text()) for d in dirs for p in sorted(d.rglob("report.json"))]
    if not reports:
        where = ", ".join(str(d) for d in dirs)
        raise SectionError(
            f"no report.json under {where}. Fix: give the run directories of "
            "`python -m experiments.run experiment=toxicity`",
            status=2,
        )
    figures.mkdir(parents=True, exist_ok=True)
    figure = figures / "toxicity_gaps.png"
    plot_gaps(reports, figure)
    relative = Path(os.path.relpath(figure, out.parent if out else Path.cwd()))
    lines = provenance(
        "### Toxicity: naming the stage that taught identity-term bias, and undoing it (generated)",
        f"from {len(reports)} runs by the command below.",
        command,
    )
    return "\n".join(
        [
            *lines,
            "",
            summary(reports),
            "",
            f"![Identity FPR gap per intervention]({relative})",
            "",
            "Estimators against retraining on this pipeline (per-example test loss, mean over "
            "the runs; seconds include the read-out):",
            "",
            *fidelity_table(reports),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m experiments.toxicity_report DIR [DIR ...] [--out FILE] [--figures DIR]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="Markdown file holding the two marker lines")
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"))
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "experiments.toxicity_report", *argv])
    return publish(args.out, SECTION, lambda: section(args.dirs, args.figures, args.out, command))


if __name__ == "__main__":
    sys.exit(main())

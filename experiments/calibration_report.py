"""Calibrate the audit's reliability labels against the truth (docs/design.md, section 5b).

``python -m experiments.calibration_report DIR [DIR ...] [--out docs/results.md]`` reads every
fidelity run under the directories (``fidelity.json`` beside a ``trajectory/``), audits it as
``stagetrace audit`` would with the subset replay ``auto`` uses (``choice.subset_replay``; the
same embeddings, stored by the run, and the label's check: the agreement of its independent
replicas), and compares each stage's label with the truth the run measured: the per-example
Pearson of the estimate (evaluated read-out, per-example test loss) and whether the sign of the
mean effect is right. It prints, and with ``--out`` writes between
``<!-- calibration:start -->`` and ``<!-- calibration:end -->``, one table row per label: how
many stage estimates got it, how often Pearson >= 0.9, how often the sign was right. Then, for
the aggregate behaviours (group means and gaps) of runs that hold the noise ceiling's
retrainings: in how many stage effects the recorded retraining and the reshuffled ones agree on
the sign, how often the estimate's sign is right there, and how often the estimate orders the
stages as the truth does. Last, what ``stagetrace audit RUN`` itself chooses on each run at the
default budget (``choice.plan``), the retraining's seconds predicted as if nothing were stored.
Exit 2 without runs."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribution.analysis import metrics
from attribution.analysis.audit import audit, load_behaviors
from attribution.analysis.behaviors import Behavior
from attribution.analysis.choice import DEFAULT_BUDGET, LABELS, plan, subset_replay
from attribution.record.counterfactual import skip_stage_shuffled
from attribution.record.evaluation import final_model
from attribution.record.trajectory import Trajectory
from experiments.sections import SectionError, provenance, publish

SECTION = "calibration"
ESTIMATOR = subset_replay().label
"""The subset replay ``auto`` answers with, as the fidelity study's rows name it."""
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
    labels = audit(traj, subset_replay(), behaviors).labels
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


@dataclass(frozen=True)
class Aggregate:
    """One group output of one run: per stage, whether the recorded and the reshuffled
    retrainings agree on the sign of its effect and whether the estimate's sign is right; and
    whether the estimate ranks the stages as the truth does."""

    run: str
    output: str
    agreed: dict[str, bool]
    sign_right: dict[str, bool]
    ranking_right: bool
    estimated: dict[str, float]
    true: dict[str, float]

    def hybrid_ranking_right(self) -> bool:
        """Whether the stages are ordered as the truth orders them when every stage after the
        first is the truth (``auto``'s answer when their retraining fits beside the first
        stage's subset replay) and the first the estimate."""
        first = next(iter(self.true))
        mixed = [self.estimated[s] if s == first else t for s, t in self.true.items()]
        return metrics.same_ranking(np.array(mixed), np.array(list(self.true.values())))


def aggregates(run: Path) -> list[Aggregate]:
    """The group outputs of one run whose noise-ceiling retrainings it holds (seeds listed in
    ``fidelity.json``); none when it has no ceiling or no group rows."""
    result = json.loads((run / "fidelity.json").read_text())
    ceiling = result.get("ceiling") or {}
    rows = [
        r
        for r in result.get("group_rows", [])
        if r["estimator"] == ESTIMATOR and r["readout"] == "evaluated"
    ]
    if not rows or not ceiling.get("seeds"):
        return []
    traj = Trajectory.open(run / "trajectory")
    behaviors = load_behaviors(run / "behaviors.yaml")
    model = final_model(traj)
    reshuffled = {
        stage: [model.at(skip_stage_shuffled(traj, stage, s).state) for s in ceiling["seeds"]]
        for stage in traj.names
    }
    out = []
    for name in dict.fromkeys(r["behavior"] for r in rows):
        behavior: Behavior = behaviors[name]
        final = behavior.values(model)
        draws = {s: [behavior.values(m) for m in models] for s, models in reshuffled.items()}
        for output in dict.fromkeys(r["output"] for r in rows if r["behavior"] == name):
            mine = {r["stage"]: r for r in rows if r["output"] == output}
            agreed = {
                stage: all(
                    math.copysign(1, final[output] - d[output]) == math.copysign(1, row["true"])
                    for d in draws[stage]
                )
                for stage, row in mine.items()
            }
            out.append(
                Aggregate(
                    str(run),
                    output,
                    agreed,
                    {s: r["sign_right"] for s, r in mine.items()},
                    all(r["ranking_matches"] for r in mine.values()),
                    {s: r["estimated"] for s, r in mine.items()},
                    {s: r["true"] for s, r in mine.items()},
                )
            )
    return out


def aggregate_table(found: Sequence[Aggregate], labels: Mapping[tuple[str, str], str]) -> list[str]:
    """Signs where the truth's retrainings agree, by the stage's label (``labels`` by run and
    stage; the last stage is ``exact``), and stage rankings, over every group output."""
    agreed = [(a, s) for a in found for s, ok in a.agreed.items() if ok]
    lines = [
        "| label | stage effects whose sign the truth's retrainings agree on | estimate's sign "
        "right there |",
        "|---|---|---|",
    ]
    for label in (*LABELS, "all"):
        mine = [(a, s) for a, s in agreed if label in ("all", labels.get((a.run, s), "exact"))]
        right = sum(a.sign_right[s] for a, s in mine)
        share = f"{right} ({right / len(mine):.0%})" if mine else "-"
        lines.append(f"| {label} | {len(mine)} | {share} |")
    ranked = sum(a.ranking_right for a in found)
    total = sum(len(a.agreed) for a in found)
    first = [(a, s) for a, s in agreed if s == next(iter(a.true))]
    first_right = sum(a.sign_right[s] for a, s in first)
    hybrid = sum(a.hybrid_ranking_right() for a in found)
    return [
        *lines,
        "",
        f"{len(found)} aggregate outputs (run x output), {total} stage effects of which the "
        f"truth's retrainings agree in sign on {len(agreed)}; the estimate orders the stages as "
        f"the truth does for {ranked} of the {len(found)} outputs ({ranked / len(found):.0%}).",
        "",
        "With the truth for every stage after the first (what `auto` answers when retraining "
        "without them fits the budget beside the first stage's subset replay, "
        "`docs/design.md`, section 5b): the first stage's sign right in "
        f"{first_right} of the {len(first)} effects on which the truth's retrainings agree "
        f"({first_right / len(first):.0%}), the stages ordered as the truth orders them for "
        f"{hybrid} of the {len(found)} outputs ({hybrid / len(found):.0%}).",
    ]


@dataclass(frozen=True)
class Pick:
    """What ``stagetrace audit`` (``--estimator auto``, default budget) chooses for one run,
    and the retraining seconds it predicted."""

    run: str
    estimator: str
    truth_seconds: float


def pick(run: Path) -> Pick:
    """The audit's choice on one fidelity run, as ``stagetrace audit RUN`` makes it (the
    retraining's seconds predicted from timed steps, as if nothing were stored)."""
    chosen = plan(Trajectory.open(run / "trajectory", cache=False))
    return Pick(str(run), chosen.estimator, chosen.predicted_seconds.get("truth", math.nan))


def picks_lines(picks: Sequence[Pick], grouped: Sequence[Aggregate]) -> list[str]:
    """What the audit chooses across the runs, and what that means for the aggregates."""
    chosen = {p.estimator for p in picks}
    seconds = [p.truth_seconds for p in picks]
    lines = [
        f"What `stagetrace audit RUN` chooses (`--estimator auto`, the default budget of "
        f"{DEFAULT_BUDGET:g} s) on these {len(picks)} runs: "
        + ", ".join(f"`{e}` for {sum(p.estimator == e for p in picks)}" for e in sorted(chosen))
        + f", retraining predicted at {min(seconds):.1f}-{max(seconds):.1f} s."
    ]
    if chosen == {"truth"} and grouped:
        agreed = sum(ok for a in grouped for ok in a.agreed.values())
        lines.append(
            f"Its aggregate effects are then the truth's: the sign right for all {agreed} stage "
            "effects on which the truth's retrainings agree, and the stages ordered as the "
            f"truth orders them for all {len(grouped)} outputs. Below the truth's predicted "
            f"seconds it answers as the tables above say (`{ESTIMATOR}`, with the truth for "
            "the later stages whose retraining fits)."
        )
    return lines


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
    grouped = [a for run in runs for a in aggregates(run)]
    picks = [pick(run) for run in runs]
    if not found:
        raise SectionError(
            f"no fidelity run with {ESTIMATOR} rows under {', '.join(map(str, dirs))}. Fix: run "
            "`python -m experiments.run -m experiment=fidelity ...` with subset among the "
            "estimators first",
            status=2,
        )
    detail = [
        "| run | stage | label | agreement of the replicas | Pearson | sign right |",
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
            f"Aggregate behaviours ({ESTIMATOR}, evaluated read-out; the truth's retrainings: "
            "the recorded one and the noise ceiling's reshuffled ones):",
            "",
            *(
                aggregate_table(grouped, {(c.run, c.stage): c.label for c in found})
                if grouped
                else ["(no run holds group rows and a ceiling)"]
            ),
            "",
            *picks_lines(picks, grouped),
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

"""Gather fidelity runs (``experiment=fidelity``, usually a Hydra multirun) into the study's report.

``python -m experiments.fidelity_report DIR [DIR ...] [--out docs/results.md] [--figures DIR]``
reads every ``fidelity.json`` under the given directories and writes, between the lines
``<!-- fidelity:start -->`` and ``<!-- fidelity:end -->`` of ``--out``:

- the default configuration's table (mean over seeds) and the check of the study's targets;
- a summary across the sweep per estimator, read-out and stage;
- fidelity per later-stage optimizer, model and stage count;
- the regime map: fidelity against the skipped stage's displacement and the later stages'
  learning-rate mass, over the learning-rate scales of the later stages;
- figures (fidelity against cost; the regime map) under ``--figures``.

Every number is computed here from the runs' files; effects follow the sign convention
effect = f(with stage) - f(without stage).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.sections import SectionError, provenance, publish

SECTION = "fidelity"
DEFAULT = {"model": "MLP", "stages": 3, "later": "sgd_momentum", "lr_scale": 1.0}
BEHAVIOR = "test_loss"
CHEAP = 0.1  # "cheap": at most this fraction of the ground truth's seconds
TARGET = 0.95
GENTLE = 0.1  # the regime map's gentlest scale of the later stages' learning rates
Row = dict[str, Any]


def load_runs(dirs: Iterable[Path]) -> list[Row]:
    """Every row of every ``fidelity.json`` under ``dirs``, each with its run's knobs."""
    rows = []
    for directory in dirs:
        for path in sorted(Path(directory).rglob("fidelity.json")):
            run = json.loads(path.read_text())
            for row in run["rows"]:
                rows.append({**row, **run["knobs"], "run": str(path.parent)})
    return rows


def select(rows: Iterable[Row], **where: Any) -> list[Row]:
    """The rows whose fields equal every given value."""
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def mean(values: Iterable[float]) -> float:
    """Mean over the finite values (NaN when there are none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def grouped(rows: Sequence[Row], keys: Sequence[str]) -> dict[tuple, list[Row]]:
    """Rows grouped by the values of ``keys``, in first-seen order."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    return dict(groups)


def fmt(value: float, spec: str = "{:.3f}") -> str:
    return "–" if value is None or not math.isfinite(value) else spec.format(value)


def table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(cells) + " |" for cells in lines),
    ]


def metric_table(rows: Sequence[Row]) -> list[str]:
    """Mean metrics per estimator, read-out and stage (baselines and peers included), with the
    number of runs averaged; "of ceiling": Pearson over the noise ceiling's (runs that measured
    it)."""
    header = ["estimator", "read-out", "stage", "Pearson", "Spearman", "sign", "mean-effect error"]
    header += ["top stage", "seconds", "× truth seconds", "of ceiling", "runs"]
    lines = []
    for (estimator, readout, stage), group in grouped(
        rows, ["estimator", "readout", "stage"]
    ).items():
        lines.append(
            [
                estimator,
                readout,
                stage,
                fmt(mean(r["pearson"] for r in group)),
                fmt(mean(r["spearman"] for r in group)),
                fmt(mean(r["sign_agreement"] for r in group)),
                fmt(mean(r["mean_effect_error"] for r in group), "{:+.4f}"),
                fmt(mean(r["top_stage_agreement"] for r in group)),
                fmt(mean(r["seconds"] for r in group), "{:.3g}"),
                fmt(mean(r["cost_ratio"] for r in group), "{:.3g}"),
                fmt(mean(r.get("pearson_of_ceiling", math.nan) for r in group)),
                str(len({r["run"] for r in group})),
            ]
        )
    return table(header, lines)


def targets(rows: Sequence[Row]) -> list[str]:
    """The study's targets checked on the default configuration, in words and numbers."""
    out = []
    for stage in ("finetune", "adapt"):
        stage_rows = select(rows, stage=stage, behavior=BEHAVIOR)
        cheap = [
            (key, group)
            for key, group in grouped(stage_rows, ["estimator", "readout"]).items()
            if key[0] != "random" and mean(r["cost_ratio"] for r in group) <= CHEAP
        ]
        if not cheap:
            out.append(f"- `{stage}`: no estimator cost at most {CHEAP} of the ground truth.")
            continue
        (estimator, readout), group = max(cheap, key=lambda kg: mean(r["pearson"] for r in kg[1]))
        pearson, sign = mean(r["pearson"] for r in group), mean(r["sign_agreement"] for r in group)
        met = "met" if pearson >= TARGET and sign >= TARGET else "NOT met"
        out.append(
            f"- `{stage}`: the best estimator costing at most {CHEAP} × the ground truth is "
            f"`{estimator}` ({readout}), Pearson {pearson:.3f}, sign agreement {sign:.3f}, at "
            f"{mean(r['cost_ratio'] for r in group):.3g} × the truth's seconds: target "
            f"(≥ {TARGET} both) {met}."
        )
    e3_labels = [e for e in _estimators(rows) if e.startswith("e3")]
    earlier = sorted({r["stage"] for r in rows}, key=_stage_order)[:-1]  # the last is exact
    for stage in earlier:
        e2 = select(rows, estimator="e2", stage=stage, behavior=BEHAVIOR)
        for e3_label in e3_labels:
            e3 = select(rows, estimator=e3_label, stage=stage, behavior=BEHAVIOR)
            if not e2 or not e3:
                continue
            for readout in sorted({r["readout"] for r in e3}):
                p2 = mean(r["pearson"] for r in select(e2, readout=readout))
                p3 = mean(r["pearson"] for r in select(e3, readout=readout))
                ratio = mean(r["seconds"] for r in e3) / mean(r["seconds"] for r in e2)
                close = "within" if p3 >= p2 - 0.05 else "NOT within"
                out.append(
                    f"- `{stage}`, {readout}: `{e3_label}` Pearson {p3:.3f} against E2 {p2:.3f} "
                    f"({close} 0.05) at {ratio:.3g} × E2's seconds."
                )
    return out


AUDIT_COST = 0.25  # the audit's estimate: at most this fraction of the truth's seconds


def audit_targets(rows: Sequence[Row]) -> list[str]:
    """Per configuration (optimizer, rate scale, stage count) of the per-example test-loss
    rows: whether an estimator costing at most ``AUDIT_COST`` of the truth's seconds reaches
    Pearson >= ``TARGET`` on `finetune` and >= ``TARGET`` of the noise ceiling on `pretrain`;
    and the estimator that comes closest on both at any cost, with its cost."""
    out = []
    for (later, scale, stages), config in sorted(
        grouped(rows, ["later", "lr_scale", "stages"]).items(), key=str
    ):
        scores = {}
        for key, group in grouped(config, ["estimator", "readout"]).items():
            finetune = mean(r["pearson"] for r in select(group, stage="finetune"))
            pretrain = mean(
                r.get("pearson_of_ceiling", math.nan) for r in select(group, stage="pretrain")
            )
            if key[0] != "random" and not math.isnan(finetune) and not math.isnan(pretrain):
                scores[key] = (finetune, pretrain, mean(r["cost_ratio"] for r in group))
        if not scores:
            continue

        cheap = [k for k in scores if scores[k][2] <= AUDIT_COST]
        seeds = len({r["seed"] for r in config})
        seeds_text = f"{seeds} seed{'s' * (seeds > 1)}"
        head = f"- `later={later}`, `lr_scale={scale:g}`, {stages} stages ({seeds_text}):"
        if cheap:
            best = max(cheap, key=lambda k: min(scores[k][:2]))
            finetune, pretrain, cost = scores[best]
            met = "met" if min(finetune, pretrain) >= TARGET else "NOT met"
            head += (
                f" costing at most {AUDIT_COST} × the truth, the best is `{best[0]}` ({best[1]}): "
                f"finetune Pearson {finetune:.3f}, pretrain {pretrain:.3f} of the ceiling, at "
                f"{cost:.3g} × the truth's seconds: target (≥ {TARGET} both) {met}."
            )
        else:
            head += f" no estimator cost at most {AUDIT_COST} × the truth."
        best = max(scores, key=lambda k: min(scores[k][:2]))
        finetune, pretrain, cost = scores[best]
        out.append(
            f"{head} At any cost, the closest is `{best[0]}` ({best[1]}): finetune {finetune:.3f}, "
            f"pretrain {pretrain:.3f} of the ceiling, at {cost:.3g} × the truth's seconds."
        )
    return out


def per_knob_table(rows: Sequence[Row], knob: str, readout: str) -> list[str]:
    """Mean Pearson per value of ``knob`` (rows) and estimator (columns), per stage."""
    estimators = [e for e in _estimators(rows) if e != "random"]
    header = [knob, "stage", *estimators, "runs"]
    lines = []
    for (value, stage), group in sorted(
        grouped(rows, [knob, "stage"]).items(),
        key=lambda kg: (str(kg[0][0]), _stage_order(kg[0][1])),
    ):
        cells = []
        for estimator in estimators:
            chosen = select(group, estimator=estimator, readout=_readout_of(estimator, readout))
            cells.append(fmt(mean(r["pearson"] for r in chosen)))
        lines.append([str(value), stage, *cells, str(len({r["run"] for r in group}))])
    return table(header, lines)


def regime_table(rows: Sequence[Row], readout: str) -> list[str]:
    """Per learning-rate scale and stage: the regime quantities, the noise ceiling (Pearson of
    retraining under reshuffled later batch orders against the recorded counterfactual; "–"
    for runs without it) and each estimator's Pearson."""
    estimators = [e for e in _estimators(rows) if e != "random"]
    header = ["lr scale", "stage", "‖δ‖/‖θ_T‖", "later lr mass", "later mass/(1-μ)", "ceiling"]
    header += estimators
    lines = []
    for (scale, stage), group in sorted(
        grouped(rows, ["lr_scale", "stage"]).items(),
        key=lambda kg: (kg[0][0], _stage_order(kg[0][1])),
    ):
        cells = [
            fmt(
                mean(
                    r["pearson"]
                    for r in select(group, estimator=e, readout=_readout_of(e, readout))
                )
            )
            for e in estimators
        ]
        lines.append(
            [
                f"{scale:g}",
                stage,
                fmt(mean(r["relative_displacement"] for r in group), "{:.3g}"),
                fmt(mean(r["later_lr_mass"] for r in group), "{:.3g}"),
                fmt(mean(r["later_effective_mass"] for r in group), "{:.3g}"),
                fmt(_ceiling(group)),
                *cells,
            ]
        )
    return table(header, lines)


def architectures(rows: Sequence[Row]) -> list[Row]:
    """The default optimizer and scale's rows, labelled by model and stage count."""
    chosen = select(rows, later=DEFAULT["later"], lr_scale=DEFAULT["lr_scale"])
    return [dict(r, architecture=f"{r['model']}, {r['stages']} stages") for r in chosen]


def plot_cost(rows: Sequence[Row], path: Path) -> None:
    """Fidelity (Pearson, per-example test loss) against cost (× ground-truth seconds)."""
    plt = _pyplot()
    stages = sorted({r["stage"] for r in rows}, key=_stage_order)
    methods = [k for k in grouped(rows, ["estimator", "readout"]) if k[0] != "random"]
    colours = dict(zip(methods, plt.cm.tab20.colors, strict=False))
    fig, axes = plt.subplots(1, len(stages), figsize=(3.4 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        for key, group in grouped(select(rows, stage=stage), ["estimator", "readout"]).items():
            if key not in colours:
                continue
            xs = [max(r["cost_ratio"], 1e-4) for r in group]
            ys = [r["pearson"] for r in group]
            ax.scatter(xs, ys, s=10, color=colours[key], label=" ".join(key), alpha=0.7)
        ax.set_xscale("log")
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("seconds / ground-truth seconds", fontsize=8)
        ax.axhline(TARGET, color="grey", linewidth=0.6, linestyle="--")
        ax.axvline(CHEAP, color="grey", linewidth=0.6, linestyle=":")
    axes[0][0].set_ylabel("Pearson with the truth", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _save(fig, path)


def plot_regime(rows: Sequence[Row], path: Path, readout: str) -> None:
    """The regime map: per estimator, each (run, stage) placed by its later stages' effective
    learning-rate mass and its own relative displacement, coloured by Pearson."""
    plt = _pyplot()
    estimators = [e for e in _estimators(rows) if e != "random"]
    fig, axes = plt.subplots(
        1, len(estimators), figsize=(3.0 * len(estimators), 3.0), squeeze=False, sharey=True
    )
    scatter = None
    for ax, estimator in zip(axes[0], estimators, strict=True):
        chosen = [
            r
            for r in select(rows, estimator=estimator, readout=_readout_of(estimator, readout))
            if r["later_effective_mass"] > 0 and math.isfinite(r["pearson"])
        ]
        if chosen:
            scatter = ax.scatter(
                [r["later_effective_mass"] for r in chosen],
                [r["relative_displacement"] for r in chosen],
                c=[r["pearson"] for r in chosen],
                cmap="viridis",
                vmin=0.0,
                vmax=1.0,
                s=16,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{estimator} ({_readout_of(estimator, readout)})", fontsize=8)
        ax.set_xlabel("later lr mass / (1 - momentum)", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("‖δ_k‖ / ‖θ_T‖", fontsize=8)
    if scatter is not None:
        fig.colorbar(scatter, ax=axes[0].tolist(), label="Pearson", shrink=0.8)
    _save(fig, path)


def render(
    rows: Sequence[Row], command: str, figures: Path, out: Path | None, name: str = SECTION
) -> str:
    """The Markdown section ``name`` (its figures are named after it)."""
    loss_rows = select(rows, behavior=BEHAVIOR)
    default = select(loss_rows, **DEFAULT)
    relative = figures.relative_to(out.parent) if out is not None else figures
    runs = len({r["run"] for r in rows})
    lines = [
        *provenance(
            "## The fidelity study (generated)"
            if name == SECTION
            else f"## The fidelity study: `{name}` (generated)",
            f"from {runs} runs by the command below, after the sweeps listed above it; every "
            "number comes from the runs' `fidelity.json` files.",
            command,
        ),
        "",
        "### Default configuration (mean over seeds, per-example test loss)",
        "",
        f"`experiment=fidelity` ({', '.join(f'{k}={v}' for k, v in DEFAULT.items())}).",
        "",
        *metric_table(default),
        "",
        "Targets (on the default configuration):",
        "",
        *targets(default),
        "",
        f"The same checks with the later stages' rates scaled by {GENTLE} "
        f"(`later.lr_scale={GENTLE}`):",
        "",
        *targets(select(loss_rows, **{**DEFAULT, "lr_scale": GENTLE})),
        "",
        f"The audit's estimate (docs/design.md, section 5b): an estimator costing at most "
        f"{AUDIT_COST} × the truth's seconds with Pearson ≥ {TARGET} on `finetune` and ≥ "
        f"{TARGET} of the noise ceiling on `pretrain`, per configuration (mean over its runs; "
        "runs without a ceiling are left out):",
        "",
        *(audit_targets(select(loss_rows, model="MLP")) or ["(no run with a noise ceiling)"]),
        "",
        "### Summary across the sweep (mean over every run, per-example test loss)",
        "",
        *metric_table(loss_rows),
        "",
        "### Per-example test margin, across the sweep",
        "",
        *metric_table(select(rows, behavior="test_margin")),
        "",
        "### Pearson by later-stage optimizer (evaluated read-out; TracIn and the peers their own)",
        "",
        *per_knob_table(
            select(loss_rows, lr_scale=1.0, model="MLP", stages=3), "later", "evaluated"
        ),
        "",
        "### Pearson by model and stage count (evaluated read-out; TracIn and the peers their own)",
        "",
        *per_knob_table(architectures(loss_rows), "architecture", "evaluated"),
        "",
        "### Regime map (evaluated read-out; TracIn and the peers their own)",
        "",
        *regime_table(select(loss_rows, model="MLP", stages=3, later="sgd_momentum"), "evaluated"),
        "",
        f"![Fidelity against cost]({relative / f'{name}_cost.png'})",
        "",
        f"![Regime map]({relative / f'{name}_regime.png'})",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the report; exit 0, or 2 (bad ``--out``, or no runs found)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m experiments.fidelity_report", description=__doc__
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="directories holding fidelity runs")
    parser.add_argument("--out", type=Path, help="Markdown file holding the two marker lines")
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"))
    parser.add_argument(
        "--section", default=SECTION, help=f"the marker name in --out (default {SECTION})"
    )
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "experiments.fidelity_report", *argv])
    return publish(
        args.out,
        args.section,
        lambda: report(args.dirs, args.figures, args.out, command, args.section),
    )


def report(
    dirs: Sequence[Path], figures: Path, out: Path | None, command: str, name: str = SECTION
) -> str:
    """Read the runs under ``dirs``, draw the figures into ``figures``, render section
    ``name``."""
    rows = load_runs(dirs)
    if not rows:
        raise SectionError(
            f"no fidelity.json under {', '.join(map(str, dirs))}. Fix: run "
            "`python -m experiments.run -m experiment=fidelity ...` first",
            status=2,
        )
    figures.mkdir(parents=True, exist_ok=True)
    loss_rows = select(rows, behavior=BEHAVIOR)
    plot_cost(loss_rows, figures / f"{name}_cost.png")
    plot_regime(loss_rows, figures / f"{name}_regime.png", "evaluated")
    return render(rows, command, figures, out, name)


def _ceiling(rows: Sequence[Row]) -> float:
    """The mean noise ceiling over the runs among ``rows`` (one value per run and stage)."""
    per_run = {
        (r["run"], r["stage"]): r["ceiling_pearson"]
        for r in rows
        if math.isfinite(r.get("ceiling_pearson", math.nan))
    }
    return mean(per_run.values())


def _estimators(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r["estimator"] for r in rows))


def _readout_of(estimator: str, readout: str) -> str:
    """Baselines and peers have one read-out of their own."""
    own = {"tracin": "linear", "random": "-", "gradsim": "linear", "ekfac": "influence"}
    return own.get(estimator, readout)


def _stage_order(stage: str) -> int:
    order = ["pretrain", "finetune", "refine", "adapt"]
    return order.index(stage) if stage in order else len(order)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""The fidelity study: how close each estimator comes to real skip-stage retraining, at what cost.

One run records a pipeline, retrains it without each stage (the truth), and scores every
estimator, read-out and baseline against that truth per example of the test set. It writes
``fidelity.json`` (rows of metrics, the regime quantities of every stage, the run's knobs and the
sign convention), ``fidelity.md`` (the table) and, with ``plots``, ``scatter_<behaviour>.png``.
``experiments.fidelity_report`` gathers many runs (a Hydra multirun) into the summary, the regime
map and the plots of ``docs/results.md``.

With ``ceiling: R`` (2 in the study's config) the run also retrains without each stage under R
reshuffled orders of the later stages' batches (``attribution.analysis.validate.noise_ceiling``):
the noise ceiling, written under ``ceiling`` in ``fidelity.json`` and beside every row
(``ceiling_pearson``, ``pearson_of_ceiling``, ``pearson_expected``).

``peers`` (``[gradsim, ekfac]`` in the study's config) adds the rows of what a user would try
instead (``experiments.peers``, ``docs/baselines.md``): final-checkpoint TracIn and Kronfluence's
EK-FAC influence summed over each stage's examples. ekfac needs the optional extra ``peers``; a
run that asks for it without Kronfluence is refused before any work.

Effects follow the project's sign convention: effect_k(f) = f(theta_T) - f(theta_T^(-k)).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from attribution.analysis.behaviors import Behavior
from attribution.analysis.validate import (
    Ceiling,
    FidelityRow,
    fidelity_rows,
    noise_ceiling,
    true_effects,
    validate,
)
from attribution.record import SIGN_CONVENTION
from attribution.record.errors import StagetraceError
from attribution.record.pipeline import run_pipeline
from attribution.record.trajectory import Trajectory
from estimators import build_all
from estimators.base import final_parameter_names, stage_displacement
from estimators.tracin import tracin_effects
from experiments.peers import check_peers, peer_rows
from experiments.tasks.setup import Task, write_result

log = logging.getLogger(__name__)

COLUMNS = (
    ("estimator", "estimator", "{}"),
    ("readout", "read-out", "{}"),
    ("stage", "stage", "{}"),
    ("pearson", "Pearson", "{:.3f}"),
    ("spearman", "Spearman", "{:.3f}"),
    ("sign_agreement", "sign", "{:.3f}"),
    ("mean_effect_error", "mean-effect error", "{:+.4f}"),
    ("top_stage_agreement", "top stage", "{:.3f}"),
    ("seconds", "seconds", "{:.2f}"),
    ("cost_ratio", "× truth", "{:.3f}"),
    ("ceiling_pearson", "ceiling", "{:.3f}"),
    ("pearson_of_ceiling", "of ceiling", "{:.3f}"),
)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Record, retrain without each stage, score every estimator; write the run's results."""
    settings = cfg.get("settings")
    estimators = build_all(
        list(cfg.estimators), OmegaConf.to_container(settings, resolve=True) if settings else {}
    )
    peers = list(cfg.get("peers") or [])
    peer_settings = cfg.get("peer_settings")
    peer_settings = OmegaConf.to_container(peer_settings, resolve=True) if peer_settings else {}
    check_peers(peers, peer_settings)  # e.g. ekfac without Kronfluence: refused before any work
    task = Task.prepare(cfg, run_dir)
    config, behaviors, logger = task.config, task.behaviors, task.logger
    traj = run_pipeline(task.spec, run_dir / "trajectory", task.progress())
    log.info("recorded %s; retraining without each stage and scoring the estimators", traj.names)
    batch_size = config["evaluation"]["batch_size"]
    truth = true_effects(traj, behaviors, batch_size)
    repeats = config.get("ceiling", 0)
    noise = noise_ceiling(traj, behaviors, truth, repeats, batch_size) if repeats else None
    rows, group_rows, failures = [], [], {}
    effects: dict[str, Any] = {
        "truth": {
            name: {s: v.numpy() for s, v in truth.effects[name].items()}
            for name, b in behaviors.items()
            if b.aggregate == "per_example"
        }
    }
    for name, estimator in estimators.items():
        try:
            result = validate(
                traj,
                [name],
                config["readouts"],
                behaviors,
                batch_size,
                {name.partition(":")[0]: estimator.settings()},
                keep_effects=True,
                truth=truth,
                noise=noise,
            )
        except StagetraceError as exc:  # e.g. a coarse replay that diverged: report, go on
            log.warning("%s failed: %s", estimator.label, exc)
            failures[estimator.label] = str(exc)
            continue
        rows += result.rows
        group_rows += result.group_rows
        effects.update(result.effects or {})
    rows += baseline_rows(
        traj, behaviors, effects, config["baselines"], truth.seconds, batch_size, noise
    )
    found, failed = peer_rows(
        traj, behaviors, effects, peers, truth.seconds, batch_size, noise, peer_settings
    )
    rows += found
    failures |= failed
    regime = regime_quantities(traj)
    table_rows = [{**asdict(row), **regime[row.stage]} for row in rows]
    out = {
        "sign_convention": SIGN_CONVENTION,
        "knobs": knobs(config, traj),
        "ground_truth_seconds": truth.seconds,
        "ceiling": noise.to_json() if noise is not None else None,
        "regime": regime,
        "failures": failures,
        "rows": table_rows,
        "group_rows": [asdict(row) for row in group_rows],
    }
    write_result(run_dir, "fidelity.json", json.dumps(out, indent=1, allow_nan=True) + "\n")
    table = format_table(table_rows, "test_loss")
    write_result(run_dir, "fidelity.md", table + "\n")
    logger.table("fidelity", table_rows)
    print(table)
    if config.get("plots", True):
        for name in effects["truth"]:
            scatter(effects, name, run_dir / f"scatter_{name}.png")
            logger.image(f"scatter/{name}", run_dir / f"scatter_{name}.png")
    logger.log(
        {
            f"fidelity/{r.estimator}/{r.readout}/{r.behavior}/{r.stage}/pearson": r.pearson
            for r in rows
        }
    )
    logger.finish()
    return out


def baseline_rows(
    traj: Trajectory,
    behaviors: Mapping[str, Behavior],
    effects: dict[str, Any],
    baselines: Sequence[str],
    truth_seconds: float,
    batch_size: int,
    noise: Ceiling | None = None,
) -> list[FidelityRow]:
    """Rows of the baselines: stage TracIn (linear, over the checkpoints recorded in each stage)
    and a random choice of the most accountable stage (only its top-stage agreement is defined).
    ``effects`` gains TracIn's per-example effects under ``"tracin:linear"``; with the noise
    ceiling ``noise``, TracIn's rows are also scored against it."""
    unknown = sorted(set(baselines) - {"tracin", "random"})
    if unknown:
        raise ValueError(f"unknown baselines {unknown}. Fix: use tracin and/or random")
    rows: list[FidelityRow] = []
    for name, behavior in behaviors.items():
        if name not in effects["truth"]:
            continue
        truth = {s: torch.from_numpy(v) for s, v in effects["truth"][name].items()}
        if "tracin" in baselines:
            inputs, targets, _ = behavior.load()
            began = time.perf_counter()
            estimated = tracin_effects(traj, inputs, targets, behavior.quantity, batch_size)
            seconds = time.perf_counter() - began
            effects.setdefault("tracin:linear", {})[name] = {
                s: v.numpy() for s, v in estimated.items()
            }
            rows += fidelity_rows(
                "tracin", "linear", name, estimated, truth, seconds, truth_seconds, noise
            )
        if "random" in baselines:
            rows += random_stage_rows(name, truth)
    return rows


def random_stage_rows(behavior: str, truth: Mapping[str, torch.Tensor]) -> list[FidelityRow]:
    """The top-stage agreement of naming a uniformly random stage for every example (seed 0):
    the floor any estimator must beat (about 1 / number of stages)."""
    stages = list(truth)
    true_top = np.abs(np.stack([truth[s].numpy() for s in stages])).argmax(0)
    guess = np.random.default_rng(0).integers(len(stages), size=true_top.shape)
    agreement = float(np.mean(guess == true_top))
    nan = float("nan")
    return [
        FidelityRow(
            estimator="random",
            readout="-",
            behavior=behavior,
            stage=stage,
            pearson=nan,
            spearman=nan,
            sign_agreement=nan,
            mean_effect_true=float(truth[stage].mean()),
            mean_effect_error=nan,
            top_stage_agreement=agreement,
            seconds=0.0,
            cost_ratio=0.0,
        )
        for stage in stages
    ]


def regime_quantities(traj: Trajectory) -> dict[str, dict[str, float]]:
    """Per stage: the norm of its displacement ``|delta_k|`` (absolute and relative to
    ``|theta_T|``), and the learning-rate mass of the stages after it: the sum of their per-step
    rates (mean over parameter groups), raw and divided by ``1 - momentum`` (heavy ball)."""
    names = final_parameter_names(traj)
    final = traj.checkpoint(len(traj.stages) - 1, "end")
    final_norm = math.sqrt(sum(float(final[n].double().square().sum()) for n in names))
    masses = []
    for j, record in enumerate(traj.stages):
        sums = traj.steps(j).lr.sum(0).tolist()
        gains = [1.0 / (1.0 - g.hyper.get("momentum", 0.0)) for g in record.groups]
        effective = [s * g for s, g in zip(sums, gains, strict=True)]
        masses.append((float(np.mean(sums)), float(np.mean(effective))))
    out = {}
    for k, record in enumerate(traj.stages):
        delta = stage_displacement(traj, k, names, buffers=False)
        norm = math.sqrt(sum(float(v.square().sum()) for v in delta.values()))
        out[record.name] = {
            "displacement": norm,
            "relative_displacement": norm / final_norm,
            "later_lr_mass": sum(m for m, _ in masses[k + 1 :]),
            "later_effective_mass": sum(e for _, e in masses[k + 1 :]),
        }
    return out


def knobs(config: Mapping[str, Any], traj: Trajectory) -> dict[str, Any]:
    """What distinguishes this run within a sweep."""
    return {
        "model": config["model"]["target"].rpartition(":")[2],
        "stages": len(traj.stages),
        "later": config["later"]["name"],
        "lr_scale": config["later"]["lr_scale"],
        "seed": config["seed"],
    }


def format_table(rows: Sequence[Mapping[str, Any]], behavior: str) -> str:
    """The Markdown table of one behaviour's rows."""
    chosen = [r for r in rows if r["behavior"] == behavior]
    lines = [
        f"Fidelity on `{behavior}` (per example; effect = f(with stage) - f(without stage))",
        "",
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in chosen:
        cells = [
            "–" if isinstance(row[k], float) and math.isnan(row[k]) else fmt.format(row[k])
            for k, _, fmt in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scatter(effects: Mapping[str, Any], behavior: str, path: Path) -> None:
    """Estimated against true per-example effects: one row of panels per estimator and read-out,
    one column per stage, the diagonal drawn for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = effects["truth"][behavior]
    stages = list(truth)
    methods = [m for m in effects if m != "truth" and behavior in effects[m]]
    fig, axes = plt.subplots(
        len(methods), len(stages), figsize=(2.6 * len(stages), 2.2 * len(methods)), squeeze=False
    )
    for i, method in enumerate(methods):
        for j, stage in enumerate(stages):
            ax, x, y = axes[i][j], truth[stage], effects[method][behavior][stage]
            ax.scatter(x, y, s=2, alpha=0.4)
            low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            ax.plot([low, high], [low, high], color="grey", linewidth=0.8)
            ax.set_title(f"{method} · {stage}", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.supxlabel("true effect (retraining)", fontsize=8)
    fig.supylabel("estimated effect", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

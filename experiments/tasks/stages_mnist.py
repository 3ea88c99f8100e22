"""Train a multi-stage MNIST pipeline, record it, and measure each stage's true effect.

The effect of stage k on a metric is ``metric(final model) - metric(model retrained without
stage k)`` (the project's sign convention): a positive effect on test loss means the stage raised
the loss. Results go to ``ground_truth.json`` beside the trajectory in the Hydra run directory.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from attribution.record import SIGN_CONVENTION
from attribution.record.counterfactual import skip_stage
from attribution.record.evaluation import final_model
from attribution.record.pipeline import run_pipeline
from attribution.record.references import Ref, load_dataset
from attribution.record.trajectory import Trajectory
from experiments.evaluation import Metrics, evaluate
from experiments.tasks.setup import Task

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Record the pipeline under ``run_dir/trajectory``; with ``ground_truth``, skip each stage."""
    task = Task.prepare(cfg, run_dir)
    config, logger = task.config, task.logger
    began = time.perf_counter()
    traj = run_pipeline(task.spec, run_dir / "trajectory", task.progress())
    log.info(
        "recorded %d stages in %.1f s -> %s",
        len(traj.stages),
        time.perf_counter() - began,
        traj.root,
    )
    result: dict[str, Any] = {"trajectory": str(traj.root)}
    if cfg.ground_truth:
        result = ground_truth(
            traj,
            Ref.from_dict(config["evaluation"]["data"], "evaluation.data"),
            config["evaluation"]["batch_size"],
        )
        (run_dir / "ground_truth.json").write_text(json.dumps(result, indent=2) + "\n")
        print(format_table(result))
    logger.finish()
    return result


def ground_truth(traj: Trajectory, data: Ref, batch_size: int) -> dict[str, Any]:
    """Test loss and accuracy of the final model and of each skip-stage retraining."""
    test = load_dataset(data)
    model = final_model(traj)
    final = evaluate(model, test, batch_size)
    stages = []
    for record in traj.stages:
        log.info("retraining without stage %s", record.name)
        cf = skip_stage(traj, record.name)
        without = evaluate(model.at(cf.state), test, batch_size)
        stages.append(
            {
                "stage": record.name,
                "kind": record.kind,
                "with": vars(final),
                "without": vars(without),
                "effect": _effect(final, without),
                "retrain_seconds": cf.seconds,
                "reused": cf.reused,
            }
        )
    return {
        "sign_convention": SIGN_CONVENTION,
        "evaluation_data": data.to_dict(),
        "trajectory": str(traj.root),
        "final": vars(final),
        "stages": stages,
    }


def format_table(result: dict[str, Any]) -> str:
    """The per-stage effect table, as printed by the demo."""
    lines = [
        f"{'stage':<10}{'loss with':>11}{'without':>10}{'effect':>10}"
        f"{'acc with':>11}{'without':>10}{'effect':>10}{'retrain s':>11}"
    ]
    for row in result["stages"]:
        w, wo, e = row["with"], row["without"], row["effect"]
        lines.append(
            f"{row['stage']:<10}{w['loss']:>11.4f}{wo['loss']:>10.4f}{e['loss']:>+10.4f}"
            f"{w['accuracy']:>11.4f}{wo['accuracy']:>10.4f}{e['accuracy']:>+10.4f}"
            f"{row['retrain_seconds']:>11.2f}"
        )
    lines.append(
        "effect = metric(final model) - metric(retrained without the stage); "
        "loss effect > 0: the stage raised the test loss (blame)."
    )
    return "\n".join(lines)


def _effect(final: Metrics, without: Metrics) -> dict[str, float]:
    return {"loss": final.loss - without.loss, "accuracy": final.accuracy - without.accuracy}

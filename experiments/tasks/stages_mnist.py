"""Train a multi-stage MNIST pipeline, record it, and measure each stage's true effect.

The effect of stage k on a metric is ``metric(final model) - metric(model retrained without
stage k)`` (the project's sign convention): a positive effect on test loss means the stage raised
the loss. Results go to ``ground_truth.json`` beside the trajectory in the Hydra run directory,
with ``report.html`` (``docs/report.md``): the declared behaviours audited with the truth.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from attribution.analysis.audit import audit
from attribution.analysis.report import examples_of, write_report
from attribution.record import SIGN_CONVENTION
from attribution.record.counterfactual import skip_stage
from attribution.record.errors import SpecError
from attribution.record.evaluation import final_model
from attribution.record.references import Ref, load_dataset
from attribution.record.trajectory import Trajectory
from experiments.evaluation import Metrics, evaluate
from experiments.tasks.setup import Task, write_result

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Record the pipeline under ``run_dir/trajectory``; with ``ground_truth``, skip each stage."""
    task = Task.check(cfg, run_dir)
    if not isinstance(task.config.get("ground_truth"), bool):
        raise SpecError(
            "ground_truth",
            f"expected true or false, got {task.config.get('ground_truth')!r}",
            "write ground_truth=true or ground_truth=false",
        )
    evaluation = Ref.from_dict(task.config["evaluation"]["data"], "evaluation.data")
    task = task.start()
    config, logger = task.config, task.logger
    traj = task.record()
    result: dict[str, Any] = {"trajectory": str(traj.root)}
    if config["ground_truth"]:
        batch_size = config["evaluation"]["batch_size"]
        result = ground_truth(traj, evaluation, batch_size, task)
        path = write_result(run_dir, "ground_truth.json", json.dumps(result, indent=2) + "\n")
        log.info("true effect of each stage on the test set:\n%s", format_table(result))
        logger.table("ground_truth", table_rows(result))
        logger.log({f"effect/{r['stage']}/loss": r["effect"]["loss"] for r in result["stages"]})
        log.info("wrote %s", path)
        if task.behaviors:  # the retrainings are stored: an exact audit costs evaluations only
            audited = audit(traj, "truth", task.behaviors, batch_size=batch_size)
            shown = examples_of(task.behaviors)
            log.info("wrote %s", write_report(run_dir, audited, traj, examples=shown))
    logger.finish()
    return result


def ground_truth(
    traj: Trajectory, data: Ref, batch_size: int, task: Task | None = None
) -> dict[str, Any]:
    """Test loss and accuracy of the final model and of each skip-stage retraining (whose
    progress ``task`` logs, when given)."""
    test = load_dataset(data)
    model = final_model(traj)
    final = evaluate(model, test, batch_size)
    stages = []
    for record in traj.stages:
        log.info("retraining without stage %s", record.name)
        progress = task.progress(f"without {record.name}") if task else None
        cf = skip_stage(traj, record.name, progress)
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
    """The per-stage effect table, as logged (to the console and run.log)."""
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


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The effect table as flat rows (for the logger)."""
    return [
        {
            "stage": row["stage"],
            "loss_with": row["with"]["loss"],
            "loss_without": row["without"]["loss"],
            "loss_effect": row["effect"]["loss"],
            "accuracy_with": row["with"]["accuracy"],
            "accuracy_without": row["without"]["accuracy"],
            "accuracy_effect": row["effect"]["accuracy"],
            "retrain_seconds": row["retrain_seconds"],
        }
        for row in result["stages"]
    ]


def _effect(final: Metrics, without: Metrics) -> dict[str, float]:
    return {"loss": final.loss - without.loss, "accuracy": final.accuracy - without.accuracy}

"""Find the stage that taught a shortcut, and remove it (DESIGN.md section 4).

One run records a pipeline in which one stage carries a spurious marker, then:

1. **audit**: the chosen estimator's stage effects on per-group test losses, on the mean loss of
   the groups the marker misleads (marker contradicting the label) and on their gap to the other
   groups (effect = f(with stage) - f(without stage): a positive effect means the stage raised
   the misled groups' loss). The blamed stage is the one of largest effect on the misled loss.
   (The gap alone would blame any stage whose removal wrecks the model: a wrecked model has no
   gap.)
2. **truth**: retraining without each stage gives each stage's true effects; the oracle stage is
   the one of largest true effect on the misled loss.
3. **interventions** on the blamed, a random (seeded) and the oracle stage: *undo* (theta_T +
   SE_k, no training), *skip* (rerun the later stages without it) and *filter* (drop the stage's
   most harmful training examples by within-stage attribution, rerun it and the later stages),
   each measured by worst-group and average test accuracy and by seconds. For filter, the share
   of dropped examples that carry the shortcut (marker agreeing with a noisy label that the digit
   contradicts) against random dropping of the same number.

It writes ``report.json`` (everything, with the sign convention) and ``report.md`` (the human
report) in the run directory and prints the report. ``experiments.spurious_report`` gathers
runs over seeds into ``docs/results.md``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from attribution.analysis.audit import audit, estimator_for, final_model
from attribution.analysis.interventions import (
    Intervention,
    filter_and_rerun,
    most_harmful,
    random_drop,
    skip,
    undo,
)
from attribution.record import SIGN_CONVENTION
from attribution.record.evaluation import per_example
from attribution.record.pipeline import run_pipeline
from attribution.record.references import Ref, load_dataset
from attribution.record.trajectory import Trajectory
from estimators import StageEmbeddings, stored_embeddings
from estimators.within_stage import example_scores
from experiments.data import mnist
from experiments.tasks.setup import Task

log = logging.getLogger(__name__)

CHOICES = ("estimator", "random", "oracle")


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Record the pipeline, audit it, intervene; write and print the report."""
    task = Task.prepare(cfg, run_dir)
    config, behaviors, logger = task.config, task.behaviors, task.logger
    log.info("[1/4] training the pipeline")
    traj = run_pipeline(task.spec, run_dir / "trajectory", task.progress())
    settings = config["audit"]
    misled = behaviors[settings["behavior"]].groups
    test = GroupData.of(
        Ref.from_dict(config["evaluation"]["data"], "evaluation.data"),
        sorted({g for ids in (misled or {}).values() for g in ids}),
    )

    log.info("[2/4] audit with %s (%s read-out)", settings["estimator"], settings["readout"])
    estimator = estimator_for(
        settings["estimator"],
        traj,
        (config.get("settings") or {}).get(settings["estimator"].partition(":")[0]),
    )
    embeddings, _ = stored_embeddings(estimator, traj)
    audited = audit(traj, settings["estimator"], behaviors, settings["readout"])
    estimated = {
        name: {s: audited["behaviors"][name]["effects"][s][0] for s in traj.names}
        for name in (settings["behavior"], "shortcut_gap")
    }
    blamed = max(traj.names, key=estimated[settings["behavior"]].__getitem__)

    log.info("[3/4] ground truth: retraining without each stage")
    model, params = final_model(traj)
    final = test.accuracy(model, params)
    truth = {}
    for stage in traj.names:
        skipped = skip(traj, stage)
        without = _params(skipped.state, params)
        truth[stage] = {
            "misled_loss": test.misled_loss(model, params) - test.misled_loss(model, without),
            "shortcut_gap": test.gap(model, params) - test.gap(model, without),
            "seconds": skipped.seconds,
        }
    oracle = max(truth, key=lambda s: truth[s]["misled_loss"])
    rng = np.random.default_rng(config["interventions"]["random_seed"])
    chosen = {"estimator": blamed, "random": str(rng.choice(traj.names)), "oracle": oracle}

    log.info("[4/4] interventions on %s", chosen)
    behaviour = test.misled_function(model)
    outcomes = []
    for choice, stage in chosen.items():
        log.info("interventions on %s (%s choice)", stage, choice)
        outcomes += intervene(
            traj,
            stage,
            choice,
            embeddings,
            behaviour,
            config["interventions"]["filter_fraction"],
            int(rng.integers(2**31)),
            Scorer(test, model, params),
        )
    report = {
        "sign_convention": SIGN_CONVENTION,
        "seed": config["seed"],
        "stages": traj.names,
        "audit": {
            "estimator": settings["estimator"],
            "readout": settings["readout"],
            "embedding_seconds": embeddings.seconds,
            "effects": estimated,
            "group_loss_effect": {
                s: dict(
                    zip(
                        audited["behaviors"]["group_loss"]["outputs"],
                        audited["behaviors"]["group_loss"]["effects"][s],
                        strict=True,
                    )
                )
                for s in traj.names
            },
            "blamed": blamed,
        },
        "truth": truth,
        "chosen": chosen,
        "final": final,
        "interventions": outcomes,
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    text = format_report(report)
    (run_dir / "report.md").write_text(text + "\n")
    print(text)
    logger.finish()
    return report


class GroupData:
    """A labelled test set with group ids (``2 * label + marker``), scored by group; ``misled``
    are the ids of the groups the shortcut misleads."""

    def __init__(self, inputs: Tensor, labels: Tensor, groups: Tensor, misled: list[int]) -> None:
        if not misled:
            raise ValueError(
                "the audit behaviour names no groups. Fix: point audit.behavior at a group_mean "
                "behaviour over the misled groups, e.g. groups: {misled: [1, 2]}"
            )
        self.inputs, self.labels, self.groups = inputs, labels, groups
        self.against = torch.isin(groups, torch.tensor(misled))

    @classmethod
    def of(cls, ref: Ref, misled: list[int]) -> GroupData:
        inputs, labels, groups = load_dataset(ref).tensors
        return cls(inputs, labels, groups, misled)

    def accuracy(self, model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Any]:
        """Average accuracy, accuracy per group and the worst group's."""
        with torch.no_grad():
            logits = torch.func.functional_call(model, dict(params), (self.inputs,))
        correct = (logits.argmax(-1) == self.labels).double()
        per_group = {
            int(g): float(correct[self.groups == g].mean()) for g in self.groups.unique().tolist()
        }
        return {
            "average": float(correct.mean()),
            "worst_group": min(per_group.values()),
            "groups": per_group,
        }

    def misled_loss(self, model: nn.Module, params: Mapping[str, Tensor]) -> float:
        """Mean test loss of the groups the marker misleads (nats)."""
        with torch.no_grad():
            return float(self.misled_function(model)(dict(params)))

    def gap(self, model: nn.Module, params: Mapping[str, Tensor]) -> float:
        """Mean test loss of the misled groups minus that of the others (nats)."""
        with torch.no_grad():
            losses = per_example(model, params, self.inputs, self.labels, "loss")
        return float(losses[self.against].mean() - losses[~self.against].mean())

    def misled_function(self, model: nn.Module) -> Callable[[dict[str, Tensor]], Tensor]:
        """The misled groups' mean loss as a differentiable function of the final parameters."""

        def misled(params: Mapping[str, Tensor]) -> Tensor:
            losses = per_example(model, params, self.inputs, self.labels, "loss")
            return losses[self.against].mean()

        return misled


@dataclass(frozen=True)
class Scorer:
    """Scores a model state on the grouped test set, against the final model's parameters."""

    test: GroupData
    model: nn.Module
    params: Mapping[str, Tensor]

    def row(self, done: Intervention, choice: str) -> dict[str, Any]:
        accuracy = self.test.accuracy(self.model, _params(done.state, self.params))
        return {
            "intervention": done.kind,
            "choice": choice,
            "stage": done.stage,
            "worst_group": accuracy["worst_group"],
            "average": accuracy["average"],
            "groups": accuracy["groups"],
            "seconds": done.seconds,
        }


def intervene(
    traj: Trajectory,
    stage: str,
    choice: str,
    embeddings: StageEmbeddings,
    behaviour: Callable[[dict[str, Tensor]], Tensor],
    fraction: float,
    seed: int,
    scorer: Scorer,
) -> list[dict[str, Any]]:
    """The three interventions on ``stage``, each a row with accuracies and seconds (undo's
    include computing the embedding; filter's include scoring the stage's examples)."""
    undone = undo(traj, embeddings, stage)
    rows = [scorer.row(undone, choice)]
    rows[-1]["seconds"] += embeddings.seconds
    rows.append(scorer.row(skip(traj, stage), choice))
    scores = example_scores(traj, stage, behaviour)
    drop = most_harmful(scores, fraction)
    filtered = filter_and_rerun(traj, stage, drop)
    row = scorer.row(filtered, choice)
    row["seconds"] += scores.seconds
    carriers = shortcut_carriers(traj, stage)
    random = random_drop(scores.uses, fraction, seed)
    row["dropped"] = len(drop)
    row["dropped_carrier_share"] = float(carriers[drop].double().mean())
    row["random_carrier_share"] = float(carriers[random].double().mean())
    return [*rows, row]


def shortcut_carriers(traj: Trajectory, stage: str) -> Tensor:
    """Per example of the stage's data: whether it carries the shortcut, i.e. its marker agrees
    with its (noisy) label while its digit contradicts that label, so only the marker explains
    it. These are the examples that make the shortcut pay; filtering should find them."""
    data = traj.stages[traj.index(stage)].data
    kwargs = data.kwargs
    if kwargs.get("source", "mnist") != "mnist":
        raise ValueError(f"shortcut carriers are defined for MNIST sources, not {data}")
    _, labels, groups = load_dataset(data).tensors
    digits = mnist(split=kwargs["split"], start=kwargs.get("start") or 0, stop=kwargs.get("stop"))
    clean = (digits.tensors[1] >= 5).long()
    return (groups % 2 == labels) & (labels != clean)


def format_report(report: Mapping[str, Any]) -> str:
    """The human report: attribution per stage, then the interventions."""
    audit_part = report["audit"]
    lines = [
        f"# Shortcut audit (seed {report['seed']})",
        "",
        f"Sign convention: {report['sign_convention']}",
        "",
        f"Estimator {audit_part['estimator']} ({audit_part['readout']} read-out) against "
        "retraining without each stage: effects on the mean test loss of the groups the marker "
        "misleads, and on its gap to the other groups (nats; > 0: the stage raised it).",
        "",
        "| stage | misled loss: estimated | true | gap: estimated | true |",
        "|---|---|---|---|---|",
        *(
            f"| {s} | {audit_part['effects']['misled_loss'][s]:+.4f} | "
            f"{report['truth'][s]['misled_loss']:+.4f} | "
            f"{audit_part['effects']['shortcut_gap'][s]:+.4f} | "
            f"{report['truth'][s]['shortcut_gap']:+.4f} |"
            for s in report["stages"]
        ),
        "",
        f"Blamed stage: **{audit_part['blamed']}**; oracle (truth): "
        f"**{report['chosen']['oracle']}**; random choice: {report['chosen']['random']}.",
        "",
        f"Final model: worst-group accuracy {report['final']['worst_group']:.3f}, average "
        f"{report['final']['average']:.3f}.",
        "",
        "| intervention | choice | stage | worst-group acc | average acc | seconds |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['intervention']} | {r['choice']} | {r['stage']} | {r['worst_group']:.3f} | "
            f"{r['average']:.3f} | {r['seconds']:.1f} |"
            for r in report["interventions"]
        ),
    ]
    filters = [r for r in report["interventions"] if r["intervention"] == "filter"]
    if filters:
        lines += ["", "Filtering: share of dropped examples that carry the shortcut", ""]
        lines += [
            f"- {r['choice']} ({r['stage']}): {r['dropped_carrier_share']:.3f} of {r['dropped']} "
            f"dropped, random dropping {r['random_carrier_share']:.3f}"
            for r in filters
        ]
    return "\n".join(lines)


def _params(state: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: state[n] for n in params}

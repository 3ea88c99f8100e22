"""Find the stage that taught a shortcut, and remove it (docs/interventions.md).

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

Every setting is checked before any training (``check_audit``). It writes ``report.json``
(everything, with the sign convention), ``report.md`` (the human report, which says what each
intervention does) and the audit's ``report.html`` (``docs/report.md``) in the run directory,
prints the report and then the path of ``report.md``.
With ``logger=offline`` the effects and the interventions are logged as tables.
``experiments.spurious_report`` gathers runs over seeds into ``docs/results.md``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from torch import Tensor

from attribution.analysis.audit import audit, check_readouts
from attribution.analysis.behaviors import Behavior
from attribution.analysis.interventions import (
    Intervention,
)
from attribution.analysis.report import examples_of, write_report
from attribution.record import SIGN_CONVENTION
from attribution.record.errors import SpecError, StagetraceError
from attribution.record.evaluation import ModelAt, final_model
from attribution.record.references import Ref, load_dataset
from attribution.record.trajectory import Trajectory
from estimators import Estimator, build_all, check_evidence, stored_embeddings
from experiments.logger import NullLogger, WandbLogger
from experiments.tasks.removal import intervene, true_effects
from experiments.tasks.setup import Task, write_result

log = logging.getLogger(__name__)

CHOICES = ("estimator", "random", "oracle")


GAP = "shortcut_gap"
"""The behaviour whose effects are reported beside the audited one (the misled groups' gap)."""


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Record the pipeline, audit it, intervene; write and print the report."""
    task = Task.check(cfg, run_dir)
    estimator = check_audit(task.config, task.behaviors)
    task = task.start()
    config, behaviors, logger = task.config, task.behaviors, task.logger
    settings = config["audit"]
    tracked = (settings["behavior"], GAP)
    log.info("[1/4] training the pipeline")
    traj = task.record()
    batch_size = config["evaluation"]["batch_size"]
    test = GroupData.of(Ref.from_dict(config["evaluation"]["data"], "evaluation.data"))

    log.info("[2/4] audit with %s (%s read-out)", estimator.label, settings["readout"])
    check_evidence([estimator], traj)
    embeddings, _ = stored_embeddings(estimator, traj)  # the audit and undo use these
    audited = audit(traj, embeddings, behaviors, settings["readout"], batch_size)
    estimated = {
        name: {s: audited.behaviors[name].effects[s][0] for s in traj.names} for name in tracked
    }
    blamed = max(traj.names, key=estimated[settings["behavior"]].__getitem__)

    log.info("[3/4] ground truth: retraining without each stage")
    model = final_model(traj)
    final = test.accuracy(model, batch_size)
    truth = true_effects(traj, behaviors, tracked, model, batch_size, task.progress)
    oracle = max(truth, key=lambda s: truth[s][settings["behavior"]])
    rng = np.random.default_rng(config["interventions"]["random_seed"])
    chosen = {"estimator": blamed, "random": str(rng.choice(traj.names)), "oracle": oracle}

    log.info(
        "[4/4] interventions (undo, skip, filter) on the blamed stage %s, a random stage %s "
        "and the oracle's stage %s",
        blamed,
        chosen["random"],
        oracle,
    )
    behaviour = behaviors[settings["behavior"]].scalar(model)
    outcomes = []
    scorer = Scorer(test, model, batch_size)
    for choice, stage in chosen.items():
        log.info("interventions on stage %s (%s)", stage, CHOSEN_BY[choice])
        outcomes += intervene(
            traj,
            stage,
            embeddings,
            behaviour,
            config["interventions"]["filter_fraction"],
            int(rng.integers(2**31)),
            partial(scorer.row, choice=choice),
            shortcut_carriers(traj, stage),
            task.progress,
        )
    group_loss = audited.behaviors.get("group_loss")
    report = {
        "sign_convention": SIGN_CONVENTION,
        "seed": config["seed"],
        "stages": traj.names,
        "audit": {
            "estimator": estimator.label,
            "readout": settings["readout"],
            "behavior": settings["behavior"],
            "embedding_seconds": embeddings.seconds,
            "effects": estimated,
            "labels": {s: dataclasses.asdict(audited.labels[s]) for s in traj.names},
            "group_loss_effect": {s: group_loss.of(s) for s in traj.names} if group_loss else {},
            "blamed": blamed,
        },
        "truth": truth,
        "chosen": chosen,
        "final": final,
        "filter_fraction": config["interventions"]["filter_fraction"],
        "interventions": outcomes,
    }
    write_result(run_dir, "report.json", json.dumps(report, indent=1) + "\n")
    text = format_report(report)
    path = write_result(run_dir, "report.md", text + "\n")
    log.info("wrote %s", write_report(run_dir, audited, traj, examples=examples_of(behaviors)))
    log_report(logger, report)
    logger.finish()
    print(text)
    print(f"\nreport: {path}")
    return report


CHOSEN_BY = {
    "estimator": "blamed by the audit",
    "random": "a random choice",
    "oracle": "the oracle's: largest true effect",
}
"""What each stage choice is, in words."""


def check_audit(config: Mapping[str, Any], behaviors: Mapping[str, Behavior]) -> Estimator:
    """Before any training: the estimator and its settings (settings for an estimator that is
    not run are refused), the read-out, the two behaviours the report follows (one number
    each) and the share of examples that filtering drops. Returns the estimator."""
    settings = config["audit"]
    try:
        estimator = build_all([settings["estimator"]], config.get("settings") or {})[
            settings["estimator"]
        ]
    except SpecError as exc:
        if exc.field == "estimator":
            raise _under("audit.estimator", exc) from exc
        raise _under(
            exc.field if exc.field.startswith("settings.") else f"settings.{exc.field}", exc
        ) from exc
    try:
        check_readouts([settings["readout"]])
    except StagetraceError as exc:
        raise _under("audit.readout", exc) from exc
    for name in (settings["behavior"], GAP):
        if name not in behaviors:
            raise SpecError(
                f"behaviors.{name}" if name == GAP else "audit.behavior",
                f"{name!r} is not a declared behaviour, and the shortcut report follows it "
                f"(declared: {', '.join(behaviors)})",
                f"name one of the declared behaviours, or declare {name} under behaviors "
                "(see conf/experiment/spurious_image.yaml)",
            )
        behaviors[name].check_scalar()
    fraction = config["interventions"]["filter_fraction"]
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction <= 1
    ):
        raise SpecError(
            "interventions.filter_fraction",
            f"{fraction!r} is not in (0, 1]",
            "give the share of the stage's examples to drop, e.g. 0.25",
        )
    return estimator


def log_report(logger: NullLogger | WandbLogger, report: Mapping[str, Any]) -> None:
    """The estimated and true effects per stage and the interventions, as tables."""
    audited = report["audit"]["behavior"]
    logger.table(
        "effects",
        [
            {
                "stage": stage,
                f"{audited}_estimated": report["audit"]["effects"][audited][stage],
                f"{audited}_true": report["truth"][stage][audited],
                f"{GAP}_estimated": report["audit"]["effects"][GAP][stage],
                f"{GAP}_true": report["truth"][stage][GAP],
            }
            for stage in report["stages"]
        ],
    )
    logger.table(
        "interventions",
        [{k: v for k, v in row.items() if k != "groups"} for row in report["interventions"]],
    )
    logger.log(
        {
            "final/worst_group": report["final"]["worst_group"],
            "final/average": report["final"]["average"],
        }
    )


@dataclass(frozen=True)
class GroupData:
    """A labelled test set with group ids (``2 * label + marker``), scored by group with the
    one evaluator (eval mode, the checkpoint's own buffers)."""

    inputs: Tensor
    labels: Tensor
    groups: Tensor

    @classmethod
    def of(cls, ref: Ref) -> GroupData:
        inputs, labels, groups = load_dataset(ref).tensors
        return cls(inputs, labels, groups)

    def accuracy(self, model: ModelAt, batch_size: int = 1000) -> dict[str, Any]:
        """Average accuracy, accuracy per group and the worst group's."""
        correct = model.values(self.inputs, self.labels, "correct", batch_size)
        per_group = {
            int(g): float(correct[self.groups == g].mean()) for g in self.groups.unique().tolist()
        }
        return {
            "average": float(correct.mean()),
            "worst_group": min(per_group.values()),
            "groups": per_group,
        }


@dataclass(frozen=True)
class Scorer:
    """Scores an intervened state on the grouped test set, as a state of the final model."""

    test: GroupData
    model: ModelAt
    batch_size: int = 1000

    def row(self, done: Intervention, choice: str) -> dict[str, Any]:
        accuracy = self.test.accuracy(self.model.at(done.state), self.batch_size)
        return {
            "intervention": done.kind,
            "choice": choice,
            "stage": done.stage,
            "worst_group": accuracy["worst_group"],
            "average": accuracy["average"],
            "groups": accuracy["groups"],
            "seconds": done.seconds,
        }


PLANTED = ("experiments.data:patch_mnist", "experiments.data:colored_mnist")
"""The shortcut builders: their labels are ``class >= 5`` of the source, flipped by noise."""


def shortcut_carriers(traj: Trajectory, stage: str) -> Tensor | None:
    """Per example of the stage's data: whether it carries the shortcut, i.e. its marker agrees
    with its (noisy) label while its image's class contradicts that label, so only the marker
    explains it. These are the examples that make the shortcut pay; filtering should find them.
    None (not known) for data other than the shortcut builders (CelebA, ChestX-ray14), where no
    label is known to be noise."""
    data = traj.stages[traj.index(stage)].data
    if data.target not in PLANTED:
        return None
    _, labels, groups = load_dataset(data).tensors
    _, clean, _ = load_dataset(Ref(data.target, {**data.kwargs, "label_noise": 0.0})).tensors
    return (groups % 2 == labels) & (labels != clean)


def format_report(report: Mapping[str, Any]) -> str:
    """The human report: attribution per stage, then the interventions."""
    audit_part = report["audit"]
    audited = audit_part["behavior"]
    lines = [
        f"# Shortcut audit (seed {report['seed']})",
        "",
        f"Sign convention: {report['sign_convention']}",
        "",
        f"Estimator {audit_part['estimator']} ({audit_part['readout']} read-out) against "
        "retraining without each stage: effects on the mean test loss of the groups the marker "
        "misleads, and on its gap to the other groups (nats; > 0: the stage raised it).",
        "",
        f"| stage | {audited}: estimated | true | gap: estimated | true | trust |",
        "|---|---|---|---|---|---|",
        *(
            f"| {s} | {audit_part['effects'][audited][s]:+.4f} | "
            f"{report['truth'][s][audited]:+.4f} | "
            f"{audit_part['effects'][GAP][s]:+.4f} | "
            f"{report['truth'][s][GAP]:+.4f} | {audit_part['labels'][s]['label']} |"
            for s in report["stages"]
        ),
        "",
        "Trust (how far each estimate may be trusted without the truth, docs/design.md 5b): "
        + "; ".join(f"{s}: {audit_part['labels'][s]['evidence']}" for s in report["stages"]),
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
        "",
        *explain_interventions(report),
    ]
    filters = [
        r
        for r in report["interventions"]
        if r["intervention"] == "filter" and r["dropped_carrier_share"] is not None
    ]
    if filters:
        lines += ["", "Filtering: share of dropped examples that carry the shortcut", ""]
        lines += [
            f"- {r['choice']} ({r['stage']}): {r['dropped_carrier_share']:.3f} of {r['dropped']} "
            f"dropped, random dropping {r['random_carrier_share']:.3f}"
            for r in filters
        ]
    return "\n".join(lines)


def explain_interventions(report: Mapping[str, Any]) -> list[str]:
    """One sentence for each intervention."""
    fraction = report.get("filter_fraction")
    share = f"the {fraction:.0%} " if isinstance(fraction, (int, float)) else ""
    return [
        "- **undo**: the final model moved by the stage's embedding (theta_T + SE_k), no "
        "training; its seconds include computing the embeddings.",
        "- **skip**: the stages after it retrained without the stage, on their recorded batches "
        "(the counterfactual itself).",
        f"- **filter**: the stage rerun without {share}of its training examples that raised "
        f"{report['audit']['behavior']} most (by their first-order effect through the later "
        "stages), then the stages after it as recorded; its seconds include scoring the examples.",
    ]


def _under(field: str, exc: StagetraceError) -> SpecError:
    """``exc`` as an error of the config key ``field``."""
    message = str(exc)
    if isinstance(exc, SpecError):
        message = message.removeprefix(f"{exc.field}: ")
    problem, _, fix = message.partition(". Fix: ")
    return SpecError(field, problem, fix or "correct the value")

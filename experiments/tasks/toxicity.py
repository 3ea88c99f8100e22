"""Find the stage that taught a toxicity classifier that an identity term means abuse, and
remove it (docs/toxicity.md).

One run records a pipeline whose fine-tuning data carries identity terms in most insults and
few other comments (``experiments.data.text``), then:

1. **audit**: the chosen estimator's stage effects on the mean test loss of the non-toxic
   comments that carry an identity term (the false-positive surrogate) and on its gap to the
   non-toxic comments without one (effect = f(with stage) - f(without stage): a positive effect
   means the stage raised it). The blamed stage is the one of largest effect on the surrogate
   (the gap alone would blame any stage whose removal wrecks the model).
2. **truth**: retraining without each stage; the oracle stage is the one of largest true effect
   on the surrogate.
3. **interventions** on the blamed, a random (seeded) and the oracle stage: undo, skip and filter
   (``docs/interventions.md``), each scored by the bias metrics of ``experiments.metrics_text``
   (accuracy, ROC AUC, per-subgroup AUCs and false-positive rates, the Jigsaw final score) and
   by the share of the identity false-positive-rate gap it closes. For filter, the share of the
   dropped examples that carry an injected identity term in an insult, against random dropping.
4. **fidelity**: every estimator of ``fidelity.estimators`` against the retraining
   (``attribution.analysis.validate``), with seconds.

It writes ``tokenizer.json``, ``report.json`` (everything, with the sign convention),
``report.md`` and the audit's ``report.html`` (``docs/report.md``, with the fidelity's scatter
plots) in the run directory and prints the report. ``python -m experiments.toxicity_report
DIR [DIR ...]`` gathers the runs under the directories into one table over seeds.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from attribution.analysis.audit import audit
from attribution.analysis.interventions import (
    Intervention,
)
from attribution.analysis.report import examples_of, write_report
from attribution.analysis.validate import validate
from attribution.record import SIGN_CONVENTION
from attribution.record.errors import SpecError
from attribution.record.evaluation import ModelAt, final_model
from attribution.record.pipeline import run_pipeline
from attribution.record.references import Ref, load_dataset
from attribution.record.trajectory import Trajectory
from estimators import build_all, check_evidence, stored_embeddings
from experiments.data.text import checked_terms, tokenizer
from experiments.metrics_text import BiasMetrics, bias_metrics
from experiments.tasks.removal import intervene, true_effects
from experiments.tasks.setup import Task, write_result

log = logging.getLogger(__name__)

GAP = "identity_fp_gap"
"""The behaviour reported beside the audited one: the surrogate's gap to comments without terms."""
INTERVENTIONS = ("undo", "skip", "filter")
MAX_ACCURACY_LOSS = 0.02
"""Clean accuracy an intervention may lose (2 points) and still count as the best one."""


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Record the pipeline, audit it, intervene, validate; write and print the report."""
    task = Task.check(cfg, run_dir)  # builds the behaviours' data: the comments are there
    config, behaviors = task.config, task.behaviors
    settings = config["audit"]
    wanted = list(dict.fromkeys([settings["estimator"], *config["fidelity"]["estimators"]]))
    built = build_all(wanted, config.get("settings") or {})
    estimator = built[settings["estimator"]]
    tracked = (settings["behavior"], GAP)
    for name in tracked:
        if name not in behaviors:
            raise SpecError(
                f"behaviors.{name}",
                "is not declared, and the toxicity report follows it",
                f"declare {name} under behaviors (see conf/experiment/toxicity.yaml)",
            )
        behaviors[name].check_scalar()
    text = config["text"]
    terms = checked_terms(text["terms"])
    task = task.start()
    logger = task.logger
    vocabulary = tokenizer(terms, text["vocab_size"], text["max_len"])
    write_result(run_dir, "tokenizer.json", json.dumps(vocabulary.to_json()) + "\n")

    log.info("[1/5] training the pipeline")
    began = time.perf_counter()
    traj = run_pipeline(task.spec, run_dir / "trajectory", task.progress())
    training_seconds = time.perf_counter() - began
    batch_size = config["evaluation"]["batch_size"]
    test = TextTest.of(Ref.from_dict(config["evaluation"]["data"], "evaluation.data"), terms)

    log.info("[2/5] audit with %s (%s read-out)", estimator.label, settings["readout"])
    check_evidence(built.values(), traj)
    embeddings, _ = stored_embeddings(estimator, traj)  # the audit and undo use these
    audited = audit(traj, embeddings, behaviors, settings["readout"], batch_size)
    estimated = {
        name: {s: audited.behaviors[name].effects[s][0] for s in traj.names} for name in tracked
    }
    blamed = max(traj.names, key=estimated[settings["behavior"]].__getitem__)

    log.info("[3/5] ground truth: retraining without each stage")
    model = final_model(traj)
    final = test.metrics(model, batch_size)
    truth = true_effects(traj, behaviors, tracked, model, batch_size, task.progress)
    oracle = max(truth, key=lambda s: truth[s][settings["behavior"]])
    rng = np.random.default_rng(config["interventions"]["random_seed"])
    chosen = {"estimator": blamed, "random": str(rng.choice(traj.names)), "oracle": oracle}

    log.info("[4/5] interventions on %s", chosen)
    behaviour = behaviors[settings["behavior"]].scalar(model)
    scorer = Scorer(test, model, final, batch_size)
    per_stage: dict[str, list[dict[str, Any]]] = {}
    control_seed = int(rng.integers(2**31))
    outcomes = []
    for choice, stage in chosen.items():
        if stage not in per_stage:  # the same stage gives the same interventions
            log.info("interventions on %s", stage)
            per_stage[stage] = intervene(
                traj,
                stage,
                embeddings,
                behaviour,
                config["interventions"]["filter_fraction"],
                control_seed,
                scorer.row,
                identity_insults(traj, stage),
                task.progress,
            )
        outcomes += [{**row, "choice": choice} for row in per_stage[stage]]

    log.info("[5/5] fidelity of %s against the retraining", ", ".join(wanted))
    validation = validate(
        traj,
        wanted,
        config["fidelity"]["readouts"],
        behaviors,
        batch_size,
        {name.partition(":")[0]: e.settings() for name, e in built.items()},
    )
    report = {
        "sign_convention": SIGN_CONVENTION,
        "seed": config["seed"],
        "stages": traj.names,
        "biased_stage": config["biased_stage"],
        "audit": {
            "estimator": estimator.label,
            "readout": settings["readout"],
            "behavior": settings["behavior"],
            "embedding_seconds": embeddings.seconds,
            "readout_seconds": audited.readout_seconds,
            "effects": estimated,
            "fp_loss_effect": {s: audited.behaviors["fp_loss"].of(s) for s in traj.names}
            if "fp_loss" in audited.behaviors
            else {},
            "blamed": blamed,
        },
        "truth": truth,
        "chosen": chosen,
        "final": final.to_json(),
        "interventions": outcomes,
        "verdict": verdict(final, outcomes),
        "fidelity": validation.to_json(),
        "training_seconds": training_seconds,
    }
    write_result(run_dir, "report.json", json.dumps(report, indent=1, allow_nan=True) + "\n")
    text_report = format_report(report)
    write_result(run_dir, "report.md", text_report + "\n")
    shown = examples_of(behaviors)
    log.info("wrote %s", write_report(run_dir, audited, traj, validation, examples=shown))
    print(text_report)
    logger.finish()
    return report


@dataclass(frozen=True)
class TextTest:
    """The madlibs test set: token ids, labels, group ids ``2 * identity + label`` (identity 0:
    no inserted term) and the identity groups' names, scored with the one evaluator."""

    inputs: Tensor
    labels: Tensor
    groups: Tensor
    names: dict[int, str]

    @classmethod
    def of(cls, ref: Ref, terms: Mapping[str, Sequence[str]]) -> TextTest:
        inputs, labels, groups = load_dataset(ref).tensors
        names = checked_terms(terms)  # numbered in this order
        return cls(inputs, labels, groups, {1 + i: g for i, g in enumerate(names)})

    def scores(self, model: ModelAt, batch_size: int = 1000) -> np.ndarray:
        """Probability of the toxic class: sigmoid of logit 1 minus logit 0, obtained from the
        evaluator's margin (true-class logit minus the other) signed by the label."""
        margin = model.values(self.inputs, self.labels, "margin", batch_size)
        return torch.sigmoid(margin * (2 * self.labels - 1)).numpy()

    def metrics(self, model: ModelAt, batch_size: int = 1000) -> BiasMetrics:
        return bias_metrics(
            self.labels.numpy(),
            self.scores(model, batch_size),
            (self.groups // 2).numpy(),
            self.names,
        )


@dataclass(frozen=True)
class Scorer:
    """Scores an intervened state on the test set, as a state of the final model, beside the
    final model's metrics ``final``."""

    test: TextTest
    model: ModelAt
    final: BiasMetrics
    batch_size: int = 1000

    def row(self, done: Intervention) -> dict[str, Any]:
        after = self.test.metrics(self.model.at(done.state), self.batch_size)
        return {
            "intervention": done.kind,
            "stage": done.stage,
            "metrics": after.to_json(),
            "gap_closed": closed(self.final.identity_fpr_gap, after.identity_fpr_gap),
            "clean_accuracy_change": after.clean_accuracy - self.final.clean_accuracy,
            "seconds": done.seconds,
        }


def closed(before: float, after: float) -> float:
    """Share of the identity FPR gap an intervention closes: ``(before - after) / before``
    (1: closed, 0: unchanged, < 0: widened); NaN when there was no gap to close."""
    return (before - after) / before if before > 0 else math.nan


def identity_insults(traj: Trajectory, stage: str) -> Tensor:
    """Per example of the stage's data: whether it is an insult carrying an injected identity
    term (group ``2 * identity + 1`` with identity > 0), the examples that teach the bias."""
    _, labels, groups = load_dataset(traj.stages[traj.index(stage)].data).tensors
    return (labels == 1) & (groups >= 2)


def best(outcomes: Sequence[Mapping[str, Any]], choice: str) -> Mapping[str, Any]:
    """The intervention on ``choice``'s stage that closes most of the gap among those losing
    at most ``MAX_ACCURACY_LOSS`` clean accuracy (if none does, among all)."""
    rows = [r for r in outcomes if r["choice"] == choice]
    kept = [r for r in rows if r["clean_accuracy_change"] >= -MAX_ACCURACY_LOSS] or rows
    return max(kept, key=lambda r: -math.inf if math.isnan(r["gap_closed"]) else r["gap_closed"])


def verdict(final: BiasMetrics, outcomes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Whether the best intervention on the estimator's choice closes at least 80% of the gap
    that the best on the oracle's closes, losing at most 2 points of clean accuracy."""
    mine, oracle = best(outcomes, "estimator"), best(outcomes, "oracle")
    share = mine["gap_closed"] / oracle["gap_closed"] if oracle["gap_closed"] > 0 else math.nan
    return {
        "gap_before": final.identity_fpr_gap,
        "best": mine["intervention"],
        "best_gap_closed": mine["gap_closed"],
        "oracle_best": oracle["intervention"],
        "oracle_gap_closed": oracle["gap_closed"],
        "share_of_oracle": share,
        "clean_accuracy_change": mine["clean_accuracy_change"],
        "passed": bool(share >= 0.8 and mine["clean_accuracy_change"] >= -MAX_ACCURACY_LOSS),
    }


def _metrics_line(m: Mapping[str, Any]) -> str:
    return (
        f"{m['accuracy']:.3f} | {m['clean_accuracy']:.3f} | {m['auc']:.3f} | {m['fpr']:.3f} | "
        f"{m['identity_fpr_gap']:+.3f} | {m['final_score']:.3f}"
    )


def format_report(report: Mapping[str, Any]) -> str:
    """The human report: attribution per stage, the final model's bias, the interventions,
    the verdict and the fidelity table."""
    audit_part = report["audit"]
    audited = audit_part["behavior"]
    final = report["final"]
    lines = [
        f"# Toxicity audit (seed {report['seed']})",
        "",
        f"Sign convention: {report['sign_convention']}",
        "",
        f"Estimator {audit_part['estimator']} ({audit_part['readout']} read-out) against "
        "retraining without each stage: effects on the mean test loss of the non-toxic comments "
        "carrying an identity term, and on its gap to those without one (nats; > 0: the stage "
        "raised it).",
        "",
        f"| stage | {audited}: estimated | true | gap: estimated | true |",
        "|---|---|---|---|---|",
        *(
            f"| {s} | {audit_part['effects'][audited][s]:+.4f} | "
            f"{report['truth'][s][audited]:+.4f} | "
            f"{audit_part['effects'][GAP][s]:+.4f} | {report['truth'][s][GAP]:+.4f} |"
            for s in report["stages"]
        ),
        "",
        f"Blamed stage: **{audit_part['blamed']}**; oracle (truth): "
        f"**{report['chosen']['oracle']}**; random choice: {report['chosen']['random']}; "
        f"the stage given the identity terms: {report['biased_stage']}.",
        "",
        "Final model, per identity subgroup (AUCs; FPR at 0.5 and its gap to the overall FPR):",
        "",
        "| subgroup | n | subgroup AUC | BPSN AUC | BNSP AUC | FPR | FPR gap |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {g['name']} | {g['size']} | {g['subgroup_auc']:.3f} | {g['bpsn_auc']:.3f} | "
            f"{g['bnsp_auc']:.3f} | {g['fpr']:.3f} | {g['fpr_gap']:+.3f} |"
            for g in final["subgroups"]
        ),
        "",
        "| model | choice | stage | accuracy | clean accuracy | AUC | FPR | identity FPR gap | "
        "final score | gap closed | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| final | | | {_metrics_line(final)} | | |",
        *(
            f"| {r['intervention']} | {r['choice']} | {r['stage']} | "
            f"{_metrics_line(r['metrics'])} | {r['gap_closed']:.2f} | {r['seconds']:.1f} |"
            for r in report["interventions"]
        ),
    ]
    v = report["verdict"]
    lines += [
        "",
        f"Best intervention on the estimator's choice: {v['best']}, closing "
        f"{v['best_gap_closed']:.2f} of the identity FPR gap ({v['gap_before']:+.3f}) against "
        f"the oracle's best ({v['oracle_best']}) {v['oracle_gap_closed']:.2f}: "
        f"{v['share_of_oracle']:.2f} of it, clean accuracy {v['clean_accuracy_change']:+.3f}; "
        f"criterion (>= 0.80 of the oracle's, <= 2 points lost): "
        f"**{'met' if v['passed'] else 'not met'}**.",
        "",
        "Filtering: share of dropped examples that are insults carrying an injected term",
        "",
        *(
            f"- {r['choice']} ({r['stage']}): {r['dropped_carrier_share']:.3f} of "
            f"{r['dropped']} dropped, random dropping {r['random_carrier_share']:.3f}"
            for r in report["interventions"]
            if r["intervention"] == "filter"
        ),
        "",
        *fidelity_table(report["fidelity"]),
    ]
    return "\n".join(lines)


def fidelity_table(fidelity: Mapping[str, Any]) -> list[str]:
    """Per estimator, read-out and stage: per-example fidelity against the retraining, and the
    audited behaviours' estimated and true effects; seconds against the retraining's."""
    lines = [
        f"Fidelity against retraining (truth: {fidelity['ground_truth_seconds']:.1f} s), per "
        "test example of test_loss:",
        "",
        "| estimator | read-out | stage | Pearson | Spearman | sign | mean-effect error | "
        "top stage | seconds | × truth |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['estimator']} | {r['readout']} | {r['stage']} | {r['pearson']:.3f} | "
            f"{r['spearman']:.3f} | {r['sign_agreement']:.3f} | {r['mean_effect_error']:+.4f} | "
            f"{r['top_stage_agreement']:.3f} | {r['seconds']:.2f} | {r['cost_ratio']:.3f} |"
            for r in fidelity["rows"]
        ),
        "",
        "Group behaviours (estimated / true effect):",
        "",
        "| estimator | read-out | output | stage | estimated | true | sign right |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['estimator']} | {r['readout']} | {r['output']} | {r['stage']} | "
            f"{r['estimated']:+.4f} | {r['true']:+.4f} | {'yes' if r['sign_right'] else 'no'} |"
            for r in fidelity["group_rows"]
            if r["behavior"] != "fp_loss"
        ),
    ]
    return lines

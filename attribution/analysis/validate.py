"""Validation of the estimators against real skip-stage retraining.

The truth retrains without each stage (``attribution.record.counterfactual.skip_stage``, stored
under the run and reused) and evaluates f(theta_T) - f(theta_T^(-k)) directly, per example, with
the one evaluator (eval mode, each checkpoint's own buffers). Every estimator and read-out is
scored against it:

- per-example behaviours: one ``FidelityRow`` per stage (correlations, sign agreement, mean
  effect error, top-stage agreement, cost);
- group behaviours (``group_mean``, ``group_gap``): one ``GroupRow`` per output and stage
  (estimated and true effect, sign right or not, absolute error, and whether the estimate orders
  the stages as the truth does).

With ``ceiling = R >= 2`` the noise ceiling is measured too (``noise_ceiling``): R retrainings
without each stage that differ from the truth only in the later stages' batch order
(``skip_stage_shuffled``, seeds 0..R-1), scored against the recorded counterfactual like an
estimator. Its Pearson is what an exact retraining under another draw of the later batches
scores, so an estimator's ``pearson_of_ceiling`` near 1 means it is as faithful as the effect is
well defined; ``pearson_expected`` scores the estimator against the mean of the R retrainings
(the expected counterfactual over batch orders).

Under torchrun (``attribution.record.distributed``) the retrainings are shared out among the
ranks by stage, and every evaluation and read-out by contiguous batches of the behaviour's
examples, gathered in order: every rank gets the result one process would (docs/scale.md).
Estimators are computed whole (replicated, or once under the cache's lock).

Retrainings, estimators, the truth's evaluations and the read-outs all run on the compute of
``attribution.record.compute.current()`` (device, and dtype: a bfloat16 compute gives the
approximate bfloat16 truth and read-outs) and hand their results back on the CPU (docs/scale.md,
"Devices and precision").

Sign convention: effect_k(f) = f(theta_T) - f(theta_T^(-k)).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from attribution.analysis import metrics
from attribution.analysis.audit import READOUTS, check_readouts
from attribution.analysis.behaviors import Behavior
from attribution.analysis.readout import behaviour_effects
from attribution.record import SIGN_CONVENTION, distributed
from attribution.record.counterfactual import skip_stages, skip_stages_shuffled
from attribution.record.errors import SpecError
from attribution.record.evaluation import ModelAt, final_model
from attribution.record.trajectory import Trajectory
from estimators import build_all, check_evidence, stored_embeddings

Effects = dict[str, Tensor]
"""Stage -> [N] float64 per-example effects."""
K = TypeVar("K")


@dataclass(frozen=True)
class FidelityRow:
    """Estimated against true per-example effects of one stage on one per-example behaviour;
    ``seconds``: embedding plus read-out, ``cost_ratio``: their ratio to the truth's."""

    estimator: str
    readout: str
    behavior: str
    stage: str
    pearson: float
    spearman: float
    sign_agreement: float
    mean_effect_true: float
    mean_effect_error: float
    top_stage_agreement: float
    seconds: float
    cost_ratio: float
    ceiling_pearson: float = math.nan
    pearson_of_ceiling: float = math.nan
    pearson_expected: float = math.nan


@dataclass(frozen=True)
class CeilingRow:
    """The recorded counterfactual's per-example effects of skipping ``stage`` against those of
    retraining without it under other later batch orders (one per seed): Pearson, sign
    agreement and mean-effect difference (shuffled minus recorded, units of the quantity), each
    the mean over the seeds, and the lowest Pearson among them."""

    behavior: str
    stage: str
    pearson: float
    pearson_min: float
    sign_agreement: float
    mean_effect_difference: float
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Ceiling:
    """The noise ceiling (``noise_ceiling``): its rows, the per-example behaviours' expected
    effects (mean over the seeds' retrainings, ``expected[behaviour][stage]``, [N] float64), the
    seeds of the later batch orders and the seconds their retraining took."""

    seeds: tuple[int, ...]
    rows: list[CeilingRow]
    expected: dict[str, Effects]
    seconds: float

    def pearson(self, behavior: str, stage: str) -> float:
        """The ceiling's Pearson for one behaviour and stage (NaN if not measured)."""
        found = [r.pearson for r in self.rows if (r.behavior, r.stage) == (behavior, stage)]
        return found[0] if found else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "seeds": list(self.seeds),
            "seconds": self.seconds,
            "rows": [asdict(r) for r in self.rows],
        }


@dataclass(frozen=True)
class GroupRow:
    """Estimated against true effect of one stage on one output of a group behaviour (units of
    its quantity). ``ranking_matches``: the estimate orders the stages by effect (largest
    first, signed) as the truth does, the same for every stage of the output."""

    estimator: str
    readout: str
    behavior: str
    output: str
    stage: str
    estimated: float
    true: float
    sign_right: bool
    abs_error: float
    ranking_matches: bool


@dataclass(frozen=True)
class Truth:
    """True per-example effects of every stage, per behaviour (``effects[behaviour][stage]``,
    [N] float64), and the seconds retraining took (as recorded when it was computed)."""

    effects: dict[str, Effects]
    seconds: float


@dataclass(frozen=True)
class Validation:
    """Every estimator and read-out against the truth (``validation.json``). ``effects`` (with
    ``keep_effects``): ``"truth"`` and ``"<label>:<readout>"`` -> per-example behaviour ->
    stage -> [N] float64 numpy arrays, for plots (not in ``to_json``)."""

    trajectory: str
    ground_truth_seconds: float
    rows: list[FidelityRow]
    group_rows: list[GroupRow]
    effects: dict[str, dict[str, dict[str, np.ndarray]]] | None = None
    ceiling: Ceiling | None = None
    sign_convention: str = field(default=SIGN_CONVENTION)

    def to_json(self) -> dict[str, Any]:
        return {
            "sign_convention": self.sign_convention,
            "trajectory": self.trajectory,
            "ground_truth_seconds": self.ground_truth_seconds,
            "rows": [asdict(r) for r in self.rows],
            "group_rows": [asdict(r) for r in self.group_rows],
            "ceiling": self.ceiling.to_json() if self.ceiling is not None else None,
        }


def true_effects(
    traj: Trajectory, behaviors: Mapping[str, Behavior], batch_size: int = 512
) -> Truth:
    """f(theta_T) - f(theta_T^(-k)) per example, stage and behaviour: retraining without each
    stage (stored and reused), then one evaluation of the final and each counterfactual model.
    Behaviours over the same data and quantity share one computation. Under torchrun the
    retrainings are shared out by stage and the evaluations by batches of examples."""
    data = distributed.agreed(partial(_loaded, behaviors, batch_size))  # before retraining
    skipped = skip_stages(traj)
    model = final_model(traj)
    counterfactual = {s: model.at(cf.state) for s, cf in skipped.items()}
    computed: dict[str, Effects] = {}
    effects = {}
    for name, behavior in behaviors.items():
        key = behavior.values_key
        if key not in computed:
            inputs, targets, _ = data[name]
            differences = partial(
                _differences, model, counterfactual, behavior.quantity, batch_size
            )
            computed[key] = _by_rows(differences, inputs, targets, batch_size)
        effects[name] = computed[key]
    return Truth(effects, sum(cf.seconds for cf in skipped.values()))


def noise_ceiling(
    traj: Trajectory,
    behaviors: Mapping[str, Behavior],
    truth: Truth,
    repeats: int,
    batch_size: int = 512,
) -> Ceiling:
    """Per per-example behaviour and stage, how well ``repeats`` retrainings without the stage
    under reshuffled later batch orders (``skip_stage_shuffled``, seeds 0..repeats-1, stored and
    reused) reproduce the recorded counterfactual's effects in ``truth``."""
    _check_repeats(repeats)
    seeds = tuple(range(repeats))
    chosen = {n: b for n, b in behaviors.items() if b.aggregate == "per_example"}
    data = distributed.agreed(partial(_loaded, chosen, batch_size))  # before retraining
    shuffled = skip_stages_shuffled(traj, seeds)
    seconds = sum(cf.seconds for cf in shuffled.values())
    model = final_model(traj)
    others = {job: model.at(cf.state) for job, cf in shuffled.items()}
    draws: dict[str, dict[str, list[Tensor]]] = {}  # values key -> stage -> effects per seed
    rows, expected = [], {}
    for name, behavior in chosen.items():
        key = behavior.values_key
        if key not in draws:
            inputs, targets, _ = data[name]
            differences = partial(_differences, model, others, behavior.quantity, batch_size)
            effects = _by_rows(differences, inputs, targets, batch_size)
            draws[key] = {s: [effects[(s, seed)] for seed in seeds] for s in traj.names}
        expected[name] = {s: torch.stack(d).mean(0) for s, d in draws[key].items()}
        for stage, effects in draws[key].items():
            recorded = truth.effects[name][stage].numpy()
            pearsons = [metrics.pearson(e.numpy(), recorded) for e in effects]
            rows.append(
                CeilingRow(
                    behavior=name,
                    stage=stage,
                    pearson=float(np.mean(pearsons)),
                    pearson_min=float(np.min(pearsons)),
                    sign_agreement=float(
                        np.mean([metrics.sign_agreement(e.numpy(), recorded) for e in effects])
                    ),
                    mean_effect_difference=float(
                        np.mean([metrics.mean_effect_error(e.numpy(), recorded) for e in effects])
                    ),
                    seeds=seeds,
                )
            )
    return Ceiling(seeds, rows, expected, seconds)


def _check_repeats(repeats: int) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 2:
        raise SpecError(
            "ceiling",
            f"the noise ceiling needs at least 2 retrainings, got {repeats!r}",
            "give ceiling=2 or more (0 turns it off)",
        )


def validate(
    traj: Trajectory,
    estimators: Sequence[str],
    readouts: Sequence[str],
    behaviors: Mapping[str, Behavior],
    batch_size: int = 512,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    keep_effects: bool = False,
    truth: Truth | None = None,
    ceiling: int = 0,
    noise: Ceiling | None = None,
) -> Validation:
    """Every estimator and read-out against the true effects, per behaviour and stage.

    ``settings`` maps an estimator's base name (``e3``) to its settings; settings for an
    estimator not run are refused. ``truth`` (from ``true_effects`` over the same behaviours)
    is reused if given, e.g. by a caller validating one estimator at a time. ``ceiling = R``
    (at least 2; 0, the default, turns it off) measures the noise ceiling over R reshuffled
    later batch orders (``noise_ceiling``); ``noise`` reuses one measured over the same
    behaviours. Estimators, settings, evidence, behaviours and the batch size are checked
    before anything is computed (under torchrun, on every rank, which then agree).
    """

    def checked() -> tuple[dict[str, Any], dict[str, tuple[Tensor, Tensor, Tensor]]]:
        if not behaviors:
            raise SpecError(
                "behaviors", "no behaviour to validate", "declare at least one behaviour"
            )
        built = build_all(estimators, settings)
        check_evidence(built.values(), traj)
        check_readouts(list(readouts))
        data = _loaded(behaviors, batch_size)
        if ceiling and noise is None:
            _check_repeats(ceiling)
        missing = sorted(set(behaviors) - set(truth.effects)) if truth is not None else []
        if missing:
            raise SpecError(
                "truth",
                f"the given truth lacks the behaviours {missing}",
                "compute it with true_effects over the same behaviours",
            )
        return built, data

    built, data = distributed.agreed(checked)
    if truth is None:
        truth = true_effects(traj, behaviors, batch_size)
    if noise is None and ceiling:
        noise = noise_ceiling(traj, behaviors, truth, ceiling, batch_size)
    model = final_model(traj)
    per_example = [n for n, b in behaviors.items() if b.aggregate == "per_example"]
    rows: list[FidelityRow] = []
    group_rows: list[GroupRow] = []
    kept: dict[str, dict[str, dict[str, np.ndarray]]] = {
        "truth": {b: _numpy(truth.effects[b]) for b in per_example}
    }
    for estimator in built.values():
        label = estimator.label
        # replicated: per rank in memory, once (under the cache's lock) on disk
        embeddings, _ = distributed.agreed(partial(stored_embeddings, estimator, traj))
        for readout in readouts:
            estimated = _estimates(model, embeddings.offsets, readout, behaviors, data, batch_size)
            for behavior, (effects, seconds) in estimated.items():
                seconds += embeddings.seconds
                if behavior in per_example:
                    rows += fidelity_rows(
                        label,
                        readout,
                        behavior,
                        effects,
                        truth.effects[behavior],
                        seconds,
                        truth.seconds,
                        noise,
                    )
                    kept.setdefault(f"{label}:{readout}", {})[behavior] = _numpy(effects)
                else:
                    group_rows += _group_rows(
                        label,
                        readout,
                        behaviors[behavior],
                        effects,
                        truth.effects[behavior],
                        data[behavior][2],
                    )
    return Validation(
        trajectory=str(traj.root),
        ground_truth_seconds=truth.seconds,
        rows=rows,
        group_rows=group_rows,
        effects=kept if keep_effects else None,
        ceiling=noise,
    )


def fidelity_rows(
    estimator: str,
    readout: str,
    behavior: str,
    estimated: Mapping[str, Tensor],
    truth: Mapping[str, Tensor],
    seconds: float,
    truth_seconds: float,
    noise: Ceiling | None = None,
) -> list[FidelityRow]:
    """One row of fidelity metrics per stage: estimated against true per-example effects
    ([N] tensors per stage), with the estimate's cost and its ratio to the truth's; with the
    noise ceiling ``noise``, also the ceiling's Pearson, this Pearson's fraction of it and the
    Pearson against the expected counterfactual."""
    stages = list(truth)
    est = np.stack([estimated[s].numpy() for s in stages])
    tru = np.stack([truth[s].numpy() for s in stages])
    top = metrics.top_stage_agreement(est, tru)
    rows = [
        FidelityRow(
            estimator=estimator,
            readout=readout,
            behavior=behavior,
            stage=stage,
            pearson=metrics.pearson(est[i], tru[i]),
            spearman=metrics.spearman(est[i], tru[i]),
            sign_agreement=metrics.sign_agreement(est[i], tru[i]),
            mean_effect_true=float(tru[i].mean()),
            mean_effect_error=metrics.mean_effect_error(est[i], tru[i]),
            top_stage_agreement=top,
            seconds=seconds,
            cost_ratio=seconds / truth_seconds if truth_seconds else float("nan"),
        )
        for i, stage in enumerate(stages)
    ]
    if noise is None or behavior not in noise.expected:
        return rows
    out = []
    for i, row in enumerate(rows):
        ceiling = noise.pearson(behavior, row.stage)
        expected = noise.expected[behavior][row.stage].numpy()
        out.append(
            replace(
                row,
                ceiling_pearson=ceiling,
                pearson_of_ceiling=row.pearson / ceiling if ceiling else math.nan,
                pearson_expected=metrics.pearson(est[i], expected),
            )
        )
    return out


def _group_rows(
    estimator: str,
    readout: str,
    behavior: Behavior,
    estimated: Effects,
    truth: Effects,
    keys: Tensor,
) -> list[GroupRow]:
    """One row per output and stage of a group behaviour, aggregated from per-example effects."""
    est = behaviour_effects(behavior, estimated, keys)
    tru = behaviour_effects(behavior, truth, keys)
    stages = list(truth)
    rows = []
    for output in next(iter(tru.values())):
        e = np.array([est[s][output] for s in stages])
        t = np.array([tru[s][output] for s in stages])
        ranking = metrics.same_ranking(e, t)
        rows += [
            GroupRow(
                estimator=estimator,
                readout=readout,
                behavior=behavior.name,
                output=output,
                stage=stage,
                estimated=float(e[i]),
                true=float(t[i]),
                sign_right=bool(np.sign(e[i]) == np.sign(t[i])),
                abs_error=float(abs(e[i] - t[i])),
                ranking_matches=ranking,
            )
            for i, stage in enumerate(stages)
        ]
    return rows


def _estimates(
    model: ModelAt,
    offsets: Mapping[str, Mapping[str, Tensor]],
    readout: str,
    behaviors: Mapping[str, Behavior],
    data: Mapping[str, tuple[Tensor, Tensor, Tensor]],
    batch_size: int,
) -> dict[str, tuple[Effects, float]]:
    """Per behaviour, the read-out's per-example effects and the seconds they took (behaviours
    over the same data and quantity share one computation and its seconds)."""
    computed: dict[str, tuple[Effects, float]] = {}
    out = {}
    for name, behavior in behaviors.items():
        key = behavior.values_key
        if key not in computed:
            inputs, targets, _ = data[name]
            began = time.perf_counter()
            read = partial(_readout, readout, model, offsets, behavior.quantity, batch_size)
            effects = _by_rows(read, inputs, targets, batch_size)
            computed[key] = (effects, time.perf_counter() - began)
        out[name] = computed[key]
    return out


def _readout(
    readout: str,
    model: ModelAt,
    offsets: Mapping[str, Mapping[str, Tensor]],
    quantity: str,
    batch_size: int,
    inputs: Tensor,
    targets: Tensor,
) -> Effects:
    return READOUTS[readout](model, offsets, inputs, targets, quantity, batch_size)


def _differences(
    model: ModelAt,
    others: Mapping[K, ModelAt],
    quantity: str,
    batch_size: int,
    inputs: Tensor,
    targets: Tensor,
) -> dict[K, Tensor]:
    """f(theta_T) - f(other) per example, for each of ``others`` (counterfactual models)."""
    final = model.values(inputs, targets, quantity, batch_size)
    return {
        key: final - other.values(inputs, targets, quantity, batch_size)
        for key, other in others.items()
    }


def _by_rows(
    compute: Callable[[Tensor, Tensor], dict[K, Tensor]],
    inputs: Tensor,
    targets: Tensor,
    batch_size: int,
) -> dict[K, Tensor]:
    """``compute(inputs, targets)``: per-example values, [N] per key. Under torchrun each rank
    computes its contiguous whole batches (``distributed.rows``) and every rank gets all N in
    order: the numbers one process computes, as every example runs in the same batch."""
    n = len(targets)
    if distributed.world().size == 1 or n == 0:
        return compute(inputs, targets)
    mine = distributed.rows(n, batch_size)
    part = distributed.agreed(
        lambda: compute(inputs[mine], targets[mine]) if mine.start < mine.stop else None
    )
    parts = [p for p in distributed.all_gather(part) if p is not None]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _loaded(
    behaviors: Mapping[str, Behavior], batch_size: int
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Every behaviour's data (inputs, targets, group keys), after checking ``batch_size``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpecError(
            "batch_size",
            f"{batch_size!r} is not a positive integer",
            "give the number of examples per forward pass, e.g. 512",
        )
    return {name: b.load() for name, b in behaviors.items()}


def _numpy(effects: Effects) -> dict[str, np.ndarray]:
    return {s: v.numpy() for s, v in effects.items()}

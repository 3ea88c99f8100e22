"""Peers: what a user would try instead of the estimators, scored on the same truth.

Both attribute a stage from the final parameters theta_T alone, in the project's sign convention
effect_k(f) = f(theta_T) - f(theta_T^(-k)) (``docs/baselines.md``, "Peers"):

- ``gradsim`` (final-checkpoint TracIn): the stage direction ``g_k = sum_t lr_t grad L_t(theta_T)``
  (stage k's recorded steps: its batch-mean training loss L_t on batch t, its per-group rates),
  read out as ``effect_k(f_i) ~= -<grad f_i(theta_T), g_k>``: stage k moved theta by about
  ``-g_k``, so skipping it would have left theta about ``g_k`` further back.
- ``ekfac``: the influence function with Kronfluence's EK-FAC curvature,
  ``effect_k(f_i) ~= -(1/M) sum_z w_z I(z, i)``, where ``I(z, i) = grad f_i^T (G + lambda)^-1
  grad l_z`` is Kronfluence's pairwise score (positive: training on z lowers f_i, so removing it
  raises f_i), z runs over the examples stage k trained on, ``w_z`` is their learning-rate weight
  (``sum over the steps t whose batch holds z of lr_t / |B_t|``) and M the learning-rate mass of
  every stage (the sum of all w_z). SGD descends ``sum_z w_z l_z``; removing stage k's terms from
  that objective moves its optimum by ``H^-1 sum_z w_z grad l_z`` with ``H ~= M G``, G the mean
  curvature of an example drawn with probability ``w_z / M`` (how the factors are fitted).

They are baselines of the experiments layer: neither produces a stage embedding. Memory is one
batch: no N x p matrix of per-example gradients is held. Kronfluence is the optional extra
``peers`` (``pip install -e '.[peers]'`` then ``pip install --no-deps kronfluence==1.0.1``),
imported only by ``ekfac``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from attribution.analysis.behaviors import Behavior
from attribution.analysis.validate import Ceiling, FidelityRow, fidelity_rows
from attribution.record import SIGN_CONVENTION
from attribution.record.entry import LoRALinear
from attribution.record.errors import SpecError, StagetraceError
from attribution.record.evaluation import QUANTITIES, ModelAt, directional, final_model, per_example
from attribution.record.pipeline import fetch_batch, require_batch_order
from attribution.record.references import load_dataset, loss_function
from attribution.record.trajectory import Trajectory, load_state

READOUTS = {"gradsim": "linear", "ekfac": "influence"}
"""Each peer's read-out, as its fidelity rows name it."""
KRONFLUENCE = "kronfluence==1.0.1"
INSTALL = (
    "install the extra: `make setup`, or `pip install -e '.[peers]' torch==<your torch>` then "
    f"`pip install --no-deps {KRONFLUENCE}`"
)


class Query(NamedTuple):
    """Examples to attribute: ``inputs``, ``targets`` and the per-example ``quantity`` (``loss``
    in nats or ``margin`` in logits)."""

    inputs: Tensor
    targets: Tensor
    quantity: str


@dataclass(frozen=True)
class PeerResult:
    """One peer on some queries: ``effects[query][stage]``, [N] float64 per-example effects in
    the units of the query's quantity; ``seconds[query]``: the shared preparation (stage
    directions, or the fitted factors) plus that query's own read-out."""

    peer: str
    effects: dict[str, dict[str, Tensor]]
    seconds: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Settings, seconds and the mean effect per query and stage (not the effects)."""
        return {
            "sign_convention": SIGN_CONVENTION,
            "peer": self.peer,
            "settings": self.settings,
            "seconds": self.seconds,
            "mean_effects": {
                q: {s: float(v.mean()) for s, v in per_stage.items()}
                for q, per_stage in self.effects.items()
            },
        }


# --- gradient similarity at the final checkpoint ---------------------------------------------


def gradsim(traj: Trajectory, queries: Mapping[str, Query], batch_size: int = 512) -> PeerResult:
    """Final-checkpoint TracIn of every stage on every query: ``-<grad f_i(theta_T), g_k>``,
    one forward-mode jvp per batch of ``batch_size`` examples and stage."""
    _check_queries(queries)
    began = time.perf_counter()
    model = final_model(traj)
    directions = {r.name: stage_direction(model, traj, k) for k, r in enumerate(traj.stages)}
    prepared = time.perf_counter() - began
    effects, seconds = {}, {}
    for name, (inputs, targets, quantity) in queries.items():
        began = time.perf_counter()
        effects[name] = {
            stage: directional(
                model, {n: -g for n, g in d.items()}, inputs, targets, quantity, batch_size
            )
            for stage, d in directions.items()
        }
        seconds[name] = prepared + time.perf_counter() - began
    return PeerResult("gradsim", effects, seconds, {"batch_size": batch_size})


def stage_direction(model: ModelAt, traj: Trajectory, k: int) -> dict[str, Tensor]:
    """``g_k = sum_t lr_t grad L_t(theta_T)`` over stage k's recorded steps (float64, per
    parameter the stage trained, ``lr_t`` its group's rate at step t): the gradient of the
    stage's own mean-reduced loss on batch t, taken at the final model ``model`` (eval mode,
    the one evaluator's). Momentum, weight decay, clipping and Adam are ignored, as in TracIn."""
    record, log = traj.stages[k], traj.steps(k)
    require_batch_order(record, log, "the gradient-similarity peer")
    missing = sorted(set(record.trainable) - set(model.params))
    if missing:
        raise StagetraceError(
            f"stage {record.name!r} trained {missing[:5]}, which the final model lacks. Fix: "
            "attribute a trajectory whose final model holds every trained parameter"
        )
    dataset, loss = load_dataset(record.data), loss_function(record.loss)
    point = {n: model.params[n].detach().requires_grad_(True) for n in record.trainable}
    group = {n: i for i, g in enumerate(record.groups) for n in g.params}
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in point.items()}
    for t in range(log.num_steps):
        inputs, targets = fetch_batch(dataset, log.batch(t))
        value = loss(model.logits(inputs.to(model.device), point), targets.to(model.device))
        grads = torch.autograd.grad(value, list(point.values()))
        for n, g in zip(point, grads, strict=True):
            total[n] += float(log.lr[t, group[n]]) * g.double()
    return total


# --- the influence function (Kronfluence, EK-FAC) ----------------------------------------------


def ekfac(
    traj: Trajectory,
    queries: Mapping[str, Query],
    fit_examples: int = 1000,
    damping: float | None = None,
    seed: int = 0,
    batch_size: int = 128,
    output_dir: Path | str | None = None,
) -> PeerResult:
    """EK-FAC influence of every stage's examples on every query, as effects:
    ``-(1/M) sum_z w_z I(z, i)`` (module docstring).

    The factors are fitted once, on ``fit_examples`` examples drawn with replacement from the
    union of the stages' examples with probability ``w_z / M`` (seeded by ``seed``, which also
    seeds the labels Kronfluence's true Fisher samples), at the final parameters with every
    LoRA adapter merged into its layer (Kronfluence tracks ``nn.Linear`` and ``nn.Conv2d``).
    ``damping``: Kronfluence's damping lambda (None: 0.1 x the mean eigenvalue). Each stage's
    sum is one Kronfluence pairwise computation with the stage's training gradients aggregated
    (``w_z``-weighted). ``batch_size``: examples per Kronfluence batch (memory: about
    ``batch_size`` x parameters floats). Factors and scores go to ``output_dir`` (a temporary
    directory, removed afterwards, when None). Stages must train on cross-entropy.
    """
    _check_queries(queries)
    _check_ekfac_settings(fit_examples, damping, seed, batch_size)
    losses = sorted({r.loss for r in traj.stages} - {"cross_entropy"})
    if losses:
        raise StagetraceError(
            f"the EK-FAC peer samples labels for cross-entropy only, and stages train on "
            f"{losses}. Fix: use the gradsim peer for this trajectory"
        )
    kron = _kronfluence()
    began = time.perf_counter()
    examples = [stage_examples(traj, k) for k in range(len(traj.stages))]
    mass = float(sum(e.weights.sum() for e in examples))
    fit = fit_dataset(examples, fit_examples, seed)
    model = merged_final_model(traj)
    settings = {"fit_examples": fit_examples, "damping": damping, "seed": seed}
    settings |= {"batch_size": batch_size, "lr_mass": mass}
    effects: dict[str, dict[str, Tensor]] = {}
    seconds: dict[str, float] = {}
    with _directory(output_dir) as root, warnings.catch_warnings(), _frozen_heap():
        warnings.filterwarnings("ignore", category=FutureWarning)  # Kronfluence's AMP scaler
        model = kron.prepare_model(model, kronfluence_task("loss", seed))
        analyzer = analyzer_for(model, kronfluence_task("loss", seed), root)
        analyzer.fit_all_factors(
            FACTORS,
            fit,
            per_device_batch_size=batch_size,
            factor_args=kron.FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        prepared = time.perf_counter() - began
        arguments = kron.ScoreArguments(damping_factor=damping, aggregate_train_gradients=True)
        for q, (name, (inputs, targets, quantity)) in enumerate(queries.items()):
            began = time.perf_counter()
            scorer = analyzer_for(model, kronfluence_task(quantity, seed), root)
            effects[name] = {}
            for k, record in enumerate(traj.stages):
                scores = f"query{q}-stage{k}"
                scorer.compute_pairwise_scores(
                    scores_name=scores,
                    factors_name=FACTORS,
                    query_dataset=TensorDataset(inputs, targets),
                    train_dataset=examples[k],
                    per_device_query_batch_size=batch_size,
                    per_device_train_batch_size=batch_size,
                    score_args=arguments,
                    overwrite_output_dir=True,
                )
                summed = scorer.load_pairwise_scores(scores)["all_modules"].double().sum(1)
                effects[name][record.name] = -summed / mass
            seconds[name] = prepared + time.perf_counter() - began
    return PeerResult("ekfac", effects, seconds, settings)


FACTORS = "ekfac"
"""The factors' name under Kronfluence's output directory."""
ANALYSIS = "stagetrace"


class Examples(Dataset):
    """Rows ``indices`` of ``dataset`` as ``(input, target, weight)`` items: the training
    examples Kronfluence scores, ``weight`` scaling each one's loss."""

    def __init__(self, dataset: Any, indices: Tensor, weights: Tensor) -> None:
        self.dataset, self.indices, self.weights = dataset, indices, weights

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, Any, Tensor]:
        inputs, targets = self.dataset[int(self.indices[i])][:2]
        return inputs, targets, self.weights[i]


def stage_examples(traj: Trajectory, k: int) -> Examples:
    """The distinct examples stage k trained on, in index order, each weighted by
    ``w_z = sum over the steps t whose batch holds z of lr_t / |B_t|`` (``lr_t``: the step's
    rate, mean over parameter groups; float32)."""
    record, log = traj.stages[k], traj.steps(k)
    require_batch_order(record, log, "the EK-FAC peer")
    batches = [log.batch(t) for t in range(log.num_steps)]
    rates = log.lr.mean(1)
    share = torch.cat(
        [torch.full((len(b),), float(r) / len(b)) for b, r in zip(batches, rates, strict=True)]
    )
    indices, where = torch.unique(torch.cat(batches), return_inverse=True)
    weights = torch.zeros(len(indices), dtype=torch.float64).index_add_(0, where, share.double())
    return Examples(load_dataset(record.data), indices, weights.float())


def fit_dataset(examples: Sequence[Examples], size: int, seed: int) -> ConcatDataset:
    """``size`` examples drawn with replacement from the union of ``examples`` with probability
    proportional to their weight, each with weight 1: the curvature of the rate-weighted
    objective, per unit of rate."""
    weights = torch.cat([e.weights.double() for e in examples])
    drawn = torch.multinomial(
        weights, size, replacement=True, generator=torch.Generator().manual_seed(seed)
    )
    bounds = np.cumsum([0] + [len(e) for e in examples])
    parts = []
    for e, low, high in zip(examples, bounds[:-1], bounds[1:], strict=True):
        rows = drawn[(drawn >= low) & (drawn < high)] - int(low)
        if len(rows):
            parts.append(Examples(e.dataset, e.indices[rows], torch.ones(len(rows))))
    return ConcatDataset(parts)


def merged_final_model(traj: Trajectory) -> nn.Module:
    """The final model (eval mode) with every LoRA adapter merged into a plain ``nn.Linear``
    (weight ``W + (alpha / rank) B A``): the same function, in modules Kronfluence tracks."""
    last = len(traj.stages) - 1
    module = traj.build_model(last)
    load_state(module, traj.checkpoint(last, "end"), "the final model")
    for name, child in list(module.named_modules()):
        if isinstance(child, LoRALinear):
            out_features, in_features = child.weight.shape
            merged = nn.Linear(in_features, out_features, bias=child.bias is not None)
            merged = merged.to(child.weight.device, child.weight.dtype)
            with torch.no_grad():
                merged.weight.copy_(child.weight + child.scale * child.lora_B @ child.lora_A)
                if child.bias is not None:
                    merged.bias.copy_(child.bias)
            parent, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(parent), attribute, merged)
    if not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in module.modules()):
        raise StagetraceError(
            "the final model has no nn.Linear or nn.Conv2d layer, the only modules Kronfluence "
            "attributes. Fix: use the gradsim peer for this model"
        )
    return module.eval()


def kronfluence_task(quantity: str, seed: int = 0) -> Any:
    """Kronfluence's ``Task`` for this project: the training loss is the weighted sum
    ``sum_z weight_z CE(z)`` over ``(input, target, weight)`` batches (labels drawn from the
    model's softmax, seeded, when Kronfluence asks for a sample: the true Fisher); the
    measurement is the sum of the per-example ``quantity`` over ``(input, target)`` batches."""
    return _task_type()(quantity, seed)


def analyzer_for(model: nn.Module, task: Any, root: Path) -> Any:
    """A Kronfluence ``Analyzer`` on the CPU, quiet, writing under ``root``."""
    return _kronfluence().Analyzer(
        ANALYSIS,
        model,
        task,
        cpu=True,
        log_level=logging.WARNING,
        disable_tqdm=True,
        output_dir=str(root),
    )


@functools.cache
def _task_type() -> type:
    task = _kronfluence().Task

    class StageTask(task):
        def __init__(self, quantity: str, seed: int) -> None:
            self.quantity = quantity
            self.generators: dict[torch.device, torch.Generator] = {}
            self.seed = seed

        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            inputs, targets, weights = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    probabilities = F.softmax(logits.detach(), -1)
                    generator = self.generators.setdefault(
                        logits.device, torch.Generator(logits.device).manual_seed(self.seed)
                    )
                    targets = torch.multinomial(probabilities, 1, generator=generator)[:, 0]
            losses = F.cross_entropy(logits, targets, reduction="none")
            return (weights.to(losses) * losses).sum()

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            inputs, targets = batch[:2]
            # the module as it is (Kronfluence's hooks in place), through the one evaluator
            return per_example(ModelAt(model, {}, {}), {}, inputs, targets, self.quantity).sum()

    return StageTask


class _Kronfluence(NamedTuple):
    Analyzer: Any
    prepare_model: Callable[..., nn.Module]
    Task: type
    FactorArguments: type
    ScoreArguments: type


def _kronfluence() -> _Kronfluence:
    """Kronfluence's API, or a refusal that says how to install it."""
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except ImportError as exc:
        raise SpecError(
            "peers",
            f"the ekfac peer needs Kronfluence, which cannot be imported ({exc})",
            f"{INSTALL}; or leave ekfac out (peers=[gradsim])",
        ) from exc
    return _Kronfluence(Analyzer, prepare_model, Task, FactorArguments, ScoreArguments)


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Kronfluence runs ``gc.collect()`` around every pass (to free GPU memory); in a process
    holding many objects each takes about half a second on the CPU. Freezing the objects that
    exist beforehand keeps every collection to what Kronfluence itself creates."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _directory(output_dir: Path | str | None) -> Iterator[Path]:
    """``output_dir`` as a Path, or a temporary directory removed on exit."""
    if output_dir is not None:
        yield Path(output_dir)
        return
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


# --- checks and the fidelity study's rows ------------------------------------------------------

PEERS: dict[str, Callable[..., PeerResult]] = {"gradsim": gradsim, "ekfac": ekfac}


def check_peers(peers: Sequence[str], settings: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse unknown peers, settings for an unknown peer or that a peer does not take, and
    ekfac without Kronfluence: before any work. Settings of a known peer not run are checked
    too (the study's config keeps ekfac's when ``peers=[gradsim]``)."""
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise SpecError("peers", f"unknown peers {unknown}", f"use {' and/or '.join(PEERS)}")
    for peer, values in settings.items():
        if peer not in PEERS:
            raise SpecError(
                f"peer_settings.{peer}", "is not a peer", f"use {' and/or '.join(PEERS)}"
            )
        accepted = set(inspect.signature(PEERS[peer]).parameters) - {"traj", "queries"}
        extra = sorted(set(values) - accepted)
        if extra:
            raise SpecError(
                f"peer_settings.{peer}", f"unknown settings {extra}", f"use {sorted(accepted)}"
            )
    if "ekfac" in peers:
        _kronfluence()
        values = settings.get("ekfac", {})
        defaults = inspect.signature(ekfac).parameters
        _check_ekfac_settings(
            *(values.get(n, defaults[n].default) for n in ("fit_examples", "damping", "seed")),
            values.get("batch_size", defaults["batch_size"].default),
        )


def peer_rows(
    traj: Trajectory,
    behaviors: Mapping[str, Behavior],
    effects: dict[str, Any],
    peers: Sequence[str],
    truth_seconds: float,
    batch_size: int,
    noise: Ceiling | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[list[FidelityRow], dict[str, str]]:
    """The peers' fidelity rows on the per-example behaviours that ``effects["truth"]`` holds
    (``effects`` gains ``"<peer>:<read-out>"``), and the peers that failed with why. gradsim's
    jvps take ``batch_size`` examples unless its settings say otherwise."""
    settings = settings or {}
    queries = {}
    for name, behavior in behaviors.items():
        if name in effects["truth"]:
            inputs, targets, _ = behavior.load()
            queries[name] = Query(inputs, targets, behavior.quantity)
    rows: list[FidelityRow] = []
    failures: dict[str, str] = {}
    for peer in peers:
        kwargs = dict(settings.get(peer, {}))
        if peer == "gradsim":
            kwargs.setdefault("batch_size", batch_size)
        try:
            result = PEERS[peer](traj, queries, **kwargs)
        except StagetraceError as exc:
            failures[peer] = str(exc)
            continue
        label = f"{peer}:{READOUTS[peer]}"
        for name, per_stage in result.effects.items():
            effects.setdefault(label, {})[name] = {s: v.numpy() for s, v in per_stage.items()}
            truth = {s: torch.from_numpy(v) for s, v in effects["truth"][name].items()}
            rows += fidelity_rows(
                peer,
                READOUTS[peer],
                name,
                per_stage,
                truth,
                result.seconds[name],
                truth_seconds,
                noise,
            )
    return rows, failures


def _check_queries(queries: Mapping[str, Query]) -> None:
    for name, query in queries.items():
        if query.quantity not in QUANTITIES:
            raise SpecError(
                f"{name}.quantity", f"unknown quantity {query.quantity!r}", f"use {QUANTITIES}"
            )
        if not len(query.targets):
            raise StagetraceError(f"query {name!r} has no examples. Fix: pass at least one")


def _check_ekfac_settings(fit_examples: Any, damping: Any, seed: Any, batch_size: Any) -> None:
    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if not positive_int(fit_examples):
        raise SpecError(
            "peer_settings.ekfac.fit_examples",
            f"{fit_examples!r} is not a positive integer",
            "give the number of examples to fit the factors on, e.g. 1000",
        )
    if not positive_int(batch_size):
        raise SpecError(
            "peer_settings.ekfac.batch_size",
            f"{batch_size!r} is not a positive integer",
            "give the examples per Kronfluence batch, e.g. 128",
        )
    if damping is not None and (
        isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping <= 0
    ):
        raise SpecError(
            "peer_settings.ekfac.damping",
            f"{damping!r} is not a positive number",
            "give a damping > 0, or null for Kronfluence's 0.1 x mean eigenvalue",
        )
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SpecError("peer_settings.ekfac.seed", f"{seed!r} is not an integer >= 0", "give 0")

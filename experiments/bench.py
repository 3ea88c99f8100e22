"""What stage embeddings and read-outs cost, measured on the stages_mnist and toxicity pipelines.

``python -m experiments.bench [--out docs/results.md] [--quick]`` records (or reuses, under
``runs/bench/``) the pipelines' trajectories, then measures on stages_mnist:

- the seconds and peak memory of the ground truth (retraining without every stage) and of each
  estimator's ``embed``, each in a fresh process so that its peak memory is its own;
- the throughput of the linear and evaluated read-outs against plain inference;
- the linear read-out (contracted, and as a vectorised jvp) against per-example gradients
  (``vmap(grad)`` and a ``backward`` loop), and that they agree;

and on the toxicity pipeline (the text transformer), the seconds of the truth, of each
estimator in ``TEXT_METHODS`` and of both read-outs on its test set, against the truth.

It prints a Markdown section and, with ``--out``, writes it between the lines
``<!-- bench:start -->`` and ``<!-- bench:end -->`` of that file, leaving the rest as it is.
``--quick`` benchmarks the ``preset=smoke`` pipeline with one repeat: a check that the benchmark
runs, not a measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.func import grad, vmap

from attribution.analysis.audit import READOUTS
from attribution.analysis.choice import subset_replay
from attribution.analysis.readout import evaluated_effects, linear_effects
from attribution.record.counterfactual import check_skippable, retrain_after
from attribution.record.evaluation import (
    MEMMAP_ABOVE,
    MEMMAP_VARIABLE,
    ModelAt,
    final_model,
    per_example,
)
from attribution.record.pipeline import run_pipeline
from attribution.record.references import Ref, load_dataset
from attribution.record.spec import PipelineSpec
from attribution.record.trajectory import MANIFEST, Trajectory
from estimators import E0, E1, E2, E3, E4, Subset
from experiments.data import mnist
from experiments.sections import SectionError, provenance, publish

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "runs" / "bench"
EXPERIMENT = "stages_mnist"
TEXT = "toxicity"
PRESETS = {EXPERIMENT: "smoke", TEXT: "toxicity_smoke"}
"""The preset of each benchmarked experiment under ``--quick``."""
SECTION = "bench"
READOUT_BATCH = 512
GRADIENT_BATCH = 64
GRADIENT_EXAMPLES = 1000
TOLERANCE = 1e-4
KIB_PER_MIB = 1024

Embeddings = Mapping[str, Mapping[str, Tensor]]
T = TypeVar("T")


def retrain_without_each_stage(traj: Trajectory) -> None:
    """The ground truth's work: retrain without every stage as ``skip_stage`` does, but store
    nothing, so that repeated runs measure retraining and never a stored result."""
    for k in range(len(traj.stages)):
        check_skippable(traj, k)
        carried = traj.optimizer_state(k - 1, "end") if k else {}
        retrain_after(traj, k, traj.checkpoint(k, "start"), carried)


AUDIT_REPLAY = subset_replay().label
"""The subset replay ``stagetrace audit`` answers with when the truth is over its budget."""
METHODS: dict[str, Callable[[Trajectory], Any]] = {
    "ground truth": retrain_without_each_stage,
    "e0": E0().embed,
    "e1": E1().embed,
    "e2": E2().embed,
    "e3": E3().embed,
    "e3 (rank 5, 128 examples, end)": E3(rank=5, sample=128, at="end").embed,
    "e4:2": E4(stride=2).embed,
    "e4:4": E4(stride=4).embed,
    "subset:0.25": Subset(budget=0.25).embed,
    "subset:0.25 (uniform)": Subset(budget=0.25, allocation="uniform").embed,
    "subset:0.1": Subset(budget=0.1).embed,
    "subset:0.02": Subset(budget=0.02).embed,
    "subset:0.25(merge=2)": Subset(budget=0.25, merge=2).embed,
    "subset:0.25(merge=4)": Subset(budget=0.25, merge=4).embed,
    "subset:0.5(merge=2)": Subset(budget=0.5, merge=2).embed,
    AUDIT_REPLAY: subset_replay().embed,
}
"""What table (i) measures, by the name it shows; ``embed``, never ``stored_embeddings``. The
subset replays at 0.1 and 0.02 show its cost floor: every later step still runs (its optimizer
step, its passes over one or a few examples); the merged ones how far sharing a gradient
between steps moves it, and ``AUDIT_REPLAY`` is the audit's own (two merged replays)."""
TEXT_METHODS = ("ground truth", "e0", "e1", "e2", "e4:2", "subset:0.25", AUDIT_REPLAY)
"""What the toxicity table measures (E3's Lanczos is left out: its cost is the MNIST table's)."""


@dataclass(frozen=True)
class Cost:
    """Wall-clock seconds of one method and its peak resident memory (MiB) above the memory held
    after imports, opening the trajectory and loading its stages' data."""

    method: str
    seconds: float
    peak_mib: float


@dataclass(frozen=True)
class Throughput:
    """Examples per second over the test set: plain inference and the two read-outs of K stage
    embeddings, in batches of ``READOUT_BATCH``."""

    examples: int
    stages: int
    inference: float
    linear: float
    evaluated: float


@dataclass(frozen=True)
class GradientRow:
    """One way to compute -<grad loss_i, SE_k> per example i and stage k: its batch size, wall
    seconds, and largest absolute difference from the linear read-out (nats)."""

    method: str
    batch: int
    seconds: float
    max_abs_diff: float


def max_rss_kib() -> int:
    """Peak resident memory of this process so far, KiB (Linux's unit for ``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> None:
    """Restart this process's peak resident memory at its current one (Linux ``clear_refs``),
    so that a transient peak of the preparation (reading MNIST peaks far above what it keeps)
    does not hide the measured method's own peak."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_cost(method: str, root: str) -> Cost:
    """Run ``METHODS[method]`` once on the trajectory at ``root``; meant for a fresh process.

    Before the clock starts: ``torch._dynamo``, which ``torch.optim`` imports on first use (about
    2 s), and the stages' data (``load_dataset`` caches it per process), so that every method is
    charged for its own work, not for imports or for reading MNIST."""
    importlib.import_module("torch._dynamo")
    traj = Trajectory.open(root, cache=False)  # nothing stored, nothing reused
    for record in traj.stages:
        load_dataset(record.data)
    reset_peak_rss()
    before = max_rss_kib()
    began = time.perf_counter()
    METHODS[method](traj)
    seconds = time.perf_counter() - began
    return Cost(method, seconds, (max_rss_kib() - before) / KIB_PER_MIB)


def in_fresh_process(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a new interpreter (spawned, not forked), so it starts from its own
    imports. Linux hands the spawning process's peak RSS to the child's ``ru_maxrss``, so the
    caller must stay smaller than a child is after its imports: call this before loading data
    or models in the parent."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def measured_cost(method: str, root: Path, repeats: int) -> Cost:
    """Median seconds and largest peak over ``repeats`` fresh processes."""
    runs = [in_fresh_process(measure_cost, method, str(root)) for _ in range(repeats)]
    return Cost(
        method,
        statistics.median(r.seconds for r in runs),
        max(r.peak_mib for r in runs),
    )


def experiment_config(experiment: str, quick: bool) -> dict[str, Any]:
    """The resolved config of ``experiment`` (its ``PRESETS`` preset if quick)."""
    overrides = [f"experiment={experiment}"] + ([f"preset={PRESETS[experiment]}"] if quick else [])
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def build(spec: Mapping[str, Any], root: str) -> None:
    """Record the pipeline under ``root`` (resuming an interrupted recording)."""
    run_pipeline(PipelineSpec.from_dict(spec), root)


def prepared_trajectory(quick: bool, experiment: str = EXPERIMENT) -> Path:
    """The benchmark's trajectory, recorded once per configuration under ``runs/bench/``."""
    spec = PipelineSpec.from_dict(experiment_config(experiment, quick)["pipeline"]).to_dict()
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    root = CACHE / f"{experiment}-{digest}"
    if not ((root / MANIFEST).is_file() and Trajectory.open(root).complete):
        in_fresh_process(build, spec, str(root))
    return root


def timed(fn: Callable[[], T], repeats: int) -> tuple[T, float]:
    """``fn()``'s result and its median wall-clock seconds over ``repeats`` runs, timed after
    one untimed warm-up run (lazy initialisation is not the steady state)."""
    result = fn()
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - began)
    return result, statistics.median(seconds)


@torch.no_grad()
def infer(model: nn.Module, inputs: Tensor, batch_size: int) -> None:
    """Plain forward passes over ``inputs`` in batches: the reference for the read-outs."""
    for i in range(0, len(inputs), batch_size):
        model(inputs[i : i + batch_size])


def readout_throughput(
    model: ModelAt, embeddings: Embeddings, inputs: Tensor, targets: Tensor, repeats: int
) -> Throughput:
    """Examples/s of inference and of both read-outs (quantity loss), in one process."""

    def readout(fn: Callable[..., Any]) -> Callable[[], Any]:
        return lambda: fn(model, embeddings, inputs, targets, "loss", READOUT_BATCH)

    n = len(targets)
    _, inference = timed(lambda: infer(model.module, inputs, READOUT_BATCH), repeats)
    _, linear = timed(readout(linear_effects), repeats)
    _, evaluated = timed(readout(evaluated_effects), repeats)
    return Throughput(n, len(embeddings), n / inference, n / linear, n / evaluated)


def as_parameters(embeddings: Embeddings, params: Mapping[str, Tensor]) -> Embeddings:
    """Embeddings in their parameters' dtype, as ``linear_effects`` uses them."""
    return {s: {n: v.to(params[n]) for n, v in e.items()} for s, e in embeddings.items()}


def vmap_gradient_effects(
    model: ModelAt, embeddings: Embeddings, inputs: Tensor, targets: Tensor
) -> dict[str, Tensor]:
    """Per stage, [N] float64 -<grad loss_i, SE_k> from per-example gradients
    (``vmap(grad)``, ``GRADIENT_BATCH`` examples at a time)."""
    params = dict(model.params)
    tangents = as_parameters(embeddings, params)

    def loss(point: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return per_example(model, point, x[None], y[None], "loss")[0]

    gradients = vmap(grad(loss), in_dims=(None, 0, 0))
    parts: dict[str, list[Tensor]] = {s: [] for s in tangents}
    for i in range(0, len(targets), GRADIENT_BATCH):
        g = gradients(params, inputs[i : i + GRADIENT_BATCH], targets[i : i + GRADIENT_BATCH])
        for stage, tangent in tangents.items():
            parts[stage].append(-sum(g[n].flatten(1) @ t.flatten() for n, t in tangent.items()))
    return {s: torch.cat(p).double() for s, p in parts.items()}


def loop_gradient_effects(
    model: ModelAt, embeddings: Embeddings, inputs: Tensor, targets: Tensor
) -> dict[str, Tensor]:
    """Per stage, [N] float64 -<grad loss_i, SE_k> from one ``backward`` per example of the
    module itself (eval mode, holding the final state).

    Makes every parameter of the module require gradients (frozen ones have offsets too)."""
    module = model.module
    params = dict(module.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    tangents = as_parameters(embeddings, params)
    effects = {s: torch.empty(len(targets), dtype=torch.float64) for s in tangents}
    for i in range(len(targets)):
        for p in params.values():
            p.grad = None
        F.cross_entropy(module(inputs[i : i + 1]), targets[i : i + 1]).backward()
        for stage, tangent in tangents.items():
            effects[stage][i] = -sum((params[n].grad * t).sum() for n, t in tangent.items())
    return effects


def max_abs_diff(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Largest |a - b| over every stage and example."""
    return max(float((a[s] - b[s]).abs().max()) for s in a)


def gradient_comparison(
    model: ModelAt, embeddings: Embeddings, inputs: Tensor, targets: Tensor, repeats: int
) -> list[GradientRow]:
    """The linear read-out (contracted, and as the vectorised jvp) against per-example
    gradients on the same examples; refuses (exit 1)
    if they disagree by ``TOLERANCE`` or more."""
    readout, readout_s = timed(
        lambda: linear_effects(model, embeddings, inputs, targets, "loss", READOUT_BATCH),
        repeats,
    )
    forward, forward_s = timed(
        lambda: linear_effects(
            model, embeddings, inputs, targets, "loss", READOUT_BATCH, contract=False
        ),
        repeats,
    )
    batched, batched_s = timed(
        lambda: vmap_gradient_effects(model, embeddings, inputs, targets), repeats
    )
    looped, looped_s = timed(
        lambda: loop_gradient_effects(model, embeddings, inputs, targets), repeats
    )
    rows = [
        GradientRow("contracted (`linear_effects`)", READOUT_BATCH, readout_s, 0.0),
        GradientRow(
            "vectorised jvp (`contract=False`)",
            READOUT_BATCH,
            forward_s,
            max_abs_diff(readout, forward),
        ),
        GradientRow(
            "`vmap(grad)`, then dot", GRADIENT_BATCH, batched_s, max_abs_diff(readout, batched)
        ),
        GradientRow("loop of `backward`, then dot", 1, looped_s, max_abs_diff(readout, looped)),
    ]
    worst = max(r.max_abs_diff for r in rows)
    if worst >= TOLERANCE:
        raise SectionError(
            f"the linear read-out's two forms and per-example gradients disagree by "
            f"{worst:.3g} nats (tolerance {TOLERANCE:g}): a read-out is wrong",
            status=1,
        )
    return rows


def describe(traj: Trajectory, root: Path, quick: bool, experiment: str = EXPERIMENT) -> str:
    """The benchmarked trajectory in one line: configuration, stages and steps, model size."""
    stages = ", ".join(f"{r.name} ({r.num_steps} steps)" for r in traj.stages)
    size = sum(p.numel() for p in traj.build_model(len(traj.stages) - 1).parameters())
    preset = f"`preset={PRESETS[experiment]}`" if quick else "default configuration"
    where = root.relative_to(REPO) if root.is_relative_to(REPO) else root
    return f"`{experiment}`, {preset} (`{where}`): {stages}; final model {size:,} parameters."


def text_costs(quick: bool, repeats: int) -> tuple[str, list[Cost], list[Cost]]:
    """The toxicity pipeline: its description, the seconds of ``TEXT_METHODS`` (fresh
    processes), and of inference and both read-outs of E1's embeddings on its test set."""
    root = prepared_trajectory(quick, TEXT)
    costs = [measured_cost(method, root, repeats) for method in TEXT_METHODS]
    traj = Trajectory.open(root)
    model = final_model(traj)
    embeddings = E1().embed(traj).offsets
    data = experiment_config(TEXT, quick)["evaluation"]["data"]
    inputs, targets = load_dataset(Ref(data["target"], data["kwargs"])).tensors[:2]

    def readout(fn: Callable[..., Any]) -> Callable[[], Any]:
        return lambda: fn(model, embeddings, inputs, targets, "loss", READOUT_BATCH)

    passes = [
        ("inference", lambda: infer(model.module, inputs, READOUT_BATCH)),
        ("linear read-out", readout(linear_effects)),
        ("evaluated read-out", readout(evaluated_effects)),
    ]
    passes_cost = [Cost(name, timed(fn, repeats)[1], float("nan")) for name, fn in passes]
    described = describe(traj, root, quick, TEXT) + f" Test set: {len(targets):,} comments."
    return described, costs, passes_cost


MEMORY_SIZES = (1_000, 10_000, 60_000)
"""Test-set sizes of the read-out memory table (MNIST's test images tiled to reach them)."""


@dataclass(frozen=True)
class ReadoutCost:
    """Seconds of one inference pass over ``examples`` inputs and of both read-outs of
    ``stages`` stage embeddings over them as they run, of the linear one as the vectorised jvp
    (``contract=False``), of the final model's per-example values alone (the evaluated
    read-out's theta_T pass) and of the evaluated read-out as a per-stage loop, in batches of
    ``READOUT_BATCH``. ``ratio``: seconds / (stages x inference seconds), a cost per stage in
    inference passes."""

    model: str
    examples: int
    stages: int
    inference: float
    linear: float
    evaluated: float
    linear_jvp: float
    final_values: float
    evaluated_per_stage: float

    def ratio(self, seconds: float) -> float:
        return seconds / (self.stages * self.inference)


def readout_cost(
    name: str,
    model: ModelAt,
    embeddings: Embeddings,
    inputs: Tensor,
    targets: Tensor,
    repeats: int,
) -> ReadoutCost:
    """Time inference and both read-outs (quantity loss), vectorised and per stage (the per
    stage evaluated loop computes f(theta_T) once, as the read-out did before)."""

    def linear_jvp() -> None:
        linear_effects(model, embeddings, inputs, targets, "loss", READOUT_BATCH, contract=False)

    def final_values() -> None:
        model.values(inputs, targets, "loss", READOUT_BATCH)

    def evaluated_per_stage() -> None:
        final = model.values(inputs, targets, "loss", READOUT_BATCH)
        for embedding in embeddings.values():
            final - model.moved(embedding).values(inputs, targets, "loss", READOUT_BATCH)

    def readout(fn: Callable[..., Any]) -> Callable[[], Any]:
        return lambda: fn(model, embeddings, inputs, targets, "loss", READOUT_BATCH)

    passes = [
        lambda: infer(model.module, inputs, READOUT_BATCH),
        readout(linear_effects),
        readout(evaluated_effects),
        linear_jvp,
        final_values,
        evaluated_per_stage,
    ]
    seconds = [timed(fn, repeats)[1] for fn in passes]
    return ReadoutCost(name, len(targets), len(embeddings), *seconds)


def text_readout_cost(quick: bool, repeats: int) -> ReadoutCost:
    """``readout_cost`` of E1's embeddings on the toxicity pipeline's test set."""
    traj = Trajectory.open(prepared_trajectory(quick, TEXT))
    data = experiment_config(TEXT, quick)["evaluation"]["data"]
    inputs, targets = load_dataset(Ref(data["target"], data["kwargs"])).tensors[:2]
    embeddings = E1().embed(traj).offsets
    return readout_cost(
        "toxicity (text transformer)", final_model(traj), embeddings, inputs, targets, repeats
    )


@dataclass(frozen=True)
class MemoryRow:
    """Peak resident memory (MiB) of one read-out of ``stages`` E1 embeddings over
    ``examples`` test inputs, above the process's memory once imports, the final model, the
    embeddings and the inputs are loaded; and its seconds."""

    readout: str
    examples: int
    stages: int
    peak_mib: float
    seconds: float


def measure_readout_memory(root: str, readout: str, examples: int) -> MemoryRow:
    """Run the audit's ``readout`` on ``examples`` MNIST test images (tiled); meant for a
    fresh process. A read-out of one batch first (lazy imports, the allocator's first buffers),
    then the peak is reset, so only what the read-out holds for the N examples counts."""
    traj = Trajectory.open(root)
    model = final_model(traj)
    embeddings = E1().embed(traj).offsets
    images, labels = mnist(split="test").tensors
    copies = -(-examples // len(labels))
    inputs = images.repeat(copies, *[1] * (images.ndim - 1))[:examples].contiguous()
    targets = labels.repeat(copies)[:examples].contiguous()
    del images, labels
    warm = slice(0, READOUT_BATCH)
    READOUTS[readout](model, embeddings, inputs[warm], targets[warm], "loss", READOUT_BATCH)
    reset_peak_rss()
    before = max_rss_kib()
    began = time.perf_counter()
    READOUTS[readout](model, embeddings, inputs, targets, "loss", READOUT_BATCH)
    seconds = time.perf_counter() - began
    return MemoryRow(
        readout, examples, len(embeddings), (max_rss_kib() - before) / KIB_PER_MIB, seconds
    )


FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
"""glibc's allocator with a fixed mmap threshold (128 KiB): freed batch buffers go back to the
system, so a peak shows what a read-out holds rather than the heap's fragmentation (glibc's
default threshold grows as buffers are freed and keeps them in the heap)."""


ON_DISK = {MEMMAP_VARIABLE: "0"}
"""Per-example results written to disk (``Results``), so that a peak is the working memory."""


def readout_memory(
    root: Path, readouts: Sequence[str] = tuple(READOUTS)
) -> tuple[list[MemoryRow], list[MemoryRow], list[MemoryRow]]:
    """``measure_readout_memory`` of ``readouts``, each in a fresh process (call it before
    loading data or models in this one): at every ``MEMORY_SIZES`` with the results on disk
    (``ON_DISK``) under ``FIXED_MMAP``; at the largest size with the results in RAM (the
    default below ``MEMMAP_ABOVE``) under ``FIXED_MMAP``; and there under glibc's default."""
    fixed, in_ram, default = [], [], []
    largest = max(MEMORY_SIZES)
    for readout in readouts:
        with environment({**FIXED_MMAP, **ON_DISK}):
            fixed += [
                in_fresh_process(measure_readout_memory, str(root), readout, n)
                for n in MEMORY_SIZES
            ]
        with environment(FIXED_MMAP):
            in_ram.append(in_fresh_process(measure_readout_memory, str(root), readout, largest))
        default.append(in_fresh_process(measure_readout_memory, str(root), readout, largest))
    return fixed, in_ram, default


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` (which child processes inherit), then restored."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def readout_cost_table(costs: Sequence[ReadoutCost]) -> list[str]:
    """The read-out cost per stage, in inference passes, vectorised and per stage."""
    return [
        "### Read-out cost per stage",
        "",
        "Seconds of a read-out of K E1 stage embeddings over the test set divided by K x the "
        "seconds of one inference pass (`torch.no_grad` forward) over it, quantity loss, batches "
        f"of {READOUT_BATCH}. Linear: as it runs, contracted in reverse mode (one forward, one "
        "backward to the activations, about one forward per stage), and as the vectorised jvp "
        "(`contract=False`: the primal once, K tangent passes batched with `torch.func.vmap`). "
        "Evaluated: K + 1 plain passes (theta_T's once); beyond theta_T: the same less the "
        "seconds of theta_T's own pass (the behaviour's value itself), the cost each added "
        "stage brings; per-stage loop: theta_T once, then one pass per stage through "
        "`ModelAt.moved`. Aims: linear <= 2, evaluated <= 1.2 (floors: docs/scale.md).",
        "",
        "| model | examples | K | inference s | linear | linear, vectorised jvp | evaluated | "
        "evaluated, beyond theta_T | evaluated, per-stage loop |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {c.model} | {c.examples:,} | {c.stages} | {c.inference:.3g} | "
            f"{c.ratio(c.linear):.3g} | {c.ratio(c.linear_jvp):.3g} | "
            f"{c.ratio(c.evaluated):.3g} | {c.ratio(c.evaluated - c.final_values):.3g} | "
            f"{c.ratio(c.evaluated_per_stage):.3g} |"
            for c in costs
        ),
        "",
    ]


def memory_table(
    rows: tuple[Sequence[MemoryRow], Sequence[MemoryRow], Sequence[MemoryRow]],
) -> list[str]:
    """Peak memory of the audit's read-outs at growing test-set sizes (``readout_memory``)."""
    fixed, in_ram, default = rows
    sizes = sorted({r.examples for r in fixed})
    by = {(r.readout, r.examples): r for r in fixed}
    at_ram = {r.readout: r for r in in_ram}
    at_default = {r.readout: r for r in default}
    readouts = list(dict.fromkeys(r.readout for r in fixed))

    def spread(readout: str) -> str:
        peaks = [by[readout, n].peak_mib for n in sizes]
        return f"{max(peaks) / min(peaks) - 1:.0%}" if min(peaks) > 0 else "n/a"

    return [
        f"### Read-out memory ({fixed[0].stages} E1 stage embeddings, MNIST test images tiled)",
        "",
        "Peak MiB: the largest rise of peak resident memory (`ru_maxrss`) during one read-out "
        "above the memory once imports, the final model, the embeddings and the inputs "
        f"({max(sizes) * 784 * 4 / 2**20:.0f} MiB at {max(sizes):,} images) are loaded; a "
        f"fresh process per cell, one read-out of {READOUT_BATCH} examples first, then the "
        f"peak is reset. Batches of {READOUT_BATCH}; per-example results written to disk "
        f"(`{MEMMAP_VARIABLE}=0`: mapped back unread, docs/scale.md), so that the peak is the "
        "read-out's working memory; the column after the spread keeps them in RAM (the default "
        f"below {MEMMAP_ABOVE:,} numbers: K x N x 8 bytes more). Under glibc's allocator with "
        f"a fixed mmap threshold (`MALLOC_MMAP_THRESHOLD_={FIXED_MMAP['MALLOC_MMAP_THRESHOLD_']}`),"
        " so that freed batch buffers leave; the last column, glibc's default (the heap keeps "
        "freed buffers, fragmented).",
        "",
        "| read-out | "
        + " | ".join(f"{n:,} examples: peak MiB (s)" for n in sizes)
        + f" | largest / smallest peak - 1 | {max(sizes):,}, results in RAM: peak MiB "
        f"| {max(sizes):,}, glibc default: peak MiB |",
        "|---|" + "---|" * (len(sizes) + 3),
        *(
            f"| {readout} | "
            + " | ".join(
                f"{by[readout, n].peak_mib:.1f} ({by[readout, n].seconds:.2g})" for n in sizes
            )
            + f" | {spread(readout)} | {at_ram[readout].peak_mib:.1f} "
            f"| {at_default[readout].peak_mib:.1f} |"
            for readout in readouts
        ),
        "",
    ]


def render(
    command: str,
    trajectory: str,
    repeats: int,
    costs: Sequence[Cost],
    throughput: Throughput,
    gradients: Sequence[GradientRow],
    text: tuple[str, Sequence[Cost], Sequence[Cost]],
    readout_costs: Sequence[ReadoutCost] = (),
    memory: tuple[Sequence[MemoryRow], Sequence[MemoryRow], Sequence[MemoryRow]] | None = None,
) -> str:
    """The Markdown section: provenance, then the tables."""
    truth = next(c.seconds for c in costs if c.method == "ground truth")
    readout = gradients[0].seconds
    lines = [
        *provenance(
            "## Cost and throughput (generated)",
            "by the command below; rerun it (or `make bench`) to refresh it.",
            command,
        ),
        f"Trajectory: {trajectory}",
        "",
        "### Cost of the stage embeddings",
        "",
        f"Each row: {repeats} fresh process(es), median seconds; peak MiB: the largest rise of",
        "peak resident memory (`ru_maxrss`) above the resident memory after imports, opening the",
        "trajectory and loading its stages' data (the peak is reset there). Ground truth:",
        "retraining without every stage; estimators: `embed`; neither stores nor reuses anything.",
        "",
        "| method | seconds | peak MiB | x ground truth |",
        "|---|---|---|---|",
        *(
            f"| {c.method} | {c.seconds:.3g} | {c.peak_mib:.1f} | {c.seconds / truth:.3g} |"
            for c in costs
        ),
        "",
        f"### Read-out throughput ({throughput.stages} E1 stage embeddings, "
        f"{throughput.examples:,} test images, quantity loss, batches of {READOUT_BATCH})",
        "",
        "| pass | examples/s | x inference time |",
        "|---|---|---|",
        f"| inference (`torch.no_grad` forward) | {throughput.inference:,.0f} | 1 |",
        f"| linear read-out | {throughput.linear:,.0f} | "
        f"{throughput.inference / throughput.linear:.3g} |",
        f"| evaluated read-out | {throughput.evaluated:,.0f} | "
        f"{throughput.inference / throughput.evaluated:.3g} |",
        "",
        f"### Linear read-out against per-example gradients ({GRADIENT_EXAMPLES:,} test images, "
        f"{throughput.stages} E1 stage embeddings)",
        "",
        "The linear read-out as it runs (contracted in reverse mode, docs/scale.md), the "
        "vectorised jvp it replaced, and per-example gradients dotted with the embeddings.",
        "",
        "| method | batch | seconds | x the read-out's seconds | max abs diff from the "
        "read-out (nats) |",
        "|---|---|---|---|---|",
        *(
            f"| {r.method} | {r.batch} | {r.seconds:.3g} | {r.seconds / readout:.3g} | "
            f"{r.max_abs_diff:.2g} |"
            for r in gradients
        ),
        "",
        *text_table(*text),
        *(["", *readout_cost_table(readout_costs)] if readout_costs else []),
        *(memory_table(memory) if memory else []),
    ]
    return "\n".join(lines).rstrip("\n")


def text_table(described: str, costs: Sequence[Cost], passes: Sequence[Cost]) -> list[str]:
    """The toxicity pipeline's table: each method's and each read-out's seconds against the
    truth (retraining without every stage)."""
    truth = next(c.seconds for c in costs if c.method == "ground truth")
    inference = passes[0].seconds
    return [
        "### The toxicity pipeline: estimators and read-outs against its retraining",
        "",
        f"Trajectory: {described} Estimators: `embed` in fresh processes, as above; read-outs: "
        f"3 E1 stage embeddings over the test set, quantity loss, batches of {READOUT_BATCH}, "
        "in one process.",
        "",
        "| method | seconds | x ground truth | x inference |",
        "|---|---|---|---|",
        *(f"| {c.method} | {c.seconds:.3g} | {c.seconds / truth:.3g} | |" for c in costs),
        *(
            f"| {p.method} | {p.seconds:.3g} | {p.seconds / truth:.3g} | "
            f"{p.seconds / inference:.3g} |"
            for p in passes
        ),
    ]


GROWTH_PRESET = "cost_growth"
GROWTH_METHODS = (
    "ground truth", "e0", "e1", "e2", "e3 (rank 5, 128 examples, end)", "e4:2", "subset:0.25",
    AUDIT_REPLAY,
)  # fmt: skip
"""What the cost-growth table times (``METHODS`` names), then the two read-outs. E3 at its
cheap settings: at its defaults its Lanczos on a transformer costs minutes at every point."""


@dataclass(frozen=True)
class GrowthPoint:
    """One size of the ``preset=cost_growth`` toxicity pipeline: the transformer's width,
    heads, depth and feed-forward width, each stage's steps, and the test comments (their
    identity copies double them) that the read-outs score."""

    dim: int
    heads: int
    layers: int
    hidden: int
    pretrain: int
    finetune: int
    adapt: int
    test: int = 200

    def overrides(self) -> list[str]:
        """The Hydra overrides of ``experiment=toxicity preset=cost_growth`` for this point."""
        kwargs = "model.kwargs"
        stages = "pipeline.stages"
        return [
            f"{kwargs}.dim={self.dim}",
            f"{kwargs}.heads={self.heads}",
            f"{kwargs}.layers={self.layers}",
            f"{kwargs}.hidden={self.hidden}",
            f"{stages}.pretrain.steps={self.pretrain}",
            f"{stages}.finetune.steps={self.finetune}",
            f"{stages}.adapt.steps={self.adapt}",
            f"evaluation.data.kwargs.stop={self.test}",
        ]


GROWTH_GRIDS = {
    "quick": (GrowthPoint(16, 2, 1, 32, 5, 10, 5, 50), GrowthPoint(16, 2, 1, 32, 5, 20, 5, 50)),
    "grid": (
        GrowthPoint(32, 2, 1, 64, 20, 100, 20),
        GrowthPoint(64, 2, 2, 128, 20, 100, 20),
        GrowthPoint(64, 2, 2, 128, 20, 300, 40),
        GrowthPoint(128, 4, 2, 256, 20, 300, 40),
    ),
    "full": (GrowthPoint(320, 4, 6, 1280, 200, 3000, 500, 2000),),
}
"""Points of the cost-growth table: ``quick`` (``--quick``), ``grid`` (the default) and
``grid`` plus the preset's full size (``--growth full``: hours on a CPU)."""


@dataclass(frozen=True)
class GrowthRow:
    """One point's final-model parameters, later-stage steps (after pretraining) and the
    seconds of each of ``GROWTH_METHODS`` and of both read-outs."""

    point: GrowthPoint
    parameters: int
    later_steps: int
    seconds: Mapping[str, float]


def growth_trajectory(point: GrowthPoint) -> tuple[Path, dict[str, Any]]:
    """The point's recorded pipeline (recorded once per configuration under ``runs/bench/``)
    and its evaluation data reference (``target``, ``kwargs``)."""
    overrides = ["experiment=toxicity", f"preset={GROWTH_PRESET}", *point.overrides()]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(
            compose(config_name="config", overrides=overrides), resolve=True
        )
    spec = PipelineSpec.from_dict(cfg["pipeline"]).to_dict()
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    root = CACHE / f"{GROWTH_PRESET}-{digest}"
    if not ((root / MANIFEST).is_file() and Trajectory.open(root).complete):
        in_fresh_process(build, spec, str(root))
    return root, cfg["evaluation"]["data"]


def measure_growth(root: str, data: dict[str, Any]) -> dict[str, float]:
    """Seconds of each of ``GROWTH_METHODS`` once, then of the linear and evaluated read-outs
    of E1's embeddings over the test data ``data`` (``target``, ``kwargs``; each after a
    warm-up run), in this process; meant for a fresh one, data loaded before the clock."""
    importlib.import_module("torch._dynamo")
    traj = Trajectory.open(root, cache=False)
    for record in traj.stages:
        load_dataset(record.data)
    seconds = {}
    for method in GROWTH_METHODS:
        began = time.perf_counter()
        METHODS[method](traj)
        seconds[method] = time.perf_counter() - began
    model = final_model(traj)
    embeddings = E1().embed(traj).offsets
    inputs, targets = load_dataset(Ref(data["target"], data["kwargs"])).tensors[:2]
    readouts = {"linear read-out": linear_effects, "evaluated read-out": evaluated_effects}
    for name, readout in readouts.items():
        seconds[name] = timed(
            lambda fn=readout: fn(model, embeddings, inputs, targets, "loss", READOUT_BATCH), 1
        )[1]
    return seconds


def cost_growth(points: Sequence[GrowthPoint]) -> list[GrowthRow]:
    """Every point recorded (or reused) and measured, each in a fresh process."""
    rows = []
    for point in points:
        root, data = growth_trajectory(point)
        traj = Trajectory.open(root)
        size = sum(p.numel() for p in traj.build_model(len(traj.stages) - 1).parameters())
        later = sum(r.num_steps for r in traj.stages[1:])
        seconds = in_fresh_process(measure_growth, str(root), data)
        rows.append(GrowthRow(point, size, later, seconds))
    return rows


def growth_table(rows: Sequence[GrowthRow], figure: Path) -> list[str]:
    """The cost-growth section: per point, the truth's seconds and every method's seconds as
    a multiple of them; and the figure's link."""
    names = [*GROWTH_METHODS[1:], "linear read-out", "evaluated read-out"]
    where = figure.relative_to(REPO) if figure.is_relative_to(REPO) else figure
    return [
        "### Cost growth: estimators against the truth as the model and the later stages grow",
        "",
        f"`experiment=toxicity preset={GROWTH_PRESET}` at smaller sizes (width, heads, depth, "
        "feed-forward width and steps per stage overridden); each point's methods run once in "
        "one fresh process; read-outs: 3 E1 stage embeddings over the point's test comments "
        f"and their identity copies, batches of {READOUT_BATCH}. Cells: seconds, then × the "
        "truth (retraining without every stage). Figure: "
        f"[`{where}`]({where}); why E2 stays above the truth: `docs/scale.md`.",
        "",
        "| model (dim/heads/layers/hidden) | parameters | steps (pre/fine/adapt) | test | "
        + " | ".join(["truth s", *names])
        + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
        *(
            f"| {r.point.dim}/{r.point.heads}/{r.point.layers}/{r.point.hidden} | "
            f"{r.parameters:,} | {r.point.pretrain}/{r.point.finetune}/{r.point.adapt} | "
            f"{2 * r.point.test:,} | {r.seconds['ground truth']:.3g} | "
            + " | ".join(
                f"{r.seconds[n]:.3g} ({r.seconds[n] / r.seconds['ground truth']:.2g}×)"
                for n in names
            )
            + " |"
            for r in rows
        ),
    ]


def growth_plot(rows: Sequence[GrowthRow], path: Path) -> None:
    """Each method's seconds against the truth's (log-log, the diagonal is parity), and its
    multiple of the truth by point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*GROWTH_METHODS[1:], "linear read-out", "evaluated read-out"]
    truth = [r.seconds["ground truth"] for r in rows]
    order = sorted(range(len(rows)), key=truth.__getitem__)  # the left panel by the truth's
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        seconds = [r.seconds[name] for r in rows]
        left.plot([truth[i] for i in order], [seconds[i] for i in order], marker="o", label=name)
        right.plot(
            range(len(rows)), [s / t for s, t in zip(seconds, truth, strict=True)], marker="o"
        )
    span = [min(truth), max(truth)]
    left.plot(span, span, color="black", linestyle="--", linewidth=1, label="= truth")
    left.set(xscale="log", yscale="log", xlabel="truth: retraining without every stage (s)")
    left.set(ylabel="method (s)", title="seconds")
    left.legend(fontsize=7)
    right.axhline(1.0, color="black", linestyle="--", linewidth=1)
    right.set(yscale="log", ylabel="× truth", title="multiple of the truth")
    right.set_xticks(
        range(len(rows)),
        [f"{r.parameters / 1e6:.2g}M\n{r.later_steps} steps" for r in rows],
        fontsize=7,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def growth_section(quick: bool, growth: str) -> list[str]:
    """The cost-growth table and figure (``docs/figures/cost_growth.png``; under ``--quick``
    ``runs/bench/cost_growth.png``), or nothing with ``--growth off``."""
    if growth == "off":
        return []
    points = GROWTH_GRIDS["quick" if quick else "grid"]
    if growth == "full" and not quick:
        points = (*points, *GROWTH_GRIDS["full"])
    rows = cost_growth(points)
    figure = (CACHE if quick else REPO / "docs" / "figures") / "cost_growth.png"
    growth_plot(rows, figure)
    return ["", *growth_table(rows, figure)]


def benchmark(quick: bool, command: str, growth: str = "grid") -> str:
    """Every measurement, rendered. Child processes first, while this one is still small."""
    growth_lines = growth_section(quick, growth)
    root = prepared_trajectory(quick)
    repeats = 1 if quick else 3
    costs = [measured_cost(method, root, repeats) for method in METHODS]
    memory = readout_memory(root, ["evaluated"] if quick else list(READOUTS))
    text = text_costs(quick, repeats)
    traj = Trajectory.open(root)
    model = final_model(traj)
    embeddings = E1().embed(traj).offsets
    inputs, targets = mnist(split="test").tensors
    throughput = readout_throughput(model, embeddings, inputs, targets, 1 if quick else 5)
    gradients = gradient_comparison(
        model, embeddings, inputs[:GRADIENT_EXAMPLES], targets[:GRADIENT_EXAMPLES], repeats
    )
    readout_costs = [
        readout_cost("stages_mnist (MLP)", model, embeddings, inputs, targets, 1 if quick else 5),
        text_readout_cost(quick, 1 if quick else 5),
    ]
    described = describe(traj, root, quick)
    section = render(
        command, described, repeats, costs, throughput, gradients, text, readout_costs, memory
    )
    return "\n".join([section, *growth_lines])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the section and write it into ``--out``. Exit 0, or 2 (bad
    ``--out``), or 1 (the read-outs disagree)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__)
    parser.add_argument("--out", type=Path, help="Markdown file holding the two marker lines")
    parser.add_argument("--quick", action="store_true", help="preset=smoke, one repeat")
    parser.add_argument(
        "--growth", choices=("grid", "full", "off"), default="grid",
        help="cost-growth table: its grid, plus the full preset=cost_growth (hours), or none",
    )  # fmt: skip
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "experiments.bench", *argv])
    return publish(args.out, SECTION, lambda: benchmark(args.quick, command, args.growth))


if __name__ == "__main__":
    sys.exit(main())

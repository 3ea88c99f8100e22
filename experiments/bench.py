"""What stage embeddings and read-outs cost, measured on the stages_mnist and toxicity pipelines.

``python -m experiments.bench [--out docs/results.md] [--quick]`` records (or reuses, under
``runs/bench/``) the pipelines' trajectories, then measures on stages_mnist:

- the seconds and peak memory of the ground truth (retraining without every stage) and of each
  estimator's ``embed``, each in a fresh process so that its peak memory is its own;
- the throughput of the linear and evaluated read-outs against plain inference;
- the jvp read-out against per-example gradients (``vmap(grad)`` and a ``backward`` loop), and
  that the three agree;

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
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
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

from attribution.analysis.readout import evaluated_effects, linear_effects
from attribution.record.counterfactual import check_skippable, retrain_after
from attribution.record.evaluation import ModelAt, final_model, per_example
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
}
"""What table (i) measures, by the name it shows; ``embed``, never ``stored_embeddings``."""
TEXT_METHODS = ("ground truth", "e0", "e1", "e2", "e4:2", "subset:0.25")
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
    seconds, and largest absolute difference from the jvp read-out (nats)."""

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
    traj = Trajectory.open(root)
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
    """The jvp read-out against per-example gradients on the same examples; refuses (exit 1)
    if they disagree by ``TOLERANCE`` or more."""
    jvp, jvp_s = timed(
        lambda: linear_effects(model, embeddings, inputs, targets, "loss", READOUT_BATCH),
        repeats,
    )
    batched, batched_s = timed(
        lambda: vmap_gradient_effects(model, embeddings, inputs, targets), repeats
    )
    looped, looped_s = timed(
        lambda: loop_gradient_effects(model, embeddings, inputs, targets), repeats
    )
    rows = [
        GradientRow("jvp (`linear_effects`)", READOUT_BATCH, jvp_s, 0.0),
        GradientRow(
            "`vmap(grad)`, then dot", GRADIENT_BATCH, batched_s, max_abs_diff(jvp, batched)
        ),
        GradientRow("loop of `backward`, then dot", 1, looped_s, max_abs_diff(jvp, looped)),
    ]
    worst = max(r.max_abs_diff for r in rows)
    if worst >= TOLERANCE:
        raise SectionError(
            f"the jvp read-out and per-example gradients disagree by {worst:.3g} nats "
            f"(tolerance {TOLERANCE:g}): a read-out is wrong",
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


def render(
    command: str,
    trajectory: str,
    repeats: int,
    costs: Sequence[Cost],
    throughput: Throughput,
    gradients: Sequence[GradientRow],
    text: tuple[str, Sequence[Cost], Sequence[Cost]],
) -> str:
    """The Markdown section: provenance, then the four tables."""
    truth = next(c.seconds for c in costs if c.method == "ground truth")
    jvp = gradients[0].seconds
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
        f"### jvp read-out against per-example gradients ({GRADIENT_EXAMPLES:,} test images, "
        f"{throughput.stages} E1 stage embeddings)",
        "",
        "| method | batch | seconds | jvp speed-up | max abs diff from jvp (nats) |",
        "|---|---|---|---|---|",
        *(
            f"| {r.method} | {r.batch} | {r.seconds:.3g} | {r.seconds / jvp:.3g} | "
            f"{r.max_abs_diff:.2g} |"
            for r in gradients
        ),
        "",
        *text_table(*text),
    ]
    return "\n".join(lines)


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


def benchmark(quick: bool, command: str) -> str:
    """Every measurement, rendered. Child processes first, while this one is still small."""
    root = prepared_trajectory(quick)
    repeats = 1 if quick else 3
    costs = [measured_cost(method, root, repeats) for method in METHODS]
    text = text_costs(quick, repeats)
    traj = Trajectory.open(root)
    model = final_model(traj)
    embeddings = E1().embed(traj).offsets
    inputs, targets = mnist(split="test").tensors
    throughput = readout_throughput(model, embeddings, inputs, targets, 1 if quick else 5)
    gradients = gradient_comparison(
        model, embeddings, inputs[:GRADIENT_EXAMPLES], targets[:GRADIENT_EXAMPLES], repeats
    )
    return render(command, describe(traj, root, quick), repeats, costs, throughput, gradients, text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the section and write it into ``--out``. Exit 0, or 2 (bad
    ``--out``), or 1 (the read-outs disagree)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__)
    parser.add_argument("--out", type=Path, help="Markdown file holding the two marker lines")
    parser.add_argument("--quick", action="store_true", help="preset=smoke, one repeat")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "experiments.bench", *argv])
    return publish(args.out, SECTION, lambda: benchmark(args.quick, command))


if __name__ == "__main__":
    sys.exit(main())

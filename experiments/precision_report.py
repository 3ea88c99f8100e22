"""The fidelity cost of bfloat16 against float32, measured on one recorded run.

``python -m experiments.precision_report RUN_DIR [--behaviors FILE] [--device auto]
[--batch-size 512] [--out docs/results.md]`` opens a recorded run (a Hydra run directory holding
``trajectory/`` and ``behaviors.yaml``, e.g. ``experiment=stages_mnist`` or the fidelity smoke
preset; or a trajectory with ``--behaviors``) and, for each per-example behaviour and each stage,
compares with the float32 result:

- the two read-outs (linear, evaluated) run in bfloat16 (``dtype=bfloat16``: the model, the
  embeddings and the inputs cast; ``attribution.record.evaluation``) of the float32 truth's
  embeddings, against the same read-outs in float32;
- the truth retrained in bfloat16 (``Compute.training_dtype``) and evaluated in float32, which
  isolates the replays' precision, against the float32 truth;
- the truth retrained and evaluated in bfloat16, what ``stagetrace --dtype bfloat16 validate``
  computes, against the float32 truth.

Per stage: Pearson and sign agreement of the per-example effects, the float32 mean effect and the
bfloat16 mean-effect error (units of the quantity); and the wall seconds of the float32 and
bfloat16 work, after a warm-up. Everything is computed afresh in memory (nothing is read from or
written to the run's cache), so the seconds are those of the work itself. It prints, and with
``--out`` writes between ``<!-- precision:start -->`` and ``<!-- precision:end -->``. Exit 2 on
bad input.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from torch import Tensor

from attribution.analysis import metrics
from attribution.analysis.audit import default_behaviors_file, load_behaviors
from attribution.analysis.behaviors import Behavior
from attribution.analysis.readout import evaluated_effects, linear_effects
from attribution.record.compute import Compute, using
from attribution.record.counterfactual import skip_stages
from attribution.record.errors import StagetraceError
from attribution.record.evaluation import ModelAt, final_model
from attribution.record.pipeline import step_seconds
from attribution.record.trajectory import Trajectory
from estimators import build
from experiments.sections import SectionError, provenance, publish

SECTION = "precision"
READOUTS = {"linear": linear_effects, "evaluated": evaluated_effects}
Effects = dict[str, Tensor]
"""Stage -> [N] float64 per-example effects."""
T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    """One stage of one behaviour: a bfloat16 computation against its float32 counterpart."""

    work: str
    behavior: str
    stage: str
    pearson: float
    sign_agreement: float
    mean_effect: float
    mean_effect_error: float


@dataclass(frozen=True)
class Cost:
    """Seconds of one piece of work in float32 and in bfloat16 (all behaviours and stages)."""

    work: str
    float32: float
    bfloat16: float


def trajectory_of(run: Path) -> Trajectory:
    """The run's trajectory (``RUN/trajectory`` or ``RUN`` itself), opened with an in-memory
    cache so that every retraining is computed here and nothing is written."""
    root = run / "trajectory" if (run / "trajectory" / "manifest.json").is_file() else run
    return Trajectory.open(root, cache=False)


def per_example_behaviors(path: Path) -> dict[str, Behavior]:
    """The per-example behaviours of a behaviours file, one per distinct (data, quantity)."""
    chosen: dict[str, Behavior] = {}
    seen = set()
    for name, behavior in load_behaviors(path).items():
        key = json.dumps([behavior.data.to_dict(), behavior.quantity], sort_keys=True)
        if behavior.aggregate == "per_example" and key not in seen:
            seen.add(key)
            chosen[name] = behavior
    if not chosen:
        raise SectionError(
            f"{path} declares no per-example behaviour. Fix: give a run of "
            "experiment=stages_mnist or experiment=fidelity (test_loss, test_margin), or "
            "--behaviors FILE with one",
            status=2,
        )
    return chosen


def timed(work: Callable[[], T]) -> tuple[T, float]:
    """``work()`` and its wall seconds."""
    began = time.perf_counter()
    out = work()
    return out, time.perf_counter() - began


def retrained(traj: Trajectory) -> dict[str, dict[str, Tensor]]:
    """The final state without each stage, retrained on the current compute."""
    return {stage: cf.state for stage, cf in skip_stages(traj).items()}


def warm_up(
    traj: Trajectory,
    model: ModelAt,
    data: Mapping[str, tuple[Tensor, Tensor]],
    computes: Sequence[Compute],
) -> None:
    """What runs once per process before the timings, so that no timed piece pays for it: the
    stages' data loaded, a few training steps of every stage (``step_seconds``), an evaluation
    and both read-outs of a few examples, in every compute."""
    inputs, targets = next(iter(data.values()))
    few = (inputs[:8], targets[:8])
    offsets = build("e0").embed(traj).offsets
    for compute in computes:
        with using(compute):
            for j in range(len(traj.stages)):
                step_seconds(traj, j)
            model.values(*few, "loss")
            for readout in READOUTS.values():
                readout(model, offsets, *few, "loss")


def measure(
    traj: Trajectory, behaviors: Mapping[str, Behavior], device: str, batch_size: int
) -> tuple[list[Row], list[Cost]]:
    """Every comparison of the module docstring, per behaviour and stage, and the seconds of
    each piece of work in both precisions."""
    exact, low = Compute(device, "float32").check("--device"), Compute(device, "bfloat16")
    data = {name: b.load()[:2] for name, b in behaviors.items()}
    model = final_model(traj)
    warm_up(traj, model, data, [exact, low])

    def truth(states: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Effects]:
        """f(theta_T) - f(theta^(-k)) per behaviour, stage and example."""
        out = {}
        for name, behavior in behaviors.items():
            inputs, targets = data[name]
            final = model.values(inputs, targets, behavior.quantity, batch_size)
            out[name] = {
                s: final - model.at(state).values(inputs, targets, behavior.quantity, batch_size)
                for s, state in states.items()
            }
        return out

    def read(readout: str) -> dict[str, Effects]:
        return {
            name: READOUTS[readout](model, embeddings, *data[name], b.quantity, batch_size)
            for name, b in behaviors.items()
        }

    with using(exact):
        states, retraining = timed(lambda: retrained(traj))
        exact_truth, evaluation = timed(lambda: truth(states))
        embeddings = build("truth").embed(traj).offsets  # the retrainings above, in memory
        exact_reads = {r: timed(partial(read, r)) for r in READOUTS}
    with using(low):
        low_states, low_retraining = timed(lambda: retrained(traj))
        low_truth, low_evaluation = timed(lambda: truth(low_states))
        low_reads = {r: timed(partial(read, r)) for r in READOUTS}
    with using(exact):
        replayed = truth(low_states)
    compared = {
        **{f"{r} read-out in bfloat16": (exact_reads[r][0], low_reads[r][0]) for r in READOUTS},
        "truth retrained in bfloat16, evaluated in float32": (exact_truth, replayed),
        "truth retrained and evaluated in bfloat16": (exact_truth, low_truth),
    }
    costs = [
        Cost("retraining without each stage", retraining, low_retraining),
        Cost("evaluating the truth (final and retrained models)", evaluation, low_evaluation),
        *(
            Cost(f"{r} read-out of every stage", exact_reads[r][1], low_reads[r][1])
            for r in READOUTS
        ),
    ]
    rows = []
    for work, (reference, approximate) in compared.items():
        for name in behaviors:
            for stage in traj.names:
                a, b = approximate[name][stage].numpy(), reference[name][stage].numpy()
                rows.append(
                    Row(
                        work,
                        name,
                        stage,
                        metrics.pearson(a, b),
                        metrics.sign_agreement(a, b),
                        float(b.mean()),
                        metrics.mean_effect_error(a, b),
                    )
                )
    return rows, costs


def section(
    run: Path, behaviors_file: Path | None, device: str, batch_size: int, command: str
) -> str:
    """The generated Markdown section for ``run`` (behaviours from ``behaviors_file``, by
    default the run's ``behaviors.yaml``)."""
    try:
        traj = trajectory_of(run)
        behaviors = per_example_behaviors(behaviors_file or default_behaviors_file(run))
        rows, costs = measure(traj, behaviors, device, batch_size)
    except StagetraceError as exc:
        raise SectionError(str(exc), status=2) from exc
    examples = {name: len(b.load()[1]) for name, b in behaviors.items()}
    steps = ", ".join(f"{r.name} {r.num_steps}" for r in traj.stages)
    resolved = Compute(device).torch_device
    lines = [
        *provenance(
            "### bfloat16 against float32 (generated)",
            f"from the run `{run}` by the command below, on `{resolved}`.",
            command,
        ),
        "",
        f"Stages (steps): {steps}. Behaviours (examples): "
        + ", ".join(f"`{n}` ({k})" for n, k in examples.items())
        + ". Each bfloat16 result against its float32 counterpart, per example; the mean-effect "
        "error is the bfloat16 mean minus the float32 one, in the units of the quantity.",
        "",
        "| bfloat16 work | behaviour | stage skipped | Pearson | sign agreement | "
        "mean effect (float32) | mean-effect error |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r.work} | {r.behavior} | {r.stage} | {r.pearson:.6f} | "
            f"{r.sign_agreement:.3f} | {r.mean_effect:+.5f} | {r.mean_effect_error:+.5f} |"
            for r in rows
        ),
        "",
        "| work | float32 seconds | bfloat16 seconds |",
        "|---|---|---|",
        *(f"| {c.work} | {c.float32:.2f} | {c.bfloat16:.2f} |" for c in costs),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m experiments.precision_report RUN [--device D] [--batch-size B] [--out F]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run", type=Path, help="a recorded run directory (with trajectory/)")
    parser.add_argument(
        "--behaviors", type=Path, help="behaviours file (default: the run's behaviors.yaml)"
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", type=Path, help="Markdown file holding the two marker lines")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "experiments.precision_report", *argv])
    return publish(
        args.out,
        SECTION,
        lambda: section(args.run, args.behaviors, args.device, args.batch_size, command),
    )


if __name__ == "__main__":
    sys.exit(main())

"""The ``stagetrace`` command line (``stagetrace --help``).

Exit status: 0 success, 1 a verification found a difference, 2 bad input (the message says what
is wrong and how to fix it; with ``--debug`` the traceback is shown instead).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from attribution.analysis.audit import Audit, audit, default_behaviors_file, load_behaviors
from attribution.analysis.behaviors import Behavior
from attribution.analysis.choice import DEFAULT_BUDGET, UNKNOWN_START, Label, plan
from attribution.analysis.report import check_report, examples_of, write_report
from attribution.analysis.validate import Ceiling, Validation, validate
from attribution.record import SIGN_CONVENTION, distributed
from attribution.record.artifacts import check_writable
from attribution.record.checkpoint_spec import Built, check_estimator, is_spec_file, load_spec
from attribution.record.checkpoint_spec import build as build_checkpoints
from attribution.record.compute import Compute, current, using
from attribution.record.counterfactual import folder_of, skip_stages
from attribution.record.errors import SpecError, StagetraceError
from attribution.record.pipeline import max_abs_diff, replay
from attribution.record.references import trust
from attribution.record.store import DiskStore
from attribution.record.trajectory import Trajectory
from estimators import EVIDENCE, build_all
from estimators import build as build_estimator

EPILOG = """\
exit status: 0 success, 1 a verification found a difference (replay --verify), 2 bad input
(one message naming the file, field or stage and the fix; nothing written).

RUN is a trajectory directory, or a Hydra run directory holding one in trajectory/. A run may
come from someone else: the code it names (model, data, losses) runs only from the project's
own packages and the modules you trust (--trust-module, or STAGETRACE_TRUST=mod1,mod2).

--device and --dtype choose where and in what precision replays, retraining and read-outs run
(default auto, float32); results are handed back and stored on the CPU (docs/scale.md).

validate and counterfactual also run under torchrun (torchrun --nproc-per-node N -m
attribution.analysis.cli validate RUN ...): the ranks share the retrainings and read-outs and
rank 0 writes and prints the result one process would (docs/scale.md)."""

RUN_HELP = "trajectory directory (or a Hydra run directory holding one in trajectory/)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stagetrace",
        description="Which training stage is accountable for a behaviour of the final model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--trust-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="let the run's references import MODULE (repeatable); see the note below",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (bad input too)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        metavar="{auto,cpu,cuda,cuda:N}",
        help="where replays, retraining and read-outs run (default auto: a GPU if torch sees "
        "one; under torchrun each rank takes cuda:LOCAL_RANK)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="float32 (default), or bfloat16 read-outs and replays/retraining (an "
        "approximation, kept apart in the cache; docs/scale.md)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    show = commands.add_parser("inspect", help="list the stages of a recorded run")
    show.add_argument("run", metavar="RUN", help=RUN_HELP)

    rerun = commands.add_parser(
        "replay", help="re-run a recorded run and compare it with the record"
    )
    rerun.add_argument("run", metavar="RUN", help=RUN_HELP)
    rerun.add_argument(
        "--verify",
        action="store_true",
        help="exit 1 unless the replay reproduces every checkpoint exactly",
    )

    cf = commands.add_parser("counterfactual", help="retrain the run with one stage skipped")
    cf.add_argument("run", metavar="RUN", help=RUN_HELP)
    cf.add_argument(
        "--skip",
        required=True,
        action="append",
        metavar="STAGE",
        help="name of the stage to skip (repeatable: one retraining per stage, shared out "
        "among the ranks under torchrun)",
    )
    _cache_options(cf)

    for name, helptext in (
        ("audit", "attribute behaviours to stages with an estimator"),
        ("validate", "compare estimators with skip-stage retraining"),
    ):
        sub = commands.add_parser(name, help=helptext)
        spec_help = "; or an audit spec SPEC.yaml of checkpoints (docs/audit.md)"
        sub.add_argument(
            "run", metavar="RUN", help=RUN_HELP + (spec_help if name == "audit" else "")
        )
        if name == "audit":
            sub.add_argument(
                "--estimator",
                default="auto",
                help="auto (default: the truth when it fits the budget, else the most faithful "
                "estimate that does), truth, subset:BUDGET, e0, e1, e2, e3 or e4:STRIDE",
            )
            sub.add_argument(
                "--budget",
                type=float,
                default=DEFAULT_BUDGET,
                metavar="SECONDS",
                help=f"what auto may spend (default {DEFAULT_BUDGET:g} s)",
            )
            sub.add_argument(
                "--readout",
                default="evaluated",
                help="evaluated (default: exact wherever the embedding is) or linear",
            )
        else:
            sub.add_argument(
                "--estimators",
                default="e0,e1,e2",
                help="comma-separated: e0, e1, e2, e3, e4:STRIDE, subset:BUDGET",
            )
            sub.add_argument("--readouts", default="linear,evaluated", help="comma-separated")
            sub.add_argument(
                "--ceiling",
                type=int,
                default=0,
                metavar="R",
                help="also measure the noise ceiling: R >= 2 retrainings without each stage "
                "under reshuffled later batch orders (default 0: off)",
            )
        sub.add_argument(
            "--behaviors",
            metavar="FILE",
            help="YAML behaviours (default: behaviors.yaml of the run directory)",
        )
        sub.add_argument("--batch-size", type=int, default=512, help="examples per forward pass")
        sub.add_argument(
            "--setting",
            action="append",
            default=[],
            metavar="EST.KEY=VALUE",
            help="an estimator setting, e.g. e3.rank=5 or e3.at=end (repeatable)",
        )
        sub.add_argument(
            "--out",
            metavar="FILE",
            help=f"result file (default: {name_of(name)} in the run directory)",
        )
        _cache_options(sub)

    args = parser.parse_args(argv)
    try:
        compute = Compute(args.device, args.dtype).check("--device", "--dtype").per_process()
        with using(compute):  # checked before any work
            if args.command in ("counterfactual", "validate"):
                distributed.init_from_env(compute.torch_device)  # joined until the process exits
            trust(*args.trust_module)
            return {
                "inspect": _inspect,
                "replay": _replay,
                "counterfactual": _counterfactual,
                "audit": _audit,
                "validate": _validate,
            }[args.command](args)
    except StagetraceError as exc:
        if args.debug:
            raise
        if distributed.is_main():  # under torchrun every rank has the same error: say it once
            print(f"stagetrace: error: {exc}", file=sys.stderr)
        return 2


def _cache_options(parser: argparse.ArgumentParser) -> None:
    """Where derived results (counterfactuals, embeddings) are kept: the run by default."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="keep counterfactuals and embeddings in DIR, not in the run (for a read-only run)",
    )
    where.add_argument(
        "--no-cache", action="store_true", help="keep derived results in memory only"
    )


def _open(args: argparse.Namespace, *outputs: Path) -> Trajectory:
    """The run with its cache as the options say, after checking that the cache and
    ``outputs`` can be written: before any work."""
    cache = args.cache_dir if args.cache_dir else (False if args.no_cache else None)
    traj = Trajectory.open(args.run, cache=cache)
    check_writable(traj, *outputs)
    return traj


def _inspect(args: argparse.Namespace) -> int:
    traj = Trajectory.open(args.run)
    print(
        f"run {traj.root}  model {traj.model.target}  "
        f"{'complete' if traj.complete else 'INCOMPLETE'}"
    )
    print(f"{'stage':<14}{'kind':<10}{'optimizer':<10}{'steps':>7}{'trainable':>11}  policy")
    for record in traj.stages:
        print(
            f"{record.name:<14}{record.kind:<10}{record.optimizer:<10}{record.num_steps:>7}"
            f"{len(record.trainable):>11}  {record.optimizer_policy}"
        )
    return 0


def _replay(args: argparse.Namespace) -> int:
    if args.verify and current().training_dtype is not None:
        raise SpecError(
            "--dtype",
            f"replay --verify compares with the record, which a {current().dtype} replay "
            "cannot reproduce",
            "drop --dtype (or drop --verify to see the differences)",
        )
    traj = Trajectory.open(args.run)
    result = replay(traj)
    print(f"{'stage':<14}{'max |start diff|':>18}{'max |end diff|':>18}{'optimizer diff':>18}")
    for d in result:
        print(f"{d.stage:<14}{d.start:>18.3g}{d.end:>18.3g}{d.optimizer:>18.3g}")
    for note in result.environment:
        print(f"environment differs from the recording: {note}")
    print(f"largest parameter difference from the record: {result.worst:.3g}")
    if result.tolerance:
        worst = max((d.relative for d in result), default=0.0)
        print(
            f"replayed on {result.device}: compared within {result.tolerance:g} of the recorded "
            f"magnitudes (largest relative difference {worst:.3g}; GPU kernels need not be "
            "bit for bit)"
        )
    return 1 if args.verify and not result.passed else 0


def _counterfactual(args: argparse.Namespace) -> int:
    traj = distributed.agreed(partial(_open, args))
    results = skip_stages(traj, args.skip)  # under torchrun: shared out by stage
    if not distributed.is_main():
        return 0
    final = traj.checkpoint(len(traj.stages) - 1, "end")
    for name, result in results.items():
        folder = traj.cache.where(folder_of(traj, traj.index(name)))
        done = (
            f"reused (computed earlier in {result.seconds:.2f} s)"
            if result.reused
            else f"computed in {result.seconds:.2f} s"
        )
        print(f"skip {name}: {done} -> {folder}")
        print(f"max |theta_T^(-k) - theta_T| = {max_abs_diff(result.state, final):.4g}")
    print(f"sign convention: {SIGN_CONVENTION}")
    return 0


def name_of(command: str) -> str:
    return {"audit": "attribution.json", "validate": "validation.json"}[command]


def _behaviors(args: argparse.Namespace) -> dict:
    return load_behaviors(args.behaviors or default_behaviors_file(args.run))


def _output(args: argparse.Namespace) -> Path:
    """Where the result goes: ``--out``, or beside the trajectory (in its Hydra run directory
    if any); a directory is refused."""
    run = Path(args.run)
    folder = run if run.is_dir() else run.parent  # RUN may name the manifest itself
    out = Path(args.out) if args.out else folder / name_of(args.command)
    if out.is_dir():
        raise StagetraceError(
            f"--out {out} is a directory. Fix: name a file, e.g. {out / name_of(args.command)}"
        )
    return out


def _write(out: Path, result: dict[str, Any]) -> Path:
    """Write the result file atomically, with the compute it ran on (``compute``: device and
    dtype; ``approximate`` when the truth was retrained in bfloat16)."""
    DiskStore(out.parent).put_json(out.name, {**result, "compute": current().to_json()})
    return out


def _settings(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``["e3.rank=5", "e3.at=end"]`` -> ``{"e3": {"rank": 5, "at": "end"}}`` (values parsed as
    YAML scalars)."""
    settings: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        estimator, dot, name = key.partition(".")
        if not (sep and dot and estimator and name):
            raise StagetraceError(
                f"--setting {pair!r} is not EST.KEY=VALUE. Fix: write e.g. --setting e3.rank=5"
            )
        settings.setdefault(estimator, {})[name] = yaml.safe_load(value)
    return settings


def _audit(args: argparse.Namespace) -> int:
    if is_spec_file(args.run):
        return _audit_spec(args)
    out = _output(args)
    traj = _open(args, out, check_report(out.parent))  # the report goes beside the result
    behaviors = _behaviors(args)
    if args.estimator == "auto":
        estimator: Any = "auto"
        if args.setting:
            build_all([], _settings(args.setting))  # refuses settings of estimators not run
    else:
        estimator = build_all([args.estimator], _settings(args.setting))[args.estimator]
    result = audit(traj, estimator, behaviors, args.readout, args.batch_size, budget=args.budget)
    if result.plan is not None:
        print(f"method: {result.plan.estimator}. Why: {result.plan.reason}.")
    _print_effects(result, args.readout)
    if result.plan is not None:
        print(f"a better answer: {result.plan.better}")
    print(f"sign convention: {SIGN_CONVENTION}")
    written = _write(out, result.to_json())
    print(f"report: {write_report(out.parent, result, traj, examples=examples_of(behaviors))}")
    print(f"-> {written}")
    return 0


def _print_effects(result: Audit, readout: str) -> None:
    """The stage x behaviour table of mean effects with each stage's label, then the labels'
    evidence; "no number" where a stage cannot be estimated."""
    names = list(result.behaviors)
    print(
        f"{result.estimator.label}, {readout} read-out: mean effect per stage "
        "(> 0: the stage raised it)"
    )
    print(f"{'stage':<14}" + "".join(f"{b[:18]:>20}" for b in names) + "  trust")
    for stage in result.stages:
        means = [result.behaviors[b].mean_effect[stage] for b in names]
        row = "".join(f"{'no number':>20}" if m is None else f"{m:>+20.5f}" for m in means)
        print(f"{stage:<14}{row}  {result.labels[stage].label}")
    for stage, label in result.labels.items():
        print(f"  {stage}: {label.label}: {label.evidence}")


def _audit_spec(args: argparse.Namespace) -> int:
    """``stagetrace audit SPEC.yaml``: checkpoints as people have them (docs/audit.md), read into
    an in-memory trajectory; the method is chosen from the evidence the spec gives per stage."""
    out = _output(args)
    spec = load_spec(args.run)
    built = build_checkpoints(spec)
    traj = built.trajectory
    check_writable(traj, out, check_report(out.parent))
    if args.behaviors:
        behaviors = load_behaviors(args.behaviors)
    elif isinstance(spec.behaviors, Path):
        behaviors = load_behaviors(spec.behaviors)
    elif spec.behaviors:
        where = f"{spec.path.name}: behaviors"
        behaviors = {
            str(n): Behavior.from_dict(str(n), b, f"{where}.{n}") for n, b in spec.behaviors.items()
        }
    else:
        raise StagetraceError(
            f"{spec.path} names no behaviours. Fix: add behaviors: (as in behaviors.yaml) to the "
            "spec, or pass --behaviors FILE"
        )
    settings = _settings(args.setting)
    chosen = None
    if args.estimator == "auto":
        if args.setting:
            build_all([], settings)  # refuses settings of estimators not run
        chosen = plan(traj, args.budget, built.held)
        estimator = build_estimator(chosen.estimator)
    else:
        estimator = build_all([args.estimator], settings)[args.estimator]
    check_estimator(built, estimator.requires, estimator.label, EVIDENCE)
    result = audit(traj, estimator, behaviors, args.readout, args.batch_size)
    result = _unknown_starts(replace(result, trajectory=str(spec.path), plan=chosen), built)
    print(f"audit spec {spec.path}: {len(spec.stages)} stages read into memory")
    if chosen is not None:
        print(f"method: {chosen.estimator}. Why: {chosen.reason}.")
    else:
        print(f"method: {result.estimator.label} (--estimator)")
    _print_effects(result, args.readout)
    if chosen is not None:
        print(f"a better answer: {chosen.better}")
    print("evidence per stage:")
    for stage, ev in built.evidence.items():
        print(f"  {stage}:")
        for line in ev.lines():
            print(f"    {line}")
        for need in ev.missing:
            print(f"    missing for a better answer: {need}")
    print(f"sign convention: {SIGN_CONVENTION}")
    written = _write(out, {**result.to_json(), **built.to_json()})
    report = write_report(
        out.parent, {**result.to_json(), **built.to_json()}, traj, examples=examples_of(behaviors)
    )
    print(f"report: {report}")
    print(f"-> {written}")
    return 0


def _unknown_starts(result: Audit, built: Built) -> Audit:
    """The audit with no number for the stages whose start nobody kept (skipping them cannot
    be estimated: their displacement is unknown), labelled ``unknown start``."""
    if not built.unknown_start:
        return result
    gone = set(built.unknown_start)
    behaviors = {
        name: replace(
            b,
            effects={s: None if s in gone else v for s, v in b.effects.items()},
            mean_effect={s: None if s in gone else v for s, v in b.mean_effect.items()},
        )
        for name, b in result.behaviors.items()
    }
    why = (
        "nobody kept the weights this stage started from, so skipping it cannot be estimated; "
        "give start: (the initial weights) or stand_in: init | PATH in the spec"
    )
    labels = {s: Label(UNKNOWN_START, why) if s in gone else v for s, v in result.labels.items()}
    return replace(result, behaviors=behaviors, labels=labels)


def _validate(args: argparse.Namespace) -> int:
    def prepared() -> tuple[Path, Trajectory, dict, dict[str, dict[str, Any]]]:
        out = _output(args)
        return out, _open(args, out), _behaviors(args), _settings(args.setting)

    out, traj, behaviors, settings = distributed.agreed(prepared)  # every rank, before work
    result = validate(
        traj,
        args.estimators.split(","),
        args.readouts.split(","),
        behaviors,
        args.batch_size,
        settings,
        ceiling=args.ceiling,
    )
    # written once, by rank 0; every rank learns whether that failed
    distributed.agreed(lambda: _write(out, result.to_json()) if distributed.is_main() else None)
    if not distributed.is_main():
        return 0
    print(fidelity_table(result))
    if result.ceiling is not None:
        print()
        print(ceiling_table(result.ceiling))
    if result.group_rows:
        print()
        print(group_table(result))
    print(f"-> {out}")
    return 0


def fidelity_table(result: Validation) -> str:
    """The per-example rows as a Markdown table (what docs/results.md shows); with the noise
    ceiling, each row's Pearson as a fraction of the ceiling's and against the expected
    counterfactual."""
    ceiling = result.ceiling is not None
    head = (
        "| estimator | read-out | behaviour | stage | Pearson | Spearman | sign agr. | "
        "mean effect (true) | mean-effect error | top-stage agr. | seconds | x truth |"
    )
    if ceiling:
        head += " of ceiling | Pearson (expected) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result.rows:
        line = (
            f"| {r.estimator} | {r.readout} | {r.behavior} | {r.stage} | "
            f"{r.pearson:.3f} | {r.spearman:.3f} | {r.sign_agreement:.3f} | "
            f"{r.mean_effect_true:+.4f} | {r.mean_effect_error:+.4f} | "
            f"{r.top_stage_agreement:.3f} | {r.seconds:.2f} | {r.cost_ratio:.3f} |"
        )
        if ceiling:
            line += f" {r.pearson_of_ceiling:.3f} | {r.pearson_expected:.3f} |"
        lines.append(line)
    lines.append(
        f"\nground truth (retraining without each stage): {result.ground_truth_seconds:.2f} s"
    )
    return "\n".join(lines)


def ceiling_table(ceiling: Ceiling) -> str:
    """The noise ceiling as a Markdown table: per behaviour and stage, the recorded
    counterfactual against retraining under reshuffled later batch orders."""
    seeds = ", ".join(map(str, ceiling.seeds))
    head = (
        f"| behaviour | stage | ceiling Pearson (mean, seeds {seeds}) | lowest | sign agr. | "
        "mean-effect difference |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in ceiling.rows:
        lines.append(
            f"| {r.behavior} | {r.stage} | {r.pearson:.3f} | {r.pearson_min:.3f} | "
            f"{r.sign_agreement:.3f} | {r.mean_effect_difference:+.4f} |"
        )
    lines.append(f"\nnoise ceiling (reshuffled retraining): {ceiling.seconds:.2f} s")
    return "\n".join(lines)


def group_table(result: Validation) -> str:
    """The group behaviours' rows as a Markdown table: per output and stage, estimated and true
    effect, whether the sign is right, the absolute error and whether the estimate orders the
    stages as the truth does."""
    head = (
        "| estimator | read-out | output | stage | estimated | true | sign right | abs. error | "
        "stage ranking right |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result.group_rows:
        lines.append(
            f"| {r.estimator} | {r.readout} | {r.output} | {r.stage} | {r.estimated:+.4f} | "
            f"{r.true:+.4f} | {'yes' if r.sign_right else 'no'} | {r.abs_error:.4f} | "
            f"{'yes' if r.ranking_matches else 'no'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    status = main()
    if distributed.world().size > 1:  # a torchrun worker: exit without the teardown
        distributed.leave(status)
    sys.exit(status)

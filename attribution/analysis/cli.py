"""The ``stagetrace`` command line (``stagetrace --help``).

Exit status: 0 success, 1 a verification found a difference, 2 bad input (the message says what
is wrong and how to fix it; with ``--debug`` the traceback is shown instead).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from attribution.analysis.audit import audit, default_behaviors_file, load_behaviors
from attribution.analysis.choice import DEFAULT_BUDGET
from attribution.analysis.validate import Ceiling, Validation, validate
from attribution.record import SIGN_CONVENTION
from attribution.record.artifacts import check_writable
from attribution.record.counterfactual import skip_stage
from attribution.record.errors import StagetraceError
from attribution.record.pipeline import max_abs_diff, replay
from attribution.record.references import trust
from attribution.record.store import DiskStore
from attribution.record.trajectory import Trajectory
from estimators import build_all

EPILOG = """\
exit status: 0 success, 1 a verification found a difference (replay --verify), 2 bad input
(one message naming the file, field or stage and the fix; nothing written).

RUN is a trajectory directory, or a Hydra run directory holding one in trajectory/. A run may
come from someone else: the code it names (model, data, losses) runs only from the project's
own packages and the modules you trust (--trust-module, or STAGETRACE_TRUST=mod1,mod2)."""

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
    cf.add_argument("--skip", required=True, metavar="STAGE", help="name of the stage to skip")
    _cache_options(cf)

    for name, helptext in (
        ("audit", "attribute behaviours to stages with an estimator"),
        ("validate", "compare estimators with skip-stage retraining"),
    ):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("run", metavar="RUN", help=RUN_HELP)
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
    traj = Trajectory.open(args.run)
    result = replay(traj)
    print(f"{'stage':<14}{'max |start diff|':>18}{'max |end diff|':>18}{'optimizer diff':>18}")
    for d in result:
        print(f"{d.stage:<14}{d.start:>18.3g}{d.end:>18.3g}{d.optimizer:>18.3g}")
    for note in result.environment:
        print(f"environment differs from the recording: {note}")
    print(f"largest parameter difference from the record: {result.worst:.3g}")
    return 1 if args.verify and result.worst != 0.0 else 0


def _counterfactual(args: argparse.Namespace) -> int:
    traj = _open(args)
    result = skip_stage(traj, args.skip)
    folder = traj.cache.where(f"counterfactuals/skip-{result.skipped}")
    moved = max_abs_diff(result.state, traj.checkpoint(len(traj.stages) - 1, "end"))
    done = (
        f"reused (computed earlier in {result.seconds:.2f} s)"
        if result.reused
        else f"computed in {result.seconds:.2f} s"
    )
    print(f"skip {result.skipped}: {done} -> {folder}")
    print(f"max |theta_T^(-k) - theta_T| = {moved:.4g}")
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
    """Write the result file atomically."""
    DiskStore(out.parent).put_json(out.name, result)
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
    out = _output(args)
    traj = _open(args, out)
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
    names = list(result.behaviors)
    print(
        f"{result.estimator.label}, {args.readout} read-out: mean effect per stage "
        "(> 0: the stage raised it)"
    )
    print(f"{'stage':<14}" + "".join(f"{b[:18]:>20}" for b in names) + "  trust")
    for stage in result.stages:
        row = "".join(f"{result.behaviors[b].mean_effect[stage]:>+20.5f}" for b in names)
        print(f"{stage:<14}{row}  {result.labels[stage].label}")
    for stage, label in result.labels.items():
        print(f"  {stage}: {label.label}: {label.evidence}")
    if result.plan is not None:
        print(f"a better answer: {result.plan.better}")
    print(f"sign convention: {SIGN_CONVENTION}")
    print(f"-> {_write(out, result.to_json())}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    out = _output(args)
    traj = _open(args, out)
    result = validate(
        traj,
        args.estimators.split(","),
        args.readouts.split(","),
        _behaviors(args),
        args.batch_size,
        _settings(args.setting),
        ceiling=args.ceiling,
    )
    print(fidelity_table(result))
    if result.ceiling is not None:
        print()
        print(ceiling_table(result.ceiling))
    if result.group_rows:
        print()
        print(group_table(result))
    print(f"-> {_write(out, result.to_json())}")
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
    sys.exit(main())

"""The ``stagetrace`` command line.

Exit status: 0 success, 1 a verification found a difference, 2 bad input (the message says what
is wrong and how to fix it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from attribution.analysis.audit import audit, default_behaviors_file, load_behaviors, validate
from attribution.record import SIGN_CONVENTION
from attribution.record.counterfactual import skip_stage
from attribution.record.errors import StagetraceError
from attribution.record.pipeline import max_abs_diff, replay
from attribution.record.store import DiskStore
from attribution.record.trajectory import Trajectory
from estimators import build_all


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stagetrace", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    show = commands.add_parser("inspect", help="list the stages of a recorded run")
    show.add_argument("run", help="trajectory directory (or a Hydra run directory holding one)")

    rerun = commands.add_parser(
        "replay", help="re-run a recorded run and compare it with the record"
    )
    rerun.add_argument("run")
    rerun.add_argument(
        "--verify",
        action="store_true",
        help="exit 1 unless the replay reproduces every checkpoint exactly",
    )

    cf = commands.add_parser("counterfactual", help="retrain the run with one stage skipped")
    cf.add_argument("run")
    cf.add_argument("--skip", required=True, metavar="STAGE", help="name of the stage to skip")

    for name, helptext in (
        ("audit", "attribute behaviours to stages with an estimator"),
        ("validate", "compare estimators with skip-stage retraining"),
    ):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("run")
        if name == "audit":
            sub.add_argument(
                "--estimator", default="e1", help="e0, e1, e2, e3 or e4:STRIDE (default e1)"
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
                help="comma-separated: e0, e1, e2, e3, e4:STRIDE",
            )
            sub.add_argument("--readouts", default="linear,evaluated", help="comma-separated")
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

    args = parser.parse_args(argv)
    try:
        return {
            "inspect": _inspect,
            "replay": _replay,
            "counterfactual": _counterfactual,
            "audit": _audit,
            "validate": _validate,
        }[args.command](args)
    except StagetraceError as exc:
        print(f"stagetrace: error: {exc}", file=sys.stderr)
        return 2


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
    diffs = replay(traj)
    print(f"{'stage':<14}{'max |start diff|':>18}{'max |end diff|':>18}{'optimizer diff':>18}")
    for d in diffs:
        print(f"{d.stage:<14}{d.start:>18.3g}{d.end:>18.3g}{d.optimizer:>18.3g}")
    worst = max(d.worst for d in diffs)
    print(f"largest parameter difference from the record: {worst:.3g}")
    return 1 if args.verify and worst != 0.0 else 0


def _counterfactual(args: argparse.Namespace) -> int:
    traj = Trajectory.open(args.run)
    result = skip_stage(traj, args.skip)
    folder = traj.store.where(f"counterfactuals/skip-{result.skipped}")
    moved = max_abs_diff(result.state, traj.checkpoint(len(traj.stages) - 1, "end"))
    print(
        f"skip {result.skipped}: {'reused' if result.reused else 'computed'} in "
        f"{result.seconds:.2f} s -> {folder}"
    )
    print(f"max |theta_T^(-k) - theta_T| = {moved:.4g}")
    print(f"sign convention: {SIGN_CONVENTION}")
    return 0


def name_of(command: str) -> str:
    return {"audit": "attribution.json", "validate": "validation.json"}[command]


def _behaviors(args: argparse.Namespace) -> dict:
    return load_behaviors(args.behaviors or default_behaviors_file(args.run))


def _write(args: argparse.Namespace, traj: Trajectory, result: dict) -> Path:
    """Write the report atomically beside the trajectory (in its Hydra run directory if any)."""
    run = Path(args.run)
    out = (
        Path(args.out) if args.out else (run if run.is_dir() else traj.root) / name_of(args.command)
    )
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
    traj = Trajectory.open(args.run)
    settings = build_all([args.estimator], _settings(args.setting))[args.estimator].settings()
    result = audit(traj, args.estimator, _behaviors(args), args.readout, args.batch_size, settings)
    behaviors = list(result["behaviors"])
    print(f"estimator {args.estimator}, {args.readout} read-out: mean effect per stage")
    print(f"{'stage':<14}" + "".join(f"{b[:18]:>20}" for b in behaviors))
    for stage in result["stages"]:
        row = "".join(f"{result['behaviors'][b]['mean_effect'][stage]:>+20.5f}" for b in behaviors)
        print(f"{stage:<14}{row}")
    print(f"sign convention: {SIGN_CONVENTION}")
    print(f"-> {_write(args, traj, result)}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    traj = Trajectory.open(args.run)
    result = validate(
        traj,
        args.estimators.split(","),
        args.readouts.split(","),
        _behaviors(args),
        args.batch_size,
        _settings(args.setting),
    )
    print(fidelity_table(result))
    print(f"-> {_write(args, traj, result)}")
    return 0


def fidelity_table(result: dict) -> str:
    """The validation rows as a Markdown table (what docs/results.md shows)."""
    head = (
        "| estimator | read-out | behaviour | stage | Pearson | Spearman | sign agr. | "
        "mean effect (true) | mean-effect error | top-stage agr. | seconds | x truth |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        lines.append(
            f"| {r['estimator']} | {r['readout']} | {r['behavior']} | {r['stage']} | "
            f"{r['pearson']:.3f} | {r['spearman']:.3f} | {r['sign_agreement']:.3f} | "
            f"{r['mean_effect_true']:+.4f} | {r['mean_effect_error']:+.4f} | "
            f"{r['top_stage_agreement']:.3f} | {r['seconds']:.2f} | {r['cost_ratio']:.3f} |"
        )
    lines.append(
        f"\nground truth (retraining without each stage): {result['ground_truth_seconds']:.2f} s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

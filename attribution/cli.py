"""The ``stagetrace`` command line.

Exit status: 0 success, 1 a verification found a difference, 2 bad input (the message says what
is wrong and how to fix it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from attribution import SIGN_CONVENTION
from attribution.counterfactual import skip_stage
from attribution.errors import StagetraceError
from attribution.pipeline import max_abs_diff, replay
from attribution.trajectory import Trajectory


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

    args = parser.parse_args(argv)
    try:
        return {"inspect": _inspect, "replay": _replay, "counterfactual": _counterfactual}[
            args.command
        ](args)
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


if __name__ == "__main__":
    sys.exit(main())

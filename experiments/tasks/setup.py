"""What every task does first: check everything it was given, then write.

``Task.check`` resolves the config and checks the compute (``device``, ``dtype``), the
pipeline, the behaviours (their data is built), the logger and the run directory, writing
nothing: a run directory holding another configuration, or a trajectory of another pipeline, is
refused here, before any file of the existing run is touched. ``Task.start`` then writes the
resolved config and the behaviours (for ``stagetrace audit``/``validate``) and starts the
logger. A task with checks of its own runs them between the two; ``Task.prepare`` is both for
a task without. Results are written with ``write_result``: atomically, so a crash leaves the
old file or the new one, never half of one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from attribution.analysis.audit import BEHAVIORS_FILE
from attribution.analysis.behaviors import Behavior
from attribution.record.compute import Compute
from attribution.record.errors import SpecError, TrajectoryError
from attribution.record.pipeline import StepCallback, check_pipeline, run_pipeline
from attribution.record.spec import PipelineSpec
from attribution.record.store import DiskStore
from attribution.record.trajectory import MANIFEST, Trajectory
from experiments.logger import NullLogger, WandbLogger, check_logger, make_logger

log = logging.getLogger(__name__)

CONFIG_FILE = "config.resolved.yaml"
TRAJECTORY = "trajectory"
UNCOMPARED = ("logger", "trust_modules", "device")
"""Config keys that do not change a run's results, so a re-run may differ in them (the device:
stored results are kept on the CPU, independent of where they were computed)."""


@dataclass(frozen=True)
class Task:
    """A task's resolved config, pipeline, behaviours and logger, and what its run directory
    already holds (``found``: stages recorded by an earlier invocation, resumed or reused)."""

    config: dict[str, Any]
    spec: PipelineSpec
    behaviors: dict[str, Behavior]
    run_dir: Path
    resolved: str
    found: int = 0
    logger: NullLogger | WandbLogger = field(default_factory=NullLogger)

    @classmethod
    def check(cls, cfg: DictConfig, run_dir: Path) -> Task:
        """Check everything declared and the run directory; write nothing. A ``SpecError`` or
        ``TrajectoryError`` names what is wrong."""
        try:
            config = OmegaConf.to_container(cfg, resolve=True)
            resolved = OmegaConf.to_yaml(cfg, resolve=True)
        except OmegaConfBaseException as exc:
            raise config_error(exc) from exc
        compute_of(config).check()
        spec = PipelineSpec.from_dict(config["pipeline"])
        behaviors = {
            n: Behavior.from_dict(n, b, f"behaviors.{n}")
            for n, b in (config.get("behaviors") or {}).items()
        }
        for behavior in behaviors.values():
            behavior.load()  # its data, built (and cached) before any training
        check_logger(config.get("logger") or {})
        check_pipeline(spec)
        found = _check_run_dir(run_dir, resolved, spec)
        return cls(config, spec, behaviors, Path(run_dir), resolved, found)

    def start(self) -> Task:
        """Write the resolved config and the behaviours beside the run, say whether it resumes,
        and start the logger; returns the task with its logger."""
        write_result(self.run_dir, CONFIG_FILE, self.resolved)
        if self.behaviors:
            text = yaml.safe_dump(self.config["behaviors"], sort_keys=False)
            write_result(self.run_dir, BEHAVIORS_FILE, text)
        total = len(self.spec.stages)
        if self.found == total:
            log.info(
                "reusing the run in %s: its %d stages are already recorded", self.run_dir, total
            )
        elif self.found:
            log.info(
                "resuming the run in %s: %d of %d stages already recorded",
                self.run_dir,
                self.found,
                total,
            )
        logger = make_logger(self.config.get("logger") or {}, self.run_dir, self.config)
        return replace(self, logger=logger)

    @classmethod
    def prepare(cls, cfg: DictConfig, run_dir: Path) -> Task:
        """``check`` then ``start``, for a task without checks of its own."""
        return cls.check(cfg, run_dir).start()

    def record(self) -> Trajectory:
        """Record the pipeline under ``run_dir/trajectory`` (resuming an interrupted recording,
        reusing a finished one) and log how many stages were recorded now and how many found."""
        began = time.perf_counter()
        traj = run_pipeline(self.spec, self.run_dir / TRAJECTORY, self.progress())
        found = f" ({self.found} found already recorded)" if self.found else ""
        log.info(
            "recorded %d stages in %.1f s%s -> %s",
            len(traj.stages) - self.found,
            time.perf_counter() - began,
            found,
            traj.root,
        )
        return traj

    def progress(self, rerun: str | None = None) -> StepCallback:
        """A step callback that logs progress four times per stage. The recording (``rerun``
        None) also sends each loss to the logger; a rerun (e.g. ``"without finetune"``) is named
        in its log lines."""
        prefix = f"{rerun}: " if rerun else ""

        def on_step(stage: str, t: int, total: int, loss: float) -> None:
            if rerun is None:
                self.logger.log({f"train/{stage}/loss": loss})
            if (t + 1) % max(1, total // 4) == 0 or t + 1 == total:
                log.info("[%s%s] step %d/%d  loss %.4f", prefix, stage, t + 1, total, loss)

        return on_step


def compute_of(config: Mapping[str, Any]) -> Compute:
    """The config's ``device`` and ``dtype`` (default auto, float32) as a ``Compute``; the
    experiments run every task under it (``experiments.run``), and ``Task.check`` checks it."""
    return Compute(str(config.get("device", "auto")), str(config.get("dtype", "float32")))


def write_result(run_dir: Path, name: str, text: str) -> Path:
    """Write ``text`` to ``run_dir/name`` atomically (a temporary file renamed into place);
    return the file's path."""
    DiskStore(run_dir).put(name, text.encode())
    return Path(run_dir) / name


def config_error(exc: OmegaConfBaseException) -> SpecError:
    """An OmegaConf error in reading the config (a bad interpolation, a missing or deleted key)
    as a ``SpecError`` naming the key."""
    key = getattr(exc, "full_key", None) or "config"
    problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return SpecError(
        key,
        f"is not usable ({problem})",
        "correct the value or override (python -m experiments.run ... --cfg job shows the config)",
    )


def _check_run_dir(run_dir: Path, resolved: str, spec: PipelineSpec) -> int:
    """Refuse a run directory that holds another configuration or a trajectory of another
    pipeline; return how many stages it already records (to resume or reuse)."""
    previous = Path(run_dir) / CONFIG_FILE
    if previous.is_file():
        try:
            before = yaml.safe_load(previous.read_text())
        except yaml.YAMLError as exc:
            raise TrajectoryError(
                previous, f"is not readable YAML ({exc})", "run into a new directory"
            ) from exc
        now = yaml.safe_load(resolved)
        differ = list(_differences(before, now))
        if differ:
            shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if differ[5:] else "")
            raise TrajectoryError(
                previous,
                f"holds a run of another configuration (differs at {shown})",
                "run into a new directory (leave out hydra.run.dir, or give another), or delete "
                "this one to run again",
            )
    root = Path(run_dir) / TRAJECTORY
    if not (root / MANIFEST).is_file():
        return 0
    found = len(Trajectory.open(root).stages)
    if found:
        # the record layer's own refusal of another pipeline; it writes nothing when it refuses
        # or returns a trajectory that records stages
        Trajectory.create(root, spec.model, spec.to_dict(), resume=True).close()
    return found


def _differences(before: Any, now: Any, path: str = "") -> Iterator[str]:
    """Dotted keys at which two configs differ (keys in ``UNCOMPARED`` skipped at the top)."""
    if isinstance(before, Mapping) and isinstance(now, Mapping):
        for key in dict.fromkeys([*before, *now]):
            if not path and key in UNCOMPARED:
                continue
            where = f"{path}.{key}" if path else str(key)
            if key not in before or key not in now:
                yield where
            else:
                yield from _differences(before[key], now[key], where)
    elif before != now:
        yield path or "the whole config"

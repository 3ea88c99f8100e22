"""Hydra entry point: ``python -m experiments.run experiment=NAME [overrides]``.

Every run writes its fully resolved configuration to ``config.resolved.yaml`` in its run directory,
beside its results. Bad input ends the run with one message on stderr (``stagetrace: error: ...
Fix: ...``) and exit status 2, as the ``stagetrace`` command does, and writes nothing:

- Hydra's own errors in composing the config (an unknown option such as ``later=nosuch``, a
  misspelled key, an override it cannot parse) happen before any task runs;
- the tasks check the config, pipeline, behaviours, data and run directory before writing or
  training (``experiments.tasks.setup.Task``); a run directory that this invocation created is
  removed again when they refuse. An existing run directory is left as it was.

``device`` and ``dtype`` (default auto, float32) say where and in what precision the task's
replays, retraining and read-outs run (``attribution.record.compute``).

``trust_modules`` (or ``STAGETRACE_TRUST``) lets the config's references name code in your own
packages (the trust boundary of ``attribution.record.references``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from attribution.record.compute import using
from attribution.record.errors import SpecError, StagetraceError
from attribution.record.references import trust
from experiments.tasks import TASKS
from experiments.tasks.setup import compute_of, config_error

BAD_INPUT = 2
FULL_ERROR = "HYDRA_FULL_ERROR"
"""Hydra raises its errors under this variable instead of printing them and exiting 1, so that
``main`` can report them as bad input. Set it yourself to see Hydra's full traceback."""


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def task(cfg: DictConfig) -> Any:
    """Run the task that ``cfg.task`` names in the Hydra run directory."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    own = {f"{hydra_cfg.job.name}.log", hydra_cfg.output_subdir}
    fresh = holds_only(run_dir, own)
    try:
        trust(*trusted_modules(cfg.get("trust_modules")))
        name = cfg.get("task")
        if name not in TASKS:
            raise SpecError(
                "task", f"{name!r} is not a task", f"use experiment={' or experiment='.join(TASKS)}"
            )
        with using(compute_of(cfg)):  # the config's device and dtype, checked first
            return TASKS[name](cfg, run_dir)
    except (StagetraceError, OmegaConfBaseException) as exc:
        if fresh and holds_only(run_dir, own):  # created for this run, nothing written since
            shutil.rmtree(run_dir, ignore_errors=True)
            if hydra_cfg.mode == RunMode.MULTIRUN:  # the sweep's first job: no run is left
                sweep = Path(hydra_cfg.sweep.dir)
                if holds_only(sweep, {"multirun.yaml"}):
                    shutil.rmtree(sweep, ignore_errors=True)
        error = config_error(exc) if isinstance(exc, OmegaConfBaseException) else exc
        fail(str(error))


def main() -> None:
    """Run ``task`` under Hydra; errors in composing the config (Hydra's, and a config file
    that is not YAML) exit 2 with one message."""
    if FULL_ERROR in os.environ:  # the user asked for Hydra's own reports
        task()
        return
    os.environ[FULL_ERROR] = "1"
    try:
        task()
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as exc:
        fail(composition_error(exc))
    finally:
        os.environ.pop(FULL_ERROR, None)


def trusted_modules(value: Any) -> list[str]:
    """The ``trust_modules`` list of module names (``trust`` checks each name)."""
    if value is None:
        return []
    if not isinstance(value, (list, ListConfig)):
        raise SpecError(
            "trust_modules",
            f"expected a list of module names, got {value!r}",
            "write trust_modules=[mypkg] (or set STAGETRACE_TRUST=mypkg)",
        )
    return list(OmegaConf.to_container(value) if isinstance(value, ListConfig) else value)


def holds_only(run_dir: Path, own: set[str | None]) -> bool:
    """Whether ``run_dir`` holds nothing but what Hydra writes into it (its log file, and its
    ``.hydra`` folder where ``hydra.output_subdir`` is set)."""
    return all(entry.name in own for entry in run_dir.iterdir()) if run_dir.is_dir() else False


def composition_error(exc: BaseException) -> str:
    """Hydra's error in composing the config as one message with a fix."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    problem = (lines[0] if lines else type(exc).__name__).rstrip(".")
    if isinstance(exc, MissingConfigException) and exc.options:
        fix = f"choose one of {', '.join(exc.options)}"
    else:
        hints = [
            h[:1].lower() + h[1:].rstrip(".") for h in lines[1:] if not h.startswith("provider=")
        ]
        hints = [h for h in hints if not h.startswith("config search path")]
        fix = "; ".join(
            [
                *hints,
                "check the override (python -m experiments.run --help lists the config groups "
                "and their options; add --cfg job to see the composed config)",
            ]
        )
    return f"{problem}. Fix: {fix}"


def fail(message: str) -> NoReturn:
    print(f"stagetrace: error: {message}", file=sys.stderr)
    sys.exit(BAD_INPUT)


if __name__ == "__main__":
    main()

"""What every task does first: resolve its config, check its pipeline and behaviours, write the
behaviours beside the run (for ``stagetrace audit``/``validate``), and start the logger."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from attribution.analysis.audit import BEHAVIORS_FILE
from attribution.analysis.behaviors import Behavior
from attribution.record.pipeline import StepCallback
from attribution.record.spec import PipelineSpec
from experiments.logger import NullLogger, WandbLogger, make_logger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """A task's resolved config, pipeline, behaviours and logger."""

    config: dict[str, Any]
    spec: PipelineSpec
    behaviors: dict[str, Behavior]
    logger: NullLogger | WandbLogger

    @classmethod
    def prepare(cls, cfg: DictConfig, run_dir: Path) -> Task:
        """Check everything declared before any training, then start the logger."""
        config = OmegaConf.to_container(cfg, resolve=True)
        spec = PipelineSpec.from_dict(config["pipeline"])
        behaviors = {
            n: Behavior.from_dict(n, b, f"behaviors.{n}") for n, b in config["behaviors"].items()
        }
        (run_dir / BEHAVIORS_FILE).write_text(yaml.safe_dump(config["behaviors"], sort_keys=False))
        return cls(config, spec, behaviors, make_logger(config["logger"], run_dir, config))

    def progress(self) -> StepCallback:
        """A step callback that logs each loss and prints progress four times per stage."""

        def on_step(stage: str, t: int, total: int, loss: float) -> None:
            self.logger.log({f"train/{stage}/loss": loss})
            if (t + 1) % max(1, total // 4) == 0 or t + 1 == total:
                log.info("[%s] step %d/%d  loss %.4f", stage, t + 1, total, loss)

        return on_step

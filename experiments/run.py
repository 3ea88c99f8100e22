"""Hydra entry point: ``python -m experiments.run experiment=NAME [overrides]``.

Every run writes its fully resolved configuration to ``config.resolved.yaml`` in its run directory,
beside its results. Bad input (a ``StagetraceError``: a wrong setting, a dataset whose files are
absent) ends the run with its one-line message on stderr and exit status 2, as the
``stagetrace`` command does; the tasks check their pipeline and data before training.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from attribution.record.errors import StagetraceError
from experiments.tasks import TASKS

BAD_INPUT = 2


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "config.resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        return TASKS[cfg.task](cfg, run_dir)
    except StagetraceError as exc:
        print(f"stagetrace: error: {exc}", file=sys.stderr)
        sys.exit(BAD_INPUT)


if __name__ == "__main__":
    main()

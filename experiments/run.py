"""Hydra entry point: ``python -m experiments.run experiment=NAME [overrides]``.

Every run writes its fully resolved configuration to ``config.resolved.yaml`` in its run directory,
beside its results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.tasks import TASKS


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "config.resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return TASKS[cfg.task](cfg, run_dir)


if __name__ == "__main__":
    main()

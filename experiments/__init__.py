"""Datasets, models and Hydra tasks that reproduce the project's studies.

Nothing in ``attribution/`` or ``estimators/`` imports from here.
"""

from omegaconf import OmegaConf

# Configs may multiply numbers with ${mul:a,b} (e.g. a base learning rate times a sweep's scale).
if not OmegaConf.has_resolver("mul"):
    OmegaConf.register_new_resolver("mul", lambda a, b: float(a) * float(b))

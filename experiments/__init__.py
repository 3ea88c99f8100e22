"""Datasets, models and Hydra tasks that reproduce the project's studies.

Nothing in ``attribution/`` or ``estimators/`` imports from here.
"""

from omegaconf import OmegaConf

SEED_STRIDE = 1000
"""``${derive:${seed},k}`` is ``seed * SEED_STRIDE + k``: the k-th seed (k < 1000) of a run."""


def derive(seed: object, k: object) -> int:
    """The ``k``-th seed derived from the run's root ``seed`` (both non-negative integers)."""
    for name, value in (("seed", seed), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if k >= SEED_STRIDE:
        raise ValueError(f"k must be below {SEED_STRIDE}, got {k}")
    return seed * SEED_STRIDE + k


# Configs may multiply numbers with ${mul:a,b} (e.g. a base learning rate times a sweep's scale)
# and derive seeds from the root seed with ${derive:${seed},k}.
if not OmegaConf.has_resolver("mul"):
    OmegaConf.register_new_resolver("mul", lambda a, b: float(a) * float(b))
if not OmegaConf.has_resolver("derive"):
    OmegaConf.register_new_resolver("derive", derive)

"""Datasets built from plain JSON-able arguments, so a manifest can record and replay them."""

from experiments.data.mnist import mnist
from experiments.data.transforms import (
    apply_transforms,
    invert,
    noise,
    scale_contrast,
    translate,
)

__all__ = ["apply_transforms", "invert", "mnist", "noise", "scale_contrast", "translate"]

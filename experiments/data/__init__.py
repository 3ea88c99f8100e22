"""Datasets built from plain JSON-able arguments, so a manifest can record and replay them."""

from experiments.data.celeba import celeba
from experiments.data.chestxray import chest_xray
from experiments.data.fashion import fashion_mnist
from experiments.data.mnist import mnist
from experiments.data.shortcuts import colored_mnist, patch_mnist
from experiments.data.text import insults, insults_madlibs
from experiments.data.transforms import (
    apply_transforms,
    invert,
    noise,
    scale_contrast,
    translate,
)

__all__ = [
    "apply_transforms",
    "celeba",
    "chest_xray",
    "colored_mnist",
    "fashion_mnist",
    "insults",
    "insults_madlibs",
    "invert",
    "mnist",
    "noise",
    "patch_mnist",
    "scale_contrast",
    "translate",
]

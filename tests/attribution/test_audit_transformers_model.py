"""`model: transformers` in an audit spec: the model is built from the checkpoint's config.json.

Two stages of a tiny BERT classifier saved by transformers' own ``save_pretrained``; the audit's
last-stage effect under E0 with the evaluated read-out is exact (f(theta_T) - f(theta_T - delta)
= f(end) - f(start of the stage)), so it must equal the loss difference computed directly with
the transformers model at both checkpoints.

Sign convention: effect_k(f) = f(theta_T) - f(theta_T^(-k)).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import TensorDataset

from tests.helpers import cli, installed

transformers = installed("transformers")

VOCAB, LENGTH, EXAMPLES = 30, 6, 40


def tokens() -> TensorDataset:
    """Random token sequences and binary labels (the behaviour's data, fixed by its seed)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(VOCAB, (EXAMPLES, LENGTH), generator=generator)
    return TensorDataset(ids, torch.randint(2, (EXAMPLES,), generator=generator))


def test_a_transformers_folder_is_audited_with_its_own_model(tmp_path, capsys) -> None:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=LENGTH,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "pretrained")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "finetuned")
    spec = {
        "model": "transformers",
        "trust_modules": [__name__],
        "stages": {
            "pretrain": {"kind": "pretrain", "checkpoint": "pretrained", "stand_in": "init"},
            "finetune": {"kind": "finetune", "checkpoint": "finetuned"},
        },
        "behaviors": {"loss": {"data": {"target": f"{__name__}:tokens"}, "quantity": "loss"}},
    }
    (tmp_path / "audit.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    code, _, err = cli(capsys, "audit", tmp_path / "audit.yaml", "--estimator", "e0")
    assert code == 0, err
    got = json.loads((tmp_path / "attribution.json").read_text())
    effects = torch.tensor(got["behaviors"]["loss"]["effects"]["finetune"], dtype=torch.float64)

    ids, labels = tokens().tensors

    def losses(folder: str) -> torch.Tensor:
        at = transformers.BertForSequenceClassification.from_pretrained(tmp_path / folder)
        with torch.no_grad():
            logits = at.eval()(ids).logits
        return F.cross_entropy(logits, labels, reduction="none").double()

    torch.testing.assert_close(effects, losses("finetuned") - losses("pretrained"))
    assert effects.abs().max() > 1e-3  # the stage moved the loss: the check can fail

"""The reverse-mode contraction behind the linear read-out, checked against forward-mode jvps
(``torch.func.jvp``, one per tangent) in float64 on every model kind the project has: the MLP
with LoRA adapters, the conv net (GroupNorm), the text transformer (embeddings, a position
table, LayerNorm, attention, padding), and a grouped convolution (the generic path); and its
refusals: a model whose use of the parameters it cannot contract, or that mixes examples, gets
the jvp's numbers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp

from attribution.analysis.readout import linear_effects
from attribution.record.contraction import NotContractible, contracted_along
from attribution.record.entry import LoRALinear
from attribution.record.evaluation import ModelAt, per_example
from experiments.models import MLP, SmallCNN, TextTransformer
from tests.helpers import installed

K = 3


def at(module: nn.Module) -> ModelAt:
    return ModelAt.of(module, {n: v.detach().clone() for n, v in module.state_dict().items()})


def with_lora(module: MLP) -> MLP:
    generator = torch.Generator().manual_seed(3)
    module.fc1 = LoRALinear(module.fc1, rank=2, alpha=4.0, generator=generator)
    nn.init.normal_(module.fc1.lora_B)  # nonzero, so that lora_A matters too
    return module


class GroupedConv(nn.Module):
    """A grouped convolution (the generic jvp's path) between two plain ones."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, stride=2)
        self.b = nn.Conv2d(4, 4, 3, groups=2, bias=False)
        self.head = nn.Linear(4 * 11 * 11, 10)

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x.reshape(len(x), 1, 28, 28)))))
        return self.head(h.flatten(1))


def models():
    torch.manual_seed(0)
    mlp = with_lora(MLP(hidden=[16, 8])).double()
    cnn = SmallCNN(channels=(4, 8), groups=2).double()
    text = TextTransformer(vocab_size=50, max_len=12, dim=8, heads=2, layers=2, hidden=16)
    images = torch.randn(9, 784, dtype=torch.float64)
    tokens = torch.randint(1, 50, (9, 12))
    tokens[::2, 7:] = 0  # padding
    labels = torch.randint(0, 10, (9,))
    return {
        "mlp+lora": (mlp, images, labels),
        "cnn": (cnn, images, labels),
        "grouped conv": (GroupedConv().double(), images, labels),
        "text": (text.double(), tokens, labels % 2),
    }


MODELS = models()


def tangents_of(model: ModelAt, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            n: torch.randn(v.shape, generator=generator, dtype=v.dtype)
            for n, v in model.params.items()
        }
        for _ in range(K)
    ]


def jvps(model: ModelAt, tangents, x, y, quantity) -> torch.Tensor:
    """[K, b]: one ``torch.func.jvp`` of the per-example quantity per tangent."""

    def f(params):
        return per_example(model, params, x, y, quantity)

    return torch.stack([jvp(f, ({n: model.params[n] for n in t},), (t,))[1] for t in tangents])


@pytest.mark.parametrize("quantity", ["loss", "margin"])
@pytest.mark.parametrize("name", list(MODELS))
def test_contraction_equals_one_jvp_per_tangent(name, quantity):
    module, x, y = MODELS[name]
    model = at(module)
    tangents = tangents_of(model)
    stacked = {n: torch.stack([t[n] for t in tangents]) for n in model.params}
    along = contracted_along(
        lambda values, a, b: per_example(model, values, a, b, quantity), model.params, stacked
    )
    torch.testing.assert_close(
        along(x, y), jvps(model, tangents, x, y, quantity), atol=1e-10, rtol=1e-9
    )


def test_contraction_covers_a_subset_of_the_parameters():
    module, x, y = MODELS["text"]
    model = at(module)
    names = ["position", "blocks.1.norm2.weight", "blocks.0.attn.key.bias"]
    tangents = [{n: t[n] for n in names} for t in tangents_of(model, seed=2)]
    stacked = {n: torch.stack([t[n] for t in tangents]) for n in names}
    along = contracted_along(
        lambda values, a, b: per_example(model, values, a, b, "loss"), model.params, stacked
    )
    torch.testing.assert_close(
        along(x, y), jvps(model, tangents, x, y, "loss"), atol=1e-10, rtol=1e-9
    )


class InPlace(nn.Module):
    """A linear layer whose output is scaled in place: its recorded output is not the one the
    loss sees, so the contraction must refuse it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x).mul_(2.0)


class BatchCentred(nn.Module):
    """Subtracts the batch mean of its hidden layer: each example's logits depend on the other
    examples, which the contraction cannot see and the first-batch check must catch."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(784, 6), nn.Linear(6, 10)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(h - h.mean(0, keepdim=True))


@pytest.mark.parametrize("kind", [InPlace, BatchCentred])
def test_what_cannot_be_contracted_gets_the_jvp(kind):
    torch.manual_seed(0)
    module = kind().double()
    model = at(module)
    x = torch.randn(11, 784, dtype=torch.float64)
    y = torch.randint(0, 10, (11,))
    tangents = tangents_of(model)
    truth = jvps(model, tangents, x, y, "loss")
    stacked = {n: torch.stack([t[n] for t in tangents]) for n in model.params}
    along = contracted_along(
        lambda values, a, b: per_example(model, values, a, b, "loss"), model.params, stacked
    )
    if kind is InPlace:
        with pytest.raises(NotContractible, match="in place"):
            along(x, y)
    else:  # the premise: the contraction alone gets it wrong
        assert (along(x, y) - truth).abs().max() > 1e-3 * truth.abs().max()
    embeddings = {f"s{k}": t for k, t in enumerate(tangents)}
    got = linear_effects(model, embeddings, x, y, "loss", batch_size=5)
    expected = linear_effects(model, embeddings, x, y, "loss", batch_size=5, contract=False)
    for k in range(K):  # the jvp's numbers (per batch of 5, as the model sees its examples)
        torch.testing.assert_close(got[f"s{k}"], expected[f"s{k}"], atol=1e-10, rtol=1e-9)
    if kind is InPlace:  # and they are the truth's
        torch.testing.assert_close(got["s0"], -truth[0], atol=1e-10, rtol=1e-9)


def test_a_transformers_bert_the_jvp_cannot_run_is_contracted():
    """The model an audit spec's ``model: transformers`` builds (its forward gives the logits),
    with torch's fused attention, which has no forward-mode derivative on the CPU."""
    transformers = installed("transformers")
    from attribution.record.checkpoint_spec import _logits_of

    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=6,
        num_labels=2,
    )
    torch.manual_seed(0)
    module = _logits_of(transformers.BertForSequenceClassification)(config).double()
    model = at(module)
    x = torch.randint(30, (9, 6))
    y = torch.randint(2, (9,))
    tangents = tangents_of(model)
    stacked = {n: torch.stack([t[n] for t in tangents]) for n in model.params}
    along = contracted_along(
        lambda values, a, b: per_example(model, values, a, b, "loss"), model.params, stacked
    )
    with pytest.raises(NotImplementedError, match="forward AD"):  # the jvp cannot run it
        jvps(model, tangents, x, y, "loss")
    embeddings = {f"s{k}": t for k, t in enumerate(tangents)}
    # the read-out runs it, contracted (the jvp it would fall back to cannot), with the padding
    # token among the inputs
    assert (x == config.pad_token_id).any()
    got = linear_effects(model, embeddings, x, y, "loss", batch_size=5)
    # padding_idx only zeroes the padding row's gradient (a training convention): the lookup's
    # own derivative, which the read-outs take, has it
    module.bert.embeddings.word_embeddings.padding_idx = None
    truth = torch.stack(  # each example's own gradient, by a loop of backward
        [
            torch.stack(
                [
                    sum(
                        (g * t[n]).sum()
                        for n, g in zip(
                            model.params,
                            torch.autograd.grad(
                                F.cross_entropy(module(x[i : i + 1]), y[i : i + 1]),
                                list(module.parameters()),
                            ),
                            strict=True,
                        )
                    )
                    for t in tangents
                ]
            )
            for i in range(len(y))
        ],
        1,
    )
    torch.testing.assert_close(along(x, y), truth, atol=1e-10, rtol=1e-9)
    for k in range(K):
        torch.testing.assert_close(got[f"s{k}"], -truth[k], atol=1e-10, rtol=1e-9)

import json

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from experiments.models import MLP, SmallCNN

MODELS = [
    (MLP, {"in_features": 784, "hidden": [32, 16], "num_classes": 10}),
    (SmallCNN, {"channels": [8, 16], "groups": 4, "num_classes": 10}),
]


def _build(cls, kwargs):
    """Construct from kwargs that went through JSON, as a manifest replay does."""
    torch.manual_seed(0)
    return cls(**json.loads(json.dumps(kwargs)))


@pytest.mark.parametrize(("cls", "kwargs"), MODELS)
@pytest.mark.parametrize("shape", [(5, 784), (5, 1, 28, 28)])
def test_output_shape_for_both_input_layouts(cls, kwargs, shape):
    model = _build(cls, kwargs)
    assert model(torch.randn(*shape)).shape == (5, 10)


@pytest.mark.parametrize(("cls", "kwargs"), MODELS)
def test_layouts_give_identical_logits(cls, kwargs):
    model = _build(cls, kwargs)
    images = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(images), model(images.reshape(3, 784)))


@pytest.mark.parametrize(("cls", "kwargs"), MODELS)
def test_head_is_linear_and_no_batchnorm_or_dropout(cls, kwargs):
    model = _build(cls, kwargs)
    assert isinstance(model.head, nn.Linear)
    assert model.head.out_features == 10
    banned = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    assert not any(isinstance(module, banned) for module in model.modules())


def test_parameter_names():
    mlp = dict(_build(*MODELS[0]).named_parameters())
    assert {"fc1.weight", "fc1.bias", "fc2.weight", "head.weight"} <= mlp.keys()
    assert mlp["fc1.weight"].shape == (32, 784) and mlp["head.weight"].shape == (10, 16)
    cnn = dict(_build(*MODELS[1]).named_parameters())
    assert {
        "conv1.weight",
        "norm1.weight",
        "conv2.weight",
        "norm2.bias",
        "head.weight",
    } <= cnn.keys()
    assert cnn["head.weight"].shape == (10, 16 * 7 * 7)


def test_depth_follows_arguments():
    mlp = MLP(hidden=[64])
    assert {name for name, _ in mlp.named_children()} == {"fc1", "head"}
    cnn = SmallCNN(channels=[4, 8, 8], groups=2, num_classes=3)
    assert cnn.head.in_features == 8 * 3 * 3  # 28 -> 14 -> 7 -> 3
    assert cnn(torch.randn(2, 784)).shape == (2, 3)


@pytest.mark.parametrize(("cls", "kwargs"), MODELS)
def test_per_example_gradients_match_one_at_a_time_autograd(cls, kwargs):
    model = _build(cls, kwargs)
    params = {name: p.detach() for name, p in model.named_parameters()}
    torch.manual_seed(1)
    inputs, labels = torch.randn(4, 784), torch.tensor([0, 3, 7, 9])

    def loss(params, x, y):
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, labels)
    assert per_example.keys() == params.keys()
    for i in range(4):
        model.zero_grad()
        nn.functional.cross_entropy(model(inputs[i : i + 1]), labels[i : i + 1]).backward()
        for name, p in model.named_parameters():
            assert per_example[name].shape == (4, *p.shape)
            assert torch.allclose(per_example[name][i], p.grad, atol=1e-5), name

import math

import numpy as np
import pytest
import torch
import zarr

from attribution.record.errors import SpecError
from experiments.data import colored_mnist, patch_mnist
from experiments.data.mnist import MEAN, STD, archive_path
from experiments.models import MLP, SmallCNN

BUILDERS = [colored_mnist, patch_mnist]
SIGMAS = 5  # tolerance of a rate, in binomial standard deviations


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    """The test split read directly with zarr, independently of experiments.data."""
    store = zarr.storage.ZipStore(archive_path(), mode="r")
    group = zarr.open_group(store, mode="r")
    arrays = {"images": group["test_images"][:], "digits": group["test_labels"][:]}
    store.close()
    return arrays


def assert_rate(hits: torch.Tensor, p: float) -> None:
    """The fraction of ``hits`` is ``p`` within SIGMAS binomial standard deviations."""
    n = len(hits)
    tolerance = SIGMAS * math.sqrt(p * (1 - p) / n)
    assert abs(hits.double().mean().item() - p) <= tolerance, (hits.double().mean().item(), p)


def attributes_of(groups, labels):
    attributes = groups - 2 * labels
    assert set(attributes.unique().tolist()) <= {0, 1}
    return attributes


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize(("correlation", "label_noise"), [(0.9, 0.25), (0.7, 0.1), (0.5, 0.4)])
def test_label_noise_and_correlation_rates(raw, builder, correlation, label_noise):
    _, labels, groups = builder("test", correlation=correlation, label_noise=label_noise).tensors
    clean = torch.from_numpy(raw["digits"] >= 5).long()
    attributes = attributes_of(groups, labels)
    assert_rate(labels != clean, label_noise)
    assert_rate(attributes == labels, correlation)
    # The attribute follows the noisy label, so it agrees with the digit less often.
    expected = correlation * (1 - label_noise) + (1 - correlation) * label_noise
    assert_rate(attributes == clean, expected)


@pytest.mark.parametrize("builder", BUILDERS)
def test_extreme_settings(raw, builder):
    clean = torch.from_numpy(raw["digits"] >= 5).long()
    _, labels, groups = builder("test", correlation=1.0, label_noise=0.0).tensors
    assert torch.equal(labels, clean)
    assert torch.equal(groups, 3 * clean)
    _, labels, groups = builder("test", correlation=0.0, label_noise=1.0).tensors
    assert torch.equal(labels, 1 - clean)
    assert torch.equal(attributes_of(groups, labels), clean)


def test_colored_images_draw_the_digit_in_the_attribute_channel(raw):
    inputs, labels, groups = colored_mnist("test", start=2000, stop=3000).tensors
    attributes = attributes_of(groups, labels)
    digits = torch.from_numpy((raw["images"][2000:3000] / 255.0 - MEAN) / STD).float()
    rows = torch.arange(len(labels))
    assert torch.allclose(inputs[rows, attributes], digits, atol=1e-5)
    empty = inputs[rows, 1 - attributes]
    assert torch.allclose(empty, torch.full_like(empty, -MEAN / STD), atol=1e-6)


@pytest.mark.parametrize("patch", [1, 4, 7])
def test_patch_is_white_exactly_where_the_attribute_is_set(raw, patch):
    inputs, labels, groups = patch_mnist("test", stop=3000, patch=patch).tensors
    attributes = attributes_of(groups, labels).bool()
    images = raw["images"][:3000].astype(np.float64) / 255.0
    images[attributes.numpy(), :patch, :patch] = 1.0
    expected = torch.from_numpy((images - MEAN) / STD).float()
    assert torch.allclose(inputs[:, 0], expected, atol=1e-5)
    corner = inputs[:, 0, :patch, :patch].reshape(len(labels), -1)
    white = torch.isclose(corner, torch.tensor((1 - MEAN) / STD)).all(dim=1)
    assert torch.equal(white, attributes)


@pytest.mark.parametrize(
    ("builder", "flatten", "shape"),
    [
        (colored_mnist, False, (500, 2, 28, 28)),
        (colored_mnist, True, (500, 1568)),
        (patch_mnist, False, (500, 1, 28, 28)),
        (patch_mnist, True, (500, 784)),
    ],
)
def test_shapes_and_dtypes(builder, flatten, shape):
    inputs, labels, groups = builder("train", start=100, stop=600, flatten=flatten).tensors
    assert inputs.shape == shape and inputs.dtype == torch.float32
    assert labels.shape == groups.shape == (500,)
    assert labels.dtype == groups.dtype == torch.int64
    assert set(labels.unique().tolist()) <= {0, 1}
    assert set(groups.unique().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("builder", BUILDERS)
def test_same_kwargs_same_tensors_whatever_the_global_rng(builder):
    kwargs = {"split": "test", "stop": 2000, "correlation": 0.8, "label_noise": 0.3, "seed": 5}
    torch.manual_seed(0)
    first = builder(**kwargs).tensors
    torch.manual_seed(123)
    torch.rand(1000)
    second = builder(**kwargs).tensors
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    other = builder(**{**kwargs, "seed": 6}).tensors
    assert not torch.equal(first[2], other[2])


@pytest.mark.parametrize("builder", BUILDERS)
def test_an_example_keeps_its_draws_in_any_slice(builder):
    whole = builder("test").tensors
    for start, stop in [(0, 10), (1234, 1500), (9990, 10000)]:
        part = builder("test", start=start, stop=stop).tensors
        assert all(torch.equal(p, w[start:stop]) for p, w in zip(part, whole, strict=True))


def test_models_consume_the_inputs():
    colored, _, _ = colored_mnist("test", stop=8).tensors
    patched, _, _ = patch_mnist("test", stop=8).tensors
    assert MLP(in_features=1568, num_classes=2)(colored).shape == (8, 2)
    assert MLP(in_features=784, num_classes=2)(patched).shape == (8, 2)
    assert SmallCNN(num_classes=2)(patched).shape == (8, 2)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"correlation": 1.5}, "correlation"),
        ({"label_noise": -0.1}, "label_noise"),
        ({"seed": 1.5}, "seed"),
        ({"split": "valid"}, "split"),
        ({"source": "cifar"}, "source"),
        ({"start": 5, "stop": 5}, "start/stop"),
        ({"stop": 10001}, "start/stop"),
    ],
)
@pytest.mark.parametrize("builder", BUILDERS)
def test_bad_arguments_name_the_field(builder, kwargs, field):
    with pytest.raises(SpecError) as caught:
        builder(**{"split": "test", **kwargs})
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}:")


@pytest.mark.parametrize("patch", [-1, 29, 2.0])
def test_bad_patch_size(patch):
    with pytest.raises(SpecError, match="patch"):
        patch_mnist("test", stop=10, patch=patch)


def test_patch_zero_is_a_target_without_the_marker():
    plain = patch_mnist("test", stop=200, correlation=1.0, label_noise=0.0, patch=0)
    marked = patch_mnist("test", stop=200, correlation=1.0, label_noise=0.0, patch=4)
    torch.testing.assert_close(plain.tensors[2], marked.tensors[2])  # same groups
    with_marker = marked.tensors[2] % 2 == 1
    assert with_marker.any() and not torch.equal(plain.tensors[0], marked.tensors[0])
    torch.testing.assert_close(plain.tensors[0][~with_marker], marked.tensors[0][~with_marker])
    # no corner square anywhere: the corner holds the digit's own (near-blank) pixels
    corner = plain.tensors[0][:, 0, :4, :4]
    assert float(corner.max()) < float(marked.tensors[0][with_marker][:, 0, :4, :4].min())

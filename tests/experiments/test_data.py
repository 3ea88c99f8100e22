import numpy as np
import pytest
import torch
import zarr

from experiments.data import apply_transforms, invert, mnist, noise, scale_contrast, translate
from experiments.data.mnist import MEAN, STD, archive_path

# Published MNIST class counts (LeCun et al.), digits 0..9.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    """The archive read directly with zarr, independently of experiments.data.mnist."""
    store = zarr.storage.ZipStore(archive_path(), mode="r")
    group = zarr.open_group(store, mode="r")
    arrays = {key: group[key][:] for key in group.array_keys()}
    store.close()
    return arrays


@pytest.fixture(scope="module")
def train() -> torch.utils.data.TensorDataset:
    return mnist("train")


def test_train_split_size_shapes_and_class_counts(train):
    inputs, labels = train.tensors
    assert inputs.shape == (60000, 784) and inputs.dtype == torch.float32
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    counts = torch.bincount(labels, minlength=10)
    assert counts.tolist() == TRAIN_COUNTS
    assert int(counts.sum()) == 60000


def test_test_split_unflattened():
    inputs, labels = mnist("test", flatten=False).tensors
    assert inputs.shape == (10000, 1, 28, 28)
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.bincount(labels, minlength=10).tolist() == TEST_COUNTS


def test_training_set_is_normalised(train):
    inputs = train.tensors[0].double()
    assert abs(inputs.mean().item()) < 1e-3
    assert abs(inputs.std().item() - 1.0) < 1e-3


def test_values_match_raw_pixels(raw):
    inputs, labels = mnist("test", start=100, stop=300, flatten=False).tensors
    expected = (raw["test_images"][100:300].astype(np.float64) / 255.0 - MEAN) / STD
    assert np.allclose(inputs[:, 0].numpy(), expected, atol=1e-5)
    assert labels.tolist() == raw["test_labels"][100:300].tolist()


def test_slice_is_taken_before_digit_filter(raw):
    start, stop, digits = 1000, 5000, [3, 7]
    inputs, labels = mnist("train", digits=digits, start=start, stop=stop).tensors
    window = raw["train_labels"][start:stop]
    expected_rows = np.flatnonzero(np.isin(window, digits)) + start
    assert set(labels.tolist()) == {3, 7}
    assert len(labels) == np.isin(window, digits).sum() == len(expected_rows)
    assert labels.tolist() == raw["train_labels"][expected_rows].tolist()
    expected = (raw["train_images"][expected_rows].reshape(-1, 784) / 255.0 - MEAN) / STD
    assert np.allclose(inputs.numpy(), expected, atol=1e-5)


def test_calls_are_bitwise_deterministic():
    kwargs = {
        "split": "test",
        "digits": [1, 8],
        "stop": 2000,
        "transforms": [{"name": "noise", "sigma": 0.2, "seed": 3}, {"name": "translate", "dx": 2}],
    }
    first, second = mnist(**kwargs).tensors, mnist(**kwargs).tensors
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_transforms_are_applied_before_normalisation(raw):
    inputs = mnist("test", stop=50, transforms=[{"name": "invert"}], flatten=False).tensors[0]
    expected = (1.0 - raw["test_images"][:50] / 255.0 - MEAN) / STD
    assert np.allclose(inputs[:, 0].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"split": "validation"}, "split"),
        ({"digits": [3, 10]}, "digits"),
        ({"digits": [-1]}, "digits"),
        ({"split": "test", "start": 500, "stop": 500}, "start"),
        ({"split": "test", "stop": 10001}, "stop"),
        ({"split": "test", "start": -1}, "start"),
        ({"split": "train", "digits": [0], "stop": 1}, "digits"),  # row 0 is a 5
        ({"split": "test", "stop": 5, "transforms": [{"name": "blur"}]}, "transform"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        mnist(**kwargs)


def _pattern() -> torch.Tensor:
    images = torch.zeros(1, 1, 5, 5)
    images[0, 0, 1, 1] = 1.0
    images[0, 0, 3, 4] = 0.5  # on the right edge
    return images


def test_translate_moves_pixels_and_zero_fills():
    moved = translate(_pattern(), dx=2, dy=1)
    expected = torch.zeros(1, 1, 5, 5)
    expected[0, 0, 2, 3] = 1.0  # the edge pixel leaves the image instead of wrapping round
    assert torch.equal(moved, expected)

    back = translate(_pattern(), dx=-1, dy=-1)
    expected = torch.zeros(1, 1, 5, 5)
    expected[0, 0, 0, 0] = 1.0
    expected[0, 0, 2, 3] = 0.5
    assert torch.equal(back, expected)


def test_translate_beyond_the_image_gives_zeros_and_zero_shift_is_identity():
    assert torch.equal(translate(_pattern(), dx=7), torch.zeros(1, 1, 5, 5))
    assert torch.equal(translate(_pattern(), dy=-5), torch.zeros(1, 1, 5, 5))
    assert torch.equal(translate(_pattern()), _pattern())


def test_invert_and_scale_contrast_values():
    images = torch.tensor([0.0, 0.25, 0.5, 1.0]).reshape(1, 1, 2, 2)
    assert torch.equal(invert(images).flatten(), torch.tensor([1.0, 0.75, 0.5, 0.0]))
    scaled = scale_contrast(images, factor=2.0).flatten()
    assert torch.equal(scaled, torch.tensor([0.0, 0.0, 0.5, 1.0]))
    assert torch.equal(
        scale_contrast(images, factor=0.5).flatten(), torch.tensor([0.25, 0.375, 0.5, 0.75])
    )


def test_noise_is_reproducible_by_seed_and_clamped():
    images = torch.full((8, 1, 28, 28), 0.5)
    original = images.clone()
    first = noise(images, sigma=0.1, seed=1)
    assert torch.equal(first, noise(images, sigma=0.1, seed=1))
    assert not torch.equal(first, noise(images, sigma=0.1, seed=2))
    assert torch.equal(images, original)  # pure: input untouched
    assert abs((first - images).std().item() - 0.1) < 0.01
    wide = noise(images, sigma=5.0, seed=1)
    assert wide.min().item() == 0.0 and wide.max().item() == 1.0


def test_apply_transforms_runs_specs_in_order():
    images = _pattern()
    shift_then_invert = apply_transforms(
        images, [{"name": "translate", "dx": 1}, {"name": "invert"}]
    )
    invert_then_shift = apply_transforms(
        images, [{"name": "invert"}, {"name": "translate", "dx": 1}]
    )
    assert torch.equal(shift_then_invert, invert(translate(images, dx=1)))
    assert torch.equal(shift_then_invert[..., 0], torch.ones(1, 1, 5))  # fill, then inverted
    assert torch.equal(invert_then_shift[..., 0], torch.zeros(1, 1, 5))  # inverted, then fill
    assert torch.equal(apply_transforms(images, []), images)


def test_apply_transforms_rejects_unknown_names_listing_known_ones():
    with pytest.raises(ValueError, match=r"blur.*invert, noise, scale_contrast, translate"):
        apply_transforms(_pattern(), [{"name": "invert"}, {"name": "blur"}])

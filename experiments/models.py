"""Small image classifiers, built from JSON-able arguments.

Both end in a ``head`` linear layer and avoid BatchNorm and dropout, so they are pure functions
of their parameters and work under ``torch.func.functional_call`` and ``torch.func.vmap``. The
default input is one 28x28 single-channel image; ``input_shape`` (``[channels, height, width]``
of one input, as a data option of ``conf/data/`` sets it) fits them to other images.
"""

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from attribution.record.errors import SpecError

IMAGE_SIZE = 28
DEFAULT_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)


class MLP(nn.Module):
    """ReLU perceptron: hidden layers ``fc1``, ``fc2``, ... then the ``head`` logits layer.

    The input width is ``in_features``, or the number of values of one ``input_shape`` input;
    give at most one of the two (neither: 784, one 28x28 image).
    """

    def __init__(
        self,
        in_features: int | None = None,
        hidden: Sequence[int] = (256, 128),
        num_classes: int = 10,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if in_features is not None and input_shape is not None:
            raise SpecError(
                "model.kwargs",
                f"got both in_features={in_features} and input_shape={list(input_shape)}",
                "give one of them: input_shape is the data's [channels, height, width]",
            )
        if input_shape is not None:
            in_features = math.prod(_checked(input_shape))
        self._hidden_names = [f"fc{i}" for i in range(1, len(hidden) + 1)]
        width = math.prod(DEFAULT_SHAPE) if in_features is None else in_features
        for name, out in zip(self._hidden_names, hidden, strict=True):
            self.add_module(name, nn.Linear(width, out))
            width = out
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` from ``[N, in_features]`` or ``[N, *input_shape]``."""
        x = x.reshape(x.shape[0], -1)
        for name in self._hidden_names:
            x = F.relu(getattr(self, name)(x))
        return self.head(x)


class SmallCNN(nn.Module):
    """Conv net: blocks ``conv{i}`` (3x3) -> ``norm{i}`` (GroupNorm) -> ReLU -> 2x2 max-pool,
    then the ``head`` logits layer on the flattened feature map. Inputs are ``input_shape``
    (``[channels, height, width]``, default one 28x28 channel) or flattened."""

    def __init__(
        self,
        channels: Sequence[int] = (16, 32),
        groups: int = 4,
        num_classes: int = 10,
        input_shape: Sequence[int] = DEFAULT_SHAPE,
    ) -> None:
        super().__init__()
        self._shape = _checked(input_shape)
        self._blocks = [(f"conv{i}", f"norm{i}") for i in range(1, len(channels) + 1)]
        in_channels, height, width = self._shape
        for (conv, norm), out in zip(self._blocks, channels, strict=True):
            self.add_module(conv, nn.Conv2d(in_channels, out, kernel_size=3, padding=1))
            self.add_module(norm, nn.GroupNorm(groups, out))
            in_channels, height, width = out, height // 2, width // 2
        if height < 1 or width < 1:
            raise SpecError(
                "model.kwargs.input_shape",
                f"{list(self._shape)} is too small for {len(channels)} 2x2 poolings",
                f"use images of at least {2 ** len(channels)} pixels a side, or fewer channels",
            )
        self.head = nn.Linear(in_channels * height * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` from ``[N, *input_shape]`` or flattened inputs."""
        x = x.reshape(x.shape[0], *self._shape)
        for conv, norm in self._blocks:
            x = F.max_pool2d(F.relu(getattr(self, norm)(getattr(self, conv)(x))), 2)
        return self.head(x.flatten(1))


def _checked(shape: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as ``(channels, height, width)`` of positive integers, or a SpecError."""
    values = tuple(shape)
    if len(values) != 3 or not all(isinstance(v, int) and v > 0 for v in values):
        raise SpecError(
            "model.kwargs.input_shape",
            f"got {list(values)}",
            "give [channels, height, width] of one input, positive integers (e.g. [3, 32, 32])",
        )
    return values  # type: ignore[return-value]

"""Small classifiers for 28x28 single-channel images, built from JSON-able arguments.

Both end in a ``head`` linear layer and avoid BatchNorm and dropout, so they are pure functions
of their parameters and work under ``torch.func.functional_call`` and ``torch.func.vmap``.
"""

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

IMAGE_SIZE = 28


class MLP(nn.Module):
    """ReLU perceptron: hidden layers ``fc1``, ``fc2``, ... then the ``head`` logits layer."""

    def __init__(
        self, in_features: int = 784, hidden: Sequence[int] = (256, 128), num_classes: int = 10
    ) -> None:
        super().__init__()
        self._hidden_names = [f"fc{i}" for i in range(1, len(hidden) + 1)]
        width = in_features
        for name, out in zip(self._hidden_names, hidden, strict=True):
            self.add_module(name, nn.Linear(width, out))
            width = out
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` from ``[N, in_features]`` or ``[N, 1, 28, 28]`` inputs."""
        x = x.reshape(x.shape[0], -1)
        for name in self._hidden_names:
            x = F.relu(getattr(self, name)(x))
        return self.head(x)


class SmallCNN(nn.Module):
    """Conv net: blocks ``conv{i}`` (3x3) -> ``norm{i}`` (GroupNorm) -> ReLU -> 2x2 max-pool,
    then the ``head`` logits layer on the flattened feature map."""

    def __init__(
        self, channels: Sequence[int] = (16, 32), groups: int = 4, num_classes: int = 10
    ) -> None:
        super().__init__()
        self._blocks = [(f"conv{i}", f"norm{i}") for i in range(1, len(channels) + 1)]
        in_channels, side = 1, IMAGE_SIZE
        for (conv, norm), out in zip(self._blocks, channels, strict=True):
            self.add_module(conv, nn.Conv2d(in_channels, out, kernel_size=3, padding=1))
            self.add_module(norm, nn.GroupNorm(groups, out))
            in_channels, side = out, side // 2
        self.head = nn.Linear(in_channels * side * side, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` from ``[N, 1, 28, 28]`` or ``[N, 784]`` inputs."""
        x = x.reshape(x.shape[0], 1, IMAGE_SIZE, IMAGE_SIZE)
        for conv, norm in self._blocks:
            x = F.max_pool2d(F.relu(getattr(self, norm)(getattr(self, conv)(x))), 2)
        return self.head(x.flatten(1))

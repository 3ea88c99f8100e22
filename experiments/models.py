"""Small classifiers, built from JSON-able arguments.

All end in a ``head`` linear layer and avoid BatchNorm and dropout, so they are pure functions
of their parameters and work under ``torch.func.functional_call`` and ``torch.func.vmap``. The
image models' default input is one 28x28 single-channel image; ``input_shape``
(``[channels, height, width]`` of one input, as a data option of ``conf/data/`` sets it) fits
them to other images. ``TextTransformer`` classifies token ids (docs/toxicity.md).
"""

import math
from collections.abc import Sequence

import torch
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


class Attention(nn.Module):
    """Multi-head self-attention written out, ``softmax(Q K^T / sqrt(d)) V`` with the padding
    keys masked, so that second and forward-mode derivatives work on the CPU (the fused kernel
    has no double backward there). Projections ``query``, ``key``, ``value``, ``out`` are
    ``nn.Linear`` (LoRA adapters can wrap them)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise SpecError(
                "model.kwargs.heads", f"{heads} heads do not divide dim {dim}", "divide dim evenly"
            )
        self.heads = heads
        self.query, self.key = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.value, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """``x`` [N, L, dim], ``keep`` bool [N, L] (False: padding, never attended to)."""
        n, length, dim = x.shape

        def split(t: Tensor) -> Tensor:
            return t.reshape(n, length, self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads)
        scores = scores.masked_fill(~keep[:, None, None, :], -1e9)
        mixed = torch.softmax(scores, dim=-1) @ v
        return self.out(mixed.transpose(1, 2).reshape(n, length, dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + down(gelu(up(norm2(x))))``."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.up, self.down = (
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), keep)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TextTransformer(nn.Module):
    """Token ids ``[N, max_len]`` (0 = padding) -> logits ``[N, num_classes]``: token
    ``embed`` plus learned ``position`` embeddings, ``layers`` pre-norm blocks ``blocks.{i}``
    (attention ``attn.query/key/value/out``, feed-forward ``up``/``down``, all ``nn.Linear``),
    a final LayerNorm ``norm``, the mean over the non-padding positions, and the ``head``."""

    def __init__(
        self,
        vocab_size: int = 4000,
        max_len: int = 48,
        dim: int = 64,
        heads: int = 2,
        layers: int = 1,
        hidden: int = 128,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2 or tokens.shape[1] > self.max_len or tokens.is_floating_point():
            raise SpecError(
                "inputs",
                f"got {tokens.dtype} tokens of shape {list(tokens.shape)}",
                f"give int64 token ids [N, L] with L <= max_len = {self.max_len}",
            )
        keep = tokens != 0
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x, keep)
        weights = keep.to(x.dtype)[..., None]
        pooled = (self.norm(x) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)


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

"""Deterministic image transforms on float tensors ``[N, 1, H, W]`` with values in ``[0, 1]``.

Each transform is a pure function (the input is never modified). ``apply_transforms`` runs a
list of JSON-able specs ``{"name": ..., **params}`` so a dataset call can be recorded and replayed.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def translate(images: Tensor, dx: int = 0, dy: int = 0) -> Tensor:
    """Shift images ``dx`` pixels right and ``dy`` pixels down; vacated pixels become 0."""
    height, width = images.shape[-2:]
    dst_y, src_y = _shift_slices(dy, height)
    dst_x, src_x = _shift_slices(dx, width)
    out = torch.zeros_like(images)
    out[..., dst_y, dst_x] = images[..., src_y, src_x]
    return out


def invert(images: Tensor) -> Tensor:
    """Swap ink and background: ``1 - x``."""
    return 1.0 - images


def noise(images: Tensor, sigma: float, seed: int = 0) -> Tensor:
    """Add Gaussian noise of std ``sigma`` (in [0, 1] intensity units), then clamp to [0, 1].

    The noise is drawn for the whole batch from a CPU generator seeded with ``seed``, so the
    result is reproducible but depends on which rows (and in which order) are in ``images``.
    """
    if sigma < 0:
        raise ValueError(f"noise: sigma must be >= 0, got {sigma}")
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn(images.shape, generator=generator, dtype=images.dtype).mul_(sigma)
    return draws.to(images.device).add_(images).clamp_(0.0, 1.0)


def scale_contrast(images: Tensor, factor: float) -> Tensor:
    """Scale contrast around mid-grey: ``(x - 0.5) * factor + 0.5``, clamped to [0, 1]."""
    return (images - 0.5).mul_(factor).add_(0.5).clamp_(0.0, 1.0)


TRANSFORMS: dict[str, Callable[..., Tensor]] = {
    "translate": translate,
    "invert": invert,
    "noise": noise,
    "scale_contrast": scale_contrast,
}


def apply_transforms(images: Tensor, specs: Sequence[Mapping[str, Any]]) -> Tensor:
    """Apply ``specs`` (each ``{"name": ..., **params}``) in order; all names are checked first."""
    for spec in specs:
        name = spec.get("name")
        if name not in TRANSFORMS:
            known = ", ".join(sorted(TRANSFORMS))
            raise ValueError(f"unknown transform name {name!r}; known transform names: {known}")
    for spec in specs:
        params = {key: value for key, value in spec.items() if key != "name"}
        images = TRANSFORMS[spec["name"]](images, **params)
    return images


def _shift_slices(shift: int, size: int) -> tuple[slice, slice]:
    """Destination and source slices along one axis of length ``size`` for a shift by ``shift``."""
    shift = max(-size, min(size, shift))
    if shift >= 0:
        return slice(shift, size), slice(0, size - shift)
    return slice(0, size + shift), slice(-shift, size)

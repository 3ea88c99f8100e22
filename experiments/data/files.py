"""Reading the files of datasets that users keep on disk (CelebA, ChestX-ray14)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from attribution.record.errors import SpecError, StagetraceError


def stamped(path: Path, release: str) -> tuple[str, int, int]:
    """``path`` with its modification time and size, the cache key of a parsed text file; a
    missing file is named with where its ``release`` is distributed."""
    if not path.is_file():
        raise StagetraceError(
            f"{path} does not exist. Fix: copy it from the {release} into the root folder"
        )
    stat = path.stat()
    return str(path), stat.st_mtime_ns, stat.st_size


def read_images(paths: Sequence[Path], size: int, mode: str) -> Tensor:
    """Images at ``paths`` as float32 ``[N, C, size, size]`` in [-1, 1].

    Each is converted to PIL ``mode`` (``"RGB"``: C = 3, ``"L"``: C = 1), centre-cropped to a
    square of its shorter side, resized to ``size`` (bilinear), scaled to [0, 1] and mapped by
    ``(x - 0.5) / 0.5``, a fixed normalisation that needs no statistics of the data.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise SpecError("size", f"got {size!r}", "give the output side in pixels, at least 1")
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise StagetraceError(
            f"image {missing[0]} does not exist ({len(missing)} of {len(paths)} missing). Fix: "
            "restore the dataset's image files, or choose rows whose images are present"
        )
    pixels = np.stack([_square(path, size, mode) for path in paths])
    inputs = torch.from_numpy(pixels).to(torch.float32)
    inputs = inputs.unsqueeze_(1) if mode == "L" else inputs.permute(0, 3, 1, 2).contiguous()
    return inputs.div_(255.0).sub_(0.5).div_(0.5)


def _square(path: Path, size: int, mode: str) -> np.ndarray:
    """uint8 pixels of one image: converted, centre-cropped to a square, resized."""
    with Image.open(path) as image:
        image = image.convert(mode)
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))

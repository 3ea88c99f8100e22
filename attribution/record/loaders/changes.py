"""What changed between two states (e.g. a base checkpoint and a fine-tuned one): the names
added, removed, reshaped, retyped, left bit-identical (frozen) or changed in value."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

SHOWN = 8  # names listed per line by describe()


@dataclass(frozen=True)
class StateChanges:
    """Names by what happened to them, each tuple sorted. ``reshaped`` maps a name to its (old,
    new) shape; ``retyped`` holds same-shape tensors whose dtype changed; ``frozen`` those equal
    bit for bit; ``changed`` the rest."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    reshaped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    frozen: tuple[str, ...]
    changed: tuple[str, ...]
    retyped: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "reshaped": {k: [list(a), list(b)] for k, (a, b) in self.reshaped.items()},
            "frozen": list(self.frozen),
            "changed": list(self.changed),
            "retyped": list(self.retyped),
        }

    def describe(self) -> list[str]:
        """One line per non-empty kind of change, e.g. ``2 changed: a.weight, a.bias``."""
        lines = []
        for kind in ("changed", "frozen", "added", "removed", "retyped"):
            names = getattr(self, kind)
            if names:
                lines.append(f"{len(names)} {kind}: {_listed(list(names))}")
        if self.reshaped:
            shown = [f"{k} {list(a)} -> {list(b)}" for k, (a, b) in self.reshaped.items()]
            lines.append(f"{len(shown)} reshaped: {_listed(shown)}")
        return lines


def compare_states(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
) -> StateChanges:
    """Classify every name of ``before`` and ``after``; a shape change wins over a dtype change."""
    common = sorted(set(before) & set(after))
    reshaped, retyped, frozen, changed = {}, [], [], []
    for name in common:
        old, new = before[name], after[name]
        if old.shape != new.shape:
            reshaped[name] = (tuple(old.shape), tuple(new.shape))
        elif old.dtype != new.dtype:
            retyped.append(name)
        elif _same_bits(old, new):
            frozen.append(name)
        else:
            changed.append(name)
    return StateChanges(
        added=tuple(sorted(set(after) - set(before))),
        removed=tuple(sorted(set(before) - set(after))),
        reshaped=reshaped,
        frozen=tuple(frozen),
        changed=tuple(changed),
        retyped=tuple(retyped),
    )


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN equals the same NaN, 0.0 differs from -0.0)."""
    a, b = a.detach().cpu().contiguous().reshape(-1), b.detach().cpu().contiguous().reshape(-1)
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _listed(items: list[str]) -> str:
    more = f", ... and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more

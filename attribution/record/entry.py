"""Entry actions: changes made to the model when a stage starts (head re-init, LoRA adapters).

They are seeded and independent of the parameters they act on, so a counterfactual that skips an
earlier stage applies exactly the same change. ``LoRALinear`` keeps the wrapped layer's
``weight`` and ``bias`` under their original names, so parameter names stay stable across stages
and only ``<layer>.lora_A`` / ``<layer>.lora_B`` are new.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn
from torch.nn import functional as F

from attribution.record.errors import SpecError
from attribution.record.spec import EntryAction


class LoRALinear(nn.Module):
    """``y = x W^T + b + (alpha / rank) * x A^T B^T`` with ``A`` [rank, in] and ``B`` [out, rank].

    ``B`` starts at zero, so adding the adapter does not change the function.
    """

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.scale = alpha / rank
        a = torch.empty(rank, base.in_features, dtype=base.weight.dtype)
        bound = 1.0 / math.sqrt(base.in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(
            F.linear(x, self.lora_A), self.lora_B
        )


def matching_modules(model: nn.Module, patterns: tuple[str, ...], where: str) -> list[str]:
    """Names of the modules matching any glob pattern; each pattern must match something."""
    names = [n for n, _ in model.named_modules() if n]
    found = []
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise SpecError(
                where, f"no module matches {pattern!r}", f"use names such as {', '.join(names[:8])}"
            )
        found += [h for h in hits if h not in found]
    return found


def apply_entry(model: nn.Module, action: EntryAction, where: str = "entry") -> None:
    """Apply one entry action to ``model`` in place, without touching the global RNG."""
    names = matching_modules(model, action.modules, f"{where}.modules")
    if action.kind == "reinit":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(action.seed)
            for name in names:
                module = model.get_submodule(name)
                resettable = [m for m in module.modules() if hasattr(m, "reset_parameters")]
                if not resettable:
                    raise SpecError(
                        f"{where}.modules",
                        f"module {name!r} has no parameters to re-initialise",
                        "name a module with reset_parameters()",
                    )
                for m in resettable:
                    m.reset_parameters()
        return
    generator = torch.Generator().manual_seed(action.seed)
    for name in names:
        base = model.get_submodule(name)
        if isinstance(base, LoRALinear):
            raise SpecError(
                f"{where}.modules", f"{name!r} already has a LoRA adapter", "add each adapter once"
            )
        if not isinstance(base, nn.Linear):
            raise SpecError(
                f"{where}.modules",
                f"{name!r} is a {type(base).__name__}, not nn.Linear",
                "name linear layers for add_lora",
            )
        parent, _, child = name.rpartition(".")
        lora = LoRALinear(base, action.rank, action.alpha, generator)
        setattr(model.get_submodule(parent) if parent else model, child, lora)


def is_structural(action: EntryAction) -> bool:
    """Whether the action changes the set of parameters (needed to rebuild a model for loading)."""
    return action.kind == "add_lora"

"""PEFT LoRA adapters read from a ``save_pretrained`` folder, without importing peft.

A module's update is ``ΔW = scaling · B A`` with ``A`` [r, in] and ``B`` [out, r];
``scaling = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern``
and ``alpha_pattern`` override ``r`` and ``lora_alpha`` per module, matched as PEFT matches them
(``peft.utils.other.get_pattern_key``: the first pattern ``p``, in the config's order, such that
the module name fully matches the regular expression ``(.*\\.)?(p)$``). Module names are the base
model's ``named_modules()`` names (PEFT's keys without ``base_model.model.``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attribution.record.errors import StagetraceError, TrajectoryError
from attribution.record.loaders.weights import load_weights_file, read_json

PREFIX = "base_model.model."
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
RESAVE = "save the adapter again with peft's save_pretrained"
LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.default)?(?P<tail>\.weight)?$"
)


def pattern_key(patterns: Mapping[str, Any], name: str) -> str | None:
    """The pattern of ``patterns`` that applies to module ``name``, as PEFT picks it."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


@dataclass(frozen=True, eq=False)
class LoRAModule:
    """One adapted module: ``name`` (the base model's module path, e.g. ``layers.0.attn.q``),
    its rank ``r``, ``alpha``, ``scaling``, whether the base weight is stored [in, out]
    (``fan_in_fan_out``, GPT-2's ``Conv1D``), ``A`` [r, in], ``B`` [out, r], and whether it adapts
    an ``nn.Embedding`` (PEFT's ``lora_embedding_A`` [r, num_embeddings] and ``lora_embedding_B``
    [embedding_dim, r], so ``ΔW = scaling · (B A)ᵀ`` [num_embeddings, embedding_dim])."""

    name: str
    r: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool
    A: torch.Tensor
    B: torch.Tensor
    embedding: bool = False
    rslora: bool = False

    def delta(self) -> torch.Tensor:
        """``ΔW`` in the layout of the base weight, in ``B``'s dtype (computed in float32 when
        ``B`` is half precision, as PEFT merges on CPU)."""
        a, b = self.A, self.B
        half = b.dtype in (torch.float16, torch.bfloat16)
        if half:
            a, b = a.float(), b.float()
        product = b @ a
        if self.embedding or self.fan_in_fan_out:
            product = product.T
        out = product * self.scaling
        return out.to(self.B.dtype) if half else out

    def to_json(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "scaling": self.scaling,
            "fan_in_fan_out": self.fan_in_fan_out,
            "embedding": self.embedding,
            "rslora": self.rslora,
            "A": list(self.A.shape),
            "B": list(self.B.shape),
        }


@dataclass(frozen=True, eq=False)
class LoRAAdapter:
    """A LoRA adapter: its ``modules`` by name, the full tensors that replace base tensors
    (``modules_to_save``, and trained biases under ``bias="all"``/``"lora_only"``) by the base's
    tensor names, and the ``adapter_config.json`` it was read with."""

    modules: dict[str, LoRAModule]
    modules_to_save: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def delta(self, name: str) -> torch.Tensor:
        """``ΔW`` of module ``name``, to be added to ``<name>.weight``."""
        return self._module(name).delta()

    def merged(self, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``base`` with every ``ΔW`` added to ``<module>.weight`` and the ``modules_to_save``
        tensors put in place: the state dict of PEFT's ``merge_and_unload()``. Every module and
        shape is checked before anything is computed. Half-precision weights are summed in
        float32 and rounded once. Untouched tensors are the base's own objects."""
        trained_on = self.config.get("base_model_name_or_path")
        refit = "merge into the base model the adapter was trained on" + (
            f" ({trained_on})" if trained_on else ""
        )
        problems: list[tuple[str, str]] = []  # (what is wrong, the fix)
        for name, module in self.modules.items():
            key, want = f"{name}.weight", self._delta_shape(module)
            if key not in base:
                problems.append((f"module {name!r} has no {key!r} in the base", refit))
                continue
            have = tuple(base[key].shape)
            if have == want:
                continue
            problem = f"{key!r} is {list(have)} in the base, the adapter's update {list(want)}"
            if have == want[::-1] and not module.embedding:
                flip = {name: not module.fan_in_fan_out}
                problem += (
                    " (the transposed layout: PEFT sets fan_in_fan_out per layer, False for "
                    "nn.Linear and True for Conv1D, and saves only one value)"
                )
                problems.append((problem, f"pass fan_in_fan_out={flip} to load_peft_adapter"))
            else:
                problems.append((problem, refit))
        for key, value in self.modules_to_save.items():
            if key not in base:
                problems.append((f"modules_to_save tensor {key!r} is not in the base", refit))
            elif base[key].shape != value.shape:
                shapes = f"{list(value.shape)}, the base's {list(base[key].shape)}"
                problems.append((f"modules_to_save tensor {key!r} is {shapes}", refit))
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise StagetraceError(
                f"LoRA adapter does not fit the base state: {problems[0][0]}{more}. "
                f"Fix: {problems[0][1]}"
            )
        out = dict(base)
        for name, module in self.modules.items():
            weight = base[f"{name}.weight"]
            wide = torch.promote_types(weight.dtype, torch.float32)
            out[f"{name}.weight"] = (weight.to(wide) + module.delta().to(wide)).to(weight.dtype)
        out.update(self.modules_to_save)
        return out

    def as_lora_parameters(self) -> dict[str, torch.Tensor]:
        """``{"<module>.lora_A": A, "<module>.lora_B": B}``: the parameters of the tool's
        ``attribution.record.entry.LoRALinear``, declared with ``rank = r`` and ``alpha`` as
        here. Valid only where that layer computes the same update: plain LoRA on an
        ``nn.Linear`` (scaling = alpha / r). rsLoRA (alpha / √r), embedding and
        ``fan_in_fan_out`` modules are refused; use ``merged`` or ``delta`` for them."""
        for module in self.modules.values():
            fix = "use the adapter merged into the base (LoRAAdapter.merged)"
            if module.embedding:
                kind = "adapts an embedding"
            elif module.fan_in_fan_out:
                kind = "adapts a fan_in_fan_out (Conv1D) layer"
            elif module.rslora:
                kind = "uses rsLoRA's scaling alpha/sqrt(r)"
                alpha = module.scaling * module.r
                fix += f", or declare the tool's alpha as scaling x r = {alpha:g}"
            else:
                continue
            raise StagetraceError(
                f"LoRA module {module.name!r} {kind}, which the tool's LoRALinear "
                f"(nn.Linear, scale alpha/rank) does not compute. Fix: {fix}"
            )
        out = {}
        for name, module in self.modules.items():
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = module.A, module.B
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "modules": {name: m.to_json() for name, m in self.modules.items()},
            "modules_to_save": {k: list(v.shape) for k, v in self.modules_to_save.items()},
            "config": self.config,
        }

    def _module(self, name: str) -> LoRAModule:
        if name not in self.modules:
            raise StagetraceError(
                f"the LoRA adapter has no module {name!r}. Fix: use one of "
                f"{', '.join(sorted(self.modules)[:8]) or '(none)'}"
            )
        return self.modules[name]

    @staticmethod
    def _delta_shape(module: LoRAModule) -> tuple[int, int]:
        out, inp = module.B.shape[0], module.A.shape[1]
        return (inp, out) if module.embedding or module.fan_in_fan_out else (out, inp)


UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) adapters",
    "lora_bias": "adapters with a LoRA bias (lora_bias)",
    "target_parameters": "adapters on bare parameters (target_parameters)",
    "trainable_token_indices": "trainable-token adapters (trainable_token_indices)",
    "layer_replication": "adapters with layer_replication",
}


def load_peft_adapter(
    folder: Path | str, *, fan_in_fan_out: Mapping[str, bool] | None = None
) -> LoRAAdapter:
    """The LoRA adapter that PEFT's ``save_pretrained`` wrote to ``folder``.

    ``fan_in_fan_out`` overrides the config's setting for the modules it matches (keys matched as
    ``rank_pattern``'s). PEFT sets it per layer (False for ``nn.Linear``, True for ``Conv1D``)
    but saves one value, which ``merged`` finds wrong only where a weight is not square.
    """
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    config = read_json(config_path, f"give the folder PEFT's save_pretrained wrote ({RESAVE})")
    if not isinstance(config, dict):
        raise TrajectoryError(config_path, "not a JSON object", RESAVE)
    _check_config(config_path, config)
    weights = next((folder / n for n in ADAPTER_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise TrajectoryError(
            folder, f"holds neither {' nor '.join(ADAPTER_FILES)}", "copy the adapter's weights"
        )
    tensors = load_weights_file(weights)
    parts: dict[str, dict[str, Any]] = {}
    replaced: dict[str, torch.Tensor] = {}
    saved = config.get("modules_to_save") or []
    saved = [saved] if isinstance(saved, str) else saved
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        found = LORA_KEY.match(name)
        embedding_kind = found and found["kind"].startswith("lora_embedding")
        if found and bool(found["tail"]) != bool(embedding_kind):
            parts.setdefault(found["module"], {})[found["kind"][-1]] = value
            if embedding_kind:
                parts[found["module"]]["embedding"] = True
            continue
        plain = name
        for wrapper in (".modules_to_save.default.", ".modules_to_save.", ".base_layer."):
            plain = plain.replace(wrapper, ".")
        segments = plain.split(".")
        owners = [".".join(segments[:i]) for i in range(1, len(segments))]
        lora_part = any(part.startswith("lora_") for part in segments)
        if not lora_part and (
            any(o.endswith(t) for o in owners for t in saved)
            or (config.get("bias", "none") != "none" and plain.endswith(".bias"))
        ):
            replaced[plain] = value
            continue
        raise TrajectoryError(
            weights,
            f"tensor {key!r} is neither a LoRA factor (lora_A/lora_B, lora_embedding_A/B) nor "
            "part of a module in modules_to_save",
            "load adapters of plain LoRA (DoRA, LoRA biases and other PEFT methods are not read)",
            field=key,
        )
    modules = {
        name: _module(weights, config, name, factors, fan_in_fan_out or {})
        for name, factors in sorted(parts.items())
    }
    return LoRAAdapter(modules=modules, modules_to_save=replaced, config=config)


def _check_config(path: Path, config: dict[str, Any]) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise TrajectoryError(
            path, f"is a {config['peft_type']} adapter, not LoRA", "load a LoRA adapter"
        )
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise TrajectoryError(
                path, f"{what} are not supported", "merge the adapter with peft first", field=key
            )
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise TrajectoryError(path, f"{key} must be a positive number", RESAVE, field=key)
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise TrajectoryError(path, f"{key} must be an object", RESAVE, field=key)


def _module(
    path: Path,
    config: dict[str, Any],
    name: str,
    factors: dict[str, Any],
    flips: Mapping[str, bool],
) -> LoRAModule:
    embedding = bool(factors.get("embedding"))
    if "A" not in factors or "B" not in factors:
        missing = "lora_B" if "A" in factors else "lora_A"
        raise TrajectoryError(path, f"module {name!r} has no {missing}", RESAVE, field=name)
    a, b = factors["A"], factors["B"]
    ranks = config.get("rank_pattern") or {}
    alphas = config.get("alpha_pattern") or {}
    r_key, alpha_key, flip_key = (pattern_key(p, name) for p in (ranks, alphas, flips))
    r = int(ranks[r_key] if r_key is not None else config["r"])
    alpha = float(alphas[alpha_key] if alpha_key is not None else config["lora_alpha"])
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
        raise TrajectoryError(
            path,
            f"module {name!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, but "
            f"adapter_config.json gives it rank {r} (A must be [r, in], B [out, r])",
            "use the adapter_config.json saved with these weights (only Linear, Conv1D and "
            "Embedding LoRA are read)",
            field=name,
        )
    rslora = bool(config.get("use_rslora"))
    flip = bool(config.get("fan_in_fan_out"))
    if flip_key is not None:
        flip = bool(flips[flip_key])
    return LoRAModule(
        name=name,
        r=r,
        alpha=alpha,
        scaling=alpha / math.sqrt(r) if rslora else alpha / r,
        fan_in_fan_out=flip and not embedding,
        A=a,
        B=b,
        embedding=embedding,
        rslora=rslora,
    )

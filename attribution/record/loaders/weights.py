"""Model weights as people have them: safetensors or torch files, single or sharded, in a
Hugging Face folder. Everything loads to CPU with dtypes kept exactly (bfloat16 stays bfloat16).

Trust: a ``.pt``/``.bin`` file is a pickle, and unpickling runs code, so it is read only through
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers; a
refused file is reported as not loaded, never retried another way. Nothing here writes a file.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from attribution.record.errors import TrajectoryError

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
# What a folder may hold, in the order they are looked for (safetensors first: no pickle).
FOLDER_FILES = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", TORCH_INDEX)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
REFETCH = "download or copy the checkpoint again"


def load_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, by name, on CPU with their stored dtypes.

    ``path`` is a ``.safetensors`` file, a ``.pt``/``.pth``/``.bin`` file, a sharded index
    (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) or a folder holding
    one of ``FOLDER_FILES``. A sharded checkpoint must hold every name of its index in the shard
    the index names, and nothing else.
    """
    path = Path(path)
    if path.is_dir():
        path = _folder_file(path)
    if not path.is_file():
        raise TrajectoryError(path, "file is missing", "give the path of an existing checkpoint")
    if path.name.endswith(".index.json"):
        return _load_sharded(path)
    return load_weights_file(path)


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """One unsharded file, by its suffix: safetensors, or a torch pickle read weights-only."""
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise TrajectoryError(
                path, f"not a readable safetensors file (truncated or corrupt: {exc})", REFETCH
            ) from exc
    if path.suffix in TORCH_SUFFIXES:
        return _tensors_only(path, load_torch_file(path))
    raise TrajectoryError(
        path,
        "unknown checkpoint format (expected .safetensors, .pt, .pth, .bin or *.index.json)",
        "give a safetensors or torch checkpoint, or the folder holding it",
    )


def load_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a refusal names why nothing was loaded."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(exc))
        reason = found.group(1).strip() if found else str(exc).splitlines()[0]
        why = (
            "loading it would run code or build objects other than tensors"
            if "global" in reason.lower()
            else "it is corrupt, or a pickle of objects other than tensors"
        )
        raise TrajectoryError(
            path,
            f"NOT loaded: torch.load(weights_only=True) refuses this pickle: {why} ({reason})",
            "convert the checkpoint to safetensors where you trust its source "
            "(safetensors.torch.save_file(model.state_dict(), ...)), or re-save it with "
            "torch.save(model.state_dict(), ...)",
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise TrajectoryError(
            path, f"not a readable torch checkpoint (truncated or corrupt: {exc})", REFETCH
        ) from exc


def _tensors_only(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    """A loaded object that must be a flat {name: tensor} mapping."""
    if not isinstance(obj, dict):
        raise TrajectoryError(
            path,
            f"holds a {type(obj).__name__}, not a mapping of names to tensors",
            "save model.state_dict()",
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            nested = " (a nested dict: the state dict may sit under this key)" * isinstance(
                value, dict
            )
            raise TrajectoryError(
                path,
                f"entry {key!r} is a {type(value).__name__}, not a tensor{nested}",
                "save a flat model.state_dict(), e.g. torch.save(ckpt[key], ...)",
                field=str(key),
            )
    return obj


def _folder_file(folder: Path) -> Path:
    for name in FOLDER_FILES:
        if (folder / name).is_file():
            return folder / name
    raise TrajectoryError(
        folder,
        f"holds no checkpoint (looked for {', '.join(FOLDER_FILES)})",
        "give the folder a model was saved to (save_pretrained), or the checkpoint file itself",
    )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"name {key!r} appears twice")
        out[key] = value
    return out


def read_json(path: Path, fix: str) -> Any:
    """A JSON file, refusing duplicate keys (a later one would silently win)."""
    if not path.is_file():
        raise TrajectoryError(path, "file is missing", fix)
    try:
        return json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrajectoryError(path, f"not valid JSON ({exc})", fix) from exc


def _load_sharded(index: Path) -> dict[str, torch.Tensor]:
    """Every shard of an index, checked against the index before and after loading."""
    data = read_json(index, REFETCH)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise TrajectoryError(
            index, "has no non-empty 'weight_map' of tensor names to shard files", REFETCH
        )
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise TrajectoryError(
                index,
                f"tensor {name!r} is mapped to {shard!r}, not a file name inside the folder",
                REFETCH,
                field=f"weight_map.{name}",
            )
        shards.setdefault(shard, []).append(name)
    for shard, names in shards.items():
        if not (index.parent / shard).is_file():
            raise TrajectoryError(
                index.parent / shard,
                f"shard is missing (the index maps {len(names)} tensors to it, e.g. {names[0]!r})",
                f"download every shard listed in {index.name}",
            )
    state: dict[str, torch.Tensor] = {}
    for shard, names in shards.items():
        tensors = load_weights_file(index.parent / shard)
        unlisted = sorted(set(tensors) - set(names))
        absent = sorted(set(names) - set(tensors))
        if unlisted:
            where = weight_map.get(unlisted[0])
            also = f"the index puts it in {where}" if where else "the index lists no such name"
            raise TrajectoryError(
                index.parent / shard,
                f"holds {len(unlisted)} tensors its index does not map to it, e.g. "
                f"{unlisted[0]!r} ({also})",
                f"use the {index.name} that was written with these shards",
            )
        if absent:
            raise TrajectoryError(
                index.parent / shard,
                f"lacks {len(absent)} tensors its index maps to it, e.g. {absent[0]!r}",
                f"use the {index.name} that was written with these shards",
            )
        state.update(tensors)
    return state


def load_model_config(folder: Path | str) -> dict[str, Any]:
    """``config.json`` of a Hugging Face model folder (or the file itself), as a dict."""
    path = Path(folder)
    path = path / "config.json" if path.is_dir() or not path.suffix else path
    fix = "give the folder a model was saved to with save_pretrained (it writes config.json)"
    config = read_json(path, fix)
    if not isinstance(config, dict):
        raise TrajectoryError(path, f"holds a JSON {type(config).__name__}, not an object", fix)
    return config

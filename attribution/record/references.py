"""References to user code (``"module:attribute"``) and named losses, as stored in manifests.

A trajectory must be replayable in a fresh process, so models, datasets and losses are recorded
as import references with JSON keyword arguments, never as pickled objects.

Trust boundary: a run directory may come from someone else, and a reference names code to run,
so a reference resolves only into trusted modules: the project's own packages
(``PROJECT_MODULES``) and those the user trusts, with ``trust("mypkg")``, the command line's
``--trust-module mypkg`` or the environment variable ``STAGETRACE_TRUST=mypkg,other``. Anything
else is refused before it is imported. The attribute must also be defined in a trusted module
(a trusted module's import of ``os.system`` does not make ``os.system`` trusted).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from attribution.record.errors import SpecError

PROJECT_MODULES = ("attribution", "estimators", "experiments")
TRUST_ENV = "STAGETRACE_TRUST"
_trusted: set[str] = set()
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error, written out: torch 2.13 cannot take the forward-mode derivative of
    ``F.mse_loss``'s backward ("ZeroTensors are immutable"), which the E2 estimator needs."""
    return (outputs - targets).square().mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": mse,
    "binary_cross_entropy_with_logits": F.binary_cross_entropy_with_logits,
}


@dataclass(frozen=True)
class Ref:
    """A call to user code: ``target`` is ``"package.module:attribute"``, ``kwargs`` are JSON."""

    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kwargs": _plain(self.kwargs)}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Ref:
        if not isinstance(obj, Mapping) or not isinstance(obj.get("target"), str):
            raise SpecError(
                where,
                f"expected {{target: 'module:attr', kwargs: {{...}}}}, got {obj!r}",
                "give a mapping with a 'target' string",
            )
        kwargs = obj.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise SpecError(
                f"{where}.kwargs",
                f"expected a mapping, got {kwargs!r}",
                "give keyword arguments as a mapping",
            )
        return cls(obj["target"], _plain(kwargs))

    def key(self) -> str:
        """A canonical string, equal for equal references (used for caching)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def call(self) -> Any:
        """Call the target with the keyword arguments; arguments it does not take are refused
        (``SpecError``) before the call."""
        target = resolve(self.target)
        try:
            inspect.signature(target).bind(**self.kwargs)
        except TypeError as exc:
            raise SpecError(
                "kwargs",
                f"{self.target} does not take the keyword arguments {dict(self.kwargs)} ({exc})",
                "give only the arguments its signature names",
            ) from exc
        except ValueError:  # no signature to check (some builtins): the call will tell
            pass
        return target(**self.kwargs)


def _plain(value: Any) -> Any:
    """Turn mappings and sequences (OmegaConf containers included) into plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def trust(*modules: str) -> None:
    """Let references resolve into ``modules`` (and their submodules) in this process."""
    for module in modules:
        if not isinstance(module, str) or not _MODULE.fullmatch(module):
            raise SpecError(
                "trust", f"{module!r} is not a module name", "give a dotted name such as mypkg"
            )
    _trusted.update(modules)


def trust_target(target: str) -> None:
    """Trust the module of a ``"module:attribute"`` reference that the user named in code."""
    module = target.partition(":")[0]
    if module:
        trust(module)


def trusted_modules() -> tuple[str, ...]:
    """The project's packages, then those trusted by ``trust`` and by ``STAGETRACE_TRUST``."""
    from_env = [m.strip() for m in os.environ.get(TRUST_ENV, "").split(",") if m.strip()]
    return (*PROJECT_MODULES, *sorted(_trusted), *from_env)


def is_trusted(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in trusted_modules())


def resolve(target: str) -> Any:
    """Import ``"package.module:attribute"`` from a trusted module and return the attribute."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise SpecError(
            "target",
            f"{target!r} is not of the form 'package.module:attribute'",
            "write the reference as 'package.module:attribute'",
        )
    _check_trusted(target, module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(
            "target",
            f"cannot import module {module_name!r} ({exc})",
            "install the package that defines it or correct the reference",
        ) from exc
    try:
        value = getattr(module, attr)
    except AttributeError as exc:
        raise SpecError(
            "target", f"module {module_name!r} has no attribute {attr!r}", "correct the reference"
        ) from exc
    owner = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
    _check_trusted(target, owner or module_name)
    return value


def _check_trusted(target: str, module: str) -> None:
    if not is_trusted(module):
        top = module.partition(".")[0]
        raise SpecError(
            "target",
            f"{target!r} names code in {module!r}, which is not trusted (a run directory or "
            f"behaviours file may come from someone else; trusted: {', '.join(trusted_modules())})",
            f"if you trust {top!r}, pass --trust-module {top} or set {TRUST_ENV}={top}",
        )


def loss_function(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A mean-reduced loss ``loss(outputs, targets)``: a name from ``LOSSES`` or a reference."""
    if name in LOSSES:
        return LOSSES[name]
    if ":" in name:
        return resolve(name)
    raise SpecError(
        "loss",
        f"unknown loss {name!r}",
        f"use one of {', '.join(LOSSES)} or a 'module:function' reference",
    )


@lru_cache(maxsize=16)
def _load_dataset(key: str) -> Any:
    obj = json.loads(key)
    return Ref(obj["target"], obj["kwargs"]).call()


def load_dataset(ref: Ref) -> Any:
    """Build (and cache in-process) the dataset a reference describes. Treat it as read-only."""
    return _load_dataset(ref.key())

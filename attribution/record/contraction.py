"""Directional derivatives of per-example quantities in reverse mode, contracted where the
parameters enter the computation: the linear read-out's fast path (docs/scale.md).

For per-example quantities f_i and K tangents t_k over the parameters,

    <grad f_i(theta), t_k> = sum over the operations u that take a parameter of
                             <d f_i / d y_u, J_u t_k>,

y_u being the operation's output and J_u its Jacobian in the parameters it takes. One forward
pass at theta records those operations (a ``TorchFunctionMode``); one backward pass of
sum_i f_i gives every example's cotangent d f_i / d y_u at once, since in eval mode example i's
quantity depends on example i's rows alone; and each operation's tangent J_u t_k is formed for
the K tangents together: for ``F.linear`` and ``F.conv2d`` the K weight offsets as one product
(or, over sequences, each example's weight gradient once), for ``F.layer_norm`` and
``F.group_norm`` sums of g * x_hat, elsewhere a jvp of that one operation vectorised over the
tangents. The cost is one forward, one backward to
the activations (no weight gradients) and, per tangent, about one forward of the parameterised
operations: a forward-mode jvp needs two products per layer and tangent (W x' + W' x).

Operations on parameters alone (a transpose, a slice of a position table) carry the tangents
forward; an operation that meets an example-carrying tensor and a parameter is where the
contraction happens. What cannot be handled this way (an output without the examples on its
first dimension, an output modified in place before the backward pass, a tangent along
buffers) makes ``contracted_along`` give up, and the caller uses the jvp instead.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jvp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten


class NotContractible(RuntimeError):
    """The model uses its parameters in a way the contraction does not cover."""


@dataclass
class _Site:
    """One operation that met an example-carrying tensor and a parameter: its output's
    cotangent contracted with its tangent is its share of every example's derivative."""

    func: Callable[..., Any]
    args: tuple
    kwargs: dict
    output: Tensor
    version: int


class _Recorder(TorchFunctionMode):
    """Runs the forward pass as it is, noting which tensors carry examples (derived from the
    inputs), the tangent [K, ...] of every tensor derived from parameters alone, and the sites."""

    def __init__(self, inputs: Tensor, tangents: Mapping[int, tuple[Tensor, Tensor]]) -> None:
        super().__init__()
        self.batched: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
        self.batched[id(inputs)] = inputs
        self.derived: dict[int, tuple[Tensor, Tensor]] = dict(tangents)
        self.sites: list[_Site] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
        batched = any(id(a) in self.batched for a in leaves)
        carried = any(id(a) in self.derived for a in leaves)
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, Tensor)]
        if carried and outputs:
            if not isinstance(out, Tensor):
                raise NotContractible(f"{_name(func)} takes a parameter and gives several tensors")
            if batched:
                self.sites.append(_Site(func, args, kwargs, out, out._version))
            else:
                self.derived[id(out)] = (out, _local_tangent(func, args, kwargs, self.derived))
        if batched:
            for o in outputs:
                self.batched[id(o)] = o
        return out


def contracted_along(
    module_call: Callable[[Mapping[str, Tensor], Tensor, Tensor], Tensor],
    point: Mapping[str, Tensor],
    stacked: Mapping[str, Tensor],
) -> Callable[[Tensor, Tensor], Tensor]:
    """The batch function ``(x, y) -> [K, b]`` of <grad f_i(point), t_k>, where
    ``module_call(values, x, y)`` gives the per-example quantities [b] with ``values`` (a subset
    of ``point``) in place of the model's own, and ``stacked[name]`` is [K, *shape] (the K
    tangents along ``name``). Raises ``NotContractible`` for a model it does not cover."""

    def along(x: Tensor, y: Tensor) -> Tensor:
        values = {n: point[n].detach().requires_grad_(True) for n in stacked}
        tangents = {id(values[n]): (values[n], stacked[n]) for n in stacked}
        recorder = _Recorder(x, tangents)
        with torch.enable_grad(), recorder:
            quantity = module_call(values, x, y)
        k, b = next(iter(stacked.values())).shape[0], len(y)
        total = torch.zeros(k, b, dtype=torch.float64, device=quantity.device)
        if not recorder.sites or not quantity.requires_grad:
            return total
        for site in recorder.sites:
            if site.output._version != site.version:
                raise NotContractible(f"the output of {_name(site.func)} is changed in place")
            if site.output.ndim == 0 or site.output.shape[0] != b:
                raise NotContractible(f"{_name(site.func)} gives no per-example first dimension")
        cotangents = torch.autograd.grad(
            quantity.sum(), [s.output for s in recorder.sites], allow_unused=True
        )
        with torch.no_grad():
            for site, g in zip(recorder.sites, cotangents, strict=True):
                if g is not None:
                    total += _contract(site, g, recorder.derived, k).to(torch.float64)
        return total

    return along


def _contract(
    site: _Site, cotangent: Tensor, derived: Mapping[int, tuple[Tensor, Tensor]], k: int
) -> Tensor:
    """[K, b]: the site's cotangent contracted with its tangent, per example and tangent."""
    special = _SPECIAL.get(site.func)
    if special is not None:
        bound = special[1].bind(*site.args, **site.kwargs)
        bound.apply_defaults()
        ungrouped = bound.arguments.get("groups", 1) == 1
        if id(bound.arguments["input"]) not in derived and ungrouped:
            return special[0](bound.arguments, cotangent, derived, k)
    tangent = _local_tangent(site.func, site.args, site.kwargs, derived)
    return (tangent * cotangent).reshape(k, cotangent.shape[0], -1).sum(-1)


GRADIENT_FLOATS = 1 << 24
"""Most floats of per-example weight gradients ``_linear`` holds at once (64 MiB in float32)."""


def _linear(
    args: Mapping[str, Any], g: Tensor, derived: Mapping[int, tuple[Tensor, Tensor]], k: int
) -> Tensor:
    """``F.linear(x, W, b)``: sum over positions of g^T W'_k x + g^T b'_k. With one position per
    example, the K products x W'_k^T as one matrix product; with s positions, each example's
    weight gradient sum_s g_s x_s^T once (in chunks of ``GRADIENT_FLOATS``) and its inner
    product with the K tangents, s + K instead of s K products of the layer's size."""
    x, weight, bias = args["input"], args["weight"], args["bias"]
    b, out = g.shape[0], g.shape[-1]
    x = x.detach().reshape(b, -1, x.shape[-1])
    g = g.reshape(b, -1, out)
    total = torch.zeros(k, b, dtype=g.dtype, device=g.device)
    if id(weight) in derived:
        w = derived[id(weight)][1].reshape(k, -1)  # [K, out * in]
        positions = x.shape[1]
        if positions * k <= positions + k:
            moved = x @ w.reshape(k * out, -1).T  # [b, s, K * out]
            total += (moved.view(b, positions, k, out) * g[:, :, None]).sum((1, 3)).T
        else:
            chunk = max(1, GRADIENT_FLOATS // w.shape[1])
            for i in range(0, b, chunk):
                gradients = g[i : i + chunk].transpose(1, 2) @ x[i : i + chunk]
                total[:, i : i + chunk] += w @ gradients.reshape(len(gradients), -1).T
    if bias is not None and id(bias) in derived:
        total += derived[id(bias)][1] @ g.sum(1).T
    return total


def _layer_norm(
    args: Mapping[str, Any], g: Tensor, derived: Mapping[int, tuple[Tensor, Tensor]], k: int
) -> Tensor:
    """``F.layer_norm(x, shape, w, b, eps)`` = x_hat * w + b: per example, the sums over
    positions of g * x_hat and of g, against the K tangents of w and b."""
    x, shape, weight, bias = (args[n] for n in ("input", "normalized_shape", "weight", "bias"))
    b, size = g.shape[0], math.prod(shape)
    g = g.reshape(b, -1, size)
    total = torch.zeros(k, b, dtype=g.dtype, device=g.device)
    if weight is not None and id(weight) in derived:
        normal = F.layer_norm(x.detach(), shape, eps=args["eps"]).reshape(b, -1, size)
        total += derived[id(weight)][1].reshape(k, size) @ (g * normal).sum(1).T
    if bias is not None and id(bias) in derived:
        total += derived[id(bias)][1].reshape(k, size) @ g.sum(1).T
    return total


def _group_norm(
    args: Mapping[str, Any], g: Tensor, derived: Mapping[int, tuple[Tensor, Tensor]], k: int
) -> Tensor:
    """``F.group_norm(x, groups, w, b, eps)`` = x_hat * w + b per channel (dimension 1): per
    example and channel, the sums over positions of g * x_hat and of g, against the K tangents
    of w and b."""
    x, weight, bias = args["input"], args["weight"], args["bias"]
    b, channels = g.shape[0], g.shape[1]
    g = g.reshape(b, channels, -1)
    total = torch.zeros(k, b, dtype=g.dtype, device=g.device)
    if weight is not None and id(weight) in derived:
        normal = F.group_norm(x.detach(), args["num_groups"], eps=args["eps"])
        total += derived[id(weight)][1] @ (g * normal.reshape(b, channels, -1)).sum(-1).T
    if bias is not None and id(bias) in derived:
        total += derived[id(bias)][1] @ g.sum(-1).T
    return total


def _conv2d(
    args: Mapping[str, Any], g: Tensor, derived: Mapping[int, tuple[Tensor, Tensor]], k: int
) -> Tensor:
    """``F.conv2d``, linear in its weight: the K weight tangents stacked along the output
    channels as one convolution, then summed against g per example; the bias as ``_linear``'s.
    A grouped convolution takes the generic jvp (``_local_tangent``)."""
    weight, bias = args["weight"], args["bias"]
    b, out = g.shape[0], g.shape[1]
    total = torch.zeros(k, b, dtype=g.dtype, device=g.device)
    if id(weight) in derived:
        stacked = derived[id(weight)][1]  # [K, out, in / groups, kh, kw]
        moved = F.conv2d(
            args["input"].detach(),
            stacked.reshape(k * out, *stacked.shape[2:]),
            None,
            args["stride"],
            args["padding"],
            args["dilation"],
        )
        total += torch.bmm(moved.reshape(b, k, -1), g.reshape(b, -1, 1)).reshape(b, k).T
    if bias is not None and id(bias) in derived:
        total += derived[id(bias)][1] @ g.reshape(b, out, -1).sum(-1).T
    return total


def _linear_signature(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> None:
    """``F.linear``'s arguments (a builtin without a Python signature)."""


def _conv2d_signature(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> None:
    """``F.conv2d``'s arguments (a builtin without a Python signature)."""


_SPECIAL = {
    F.linear: (_linear, inspect.signature(_linear_signature)),
    F.layer_norm: (_layer_norm, inspect.signature(F.layer_norm)),
    F.group_norm: (_group_norm, inspect.signature(F.group_norm)),
    F.conv2d: (_conv2d, inspect.signature(_conv2d_signature)),
}


def _local_tangent(
    func: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    derived: Mapping[int, tuple[Tensor, Tensor]],
) -> Tensor:
    """[K, *output]: the jvp of this one operation along the K tangents of the parameters it
    takes (other arguments held fixed), vectorised over the tangents."""
    original, spec = tree_flatten((args, kwargs))
    leaves = [a.detach() if isinstance(a, Tensor) else a for a in original]
    where = [i for i, a in enumerate(original) if isinstance(a, Tensor) and id(a) in derived]
    primals = tuple(leaves[i] for i in where)
    tangents = tuple(derived[id(original[i])][1] for i in where)

    def call(*values: Tensor) -> Tensor:
        filled = list(leaves)
        for i, v in zip(where, values, strict=True):
            filled[i] = v
        a, kw = tree_unflatten(filled, spec)
        return func(*a, **kw)

    def one(*directions: Tensor) -> Tensor:
        return jvp(call, primals, directions)[1]

    with torch.no_grad():
        return vmap(one)(*tangents)


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))

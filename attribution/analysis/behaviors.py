"""Behaviours: the f's whose stage effects we attribute.

A behaviour is a linear aggregation of a per-example quantity over a labelled dataset: the loss or
margin of every example (``per_example``), the mean over each group (``group_mean``), or the
difference of two group means (``group_gap``). Groups are sets of labels, or, with
``group_by: group``, sets of the group ids that a dataset returns as a third tensor
(``TensorDataset(inputs, labels, groups)``, e.g. ``2 * label + spurious attribute``).
Because the aggregation is linear, the effect of a stage on a behaviour is the same aggregation
of the per-example effects, so per-example effects are computed once (see
``attribution.analysis.readout``) and aggregated per behaviour. ``Behavior.function`` gives the
same behaviour as a differentiable function of a model's parameters (for gradients, e.g.
within-stage example scores), ``Behavior.values`` its outputs at a checkpoint (for truths).

Sign convention: effect_k(f) = f(theta_T) - f(theta_T^(-k)) (see
``attribution.record.SIGN_CONVENTION``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from attribution.record.errors import SpecError, StagetraceError
from attribution.record.evaluation import QUANTITIES, ModelAt, per_example
from attribution.record.references import Ref, load_dataset

AGGREGATES = ("per_example", "group_mean", "group_gap")
GROUP_BY = ("label", "group")
_KEYS = ("data", "quantity", "aggregate", "groups", "gap", "group_by")


@dataclass(frozen=True)
class Behavior:
    """A named behaviour: ``aggregate`` of the per-example ``quantity`` over the dataset ``data``.

    ``quantity``: ``"loss"`` (cross-entropy, nats) or ``"margin"`` (true-class logit minus the
    largest other logit, logit units). ``groups`` maps a group name to the labels it contains
    (needed by ``group_mean`` and ``group_gap``), or to group ids when ``group_by`` is
    ``"group"``; ``gap = (a, b)`` gives mean(a) - mean(b).
    """

    name: str
    data: Ref
    quantity: str = "loss"
    aggregate: str = "per_example"
    groups: Mapping[str, Sequence[int]] | None = None
    gap: tuple[str, str] | None = None
    group_by: str = "label"

    def __post_init__(self) -> None:
        _check(f"behaviors.{self.name}", **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_dict(cls, name: str, obj: Any, where: str) -> Behavior:
        """Parse ``{data, quantity, aggregate, groups, gap}``; a ``SpecError`` names the field."""
        if not isinstance(obj, Mapping):
            raise SpecError(where, f"expected a mapping, got {obj!r}", "describe it as a mapping")
        unknown = sorted(set(obj) - set(_KEYS))
        if unknown:
            raise SpecError(
                where, f"unknown keys {unknown}", f"use only {', '.join(_KEYS)} (or fix a typo)"
            )
        parsed = {
            "name": name,
            "data": Ref.from_dict(obj.get("data"), f"{where}.data"),
            "quantity": obj.get("quantity", "loss"),
            "aggregate": obj.get("aggregate", "per_example"),
            "groups": obj.get("groups"),
            "gap": obj.get("gap"),
            "group_by": obj.get("group_by", "label"),
        }
        _check(where, **parsed)
        if parsed["groups"] is not None:
            parsed["groups"] = {g: tuple(labels) for g, labels in parsed["groups"].items()}
        if parsed["gap"] is not None:
            parsed["gap"] = tuple(parsed["gap"])
        return cls(**parsed)

    @property
    def values_key(self) -> str:
        """Equal for behaviours whose per-example values are the same (data and quantity), so
        that read-outs and evaluations compute them once for all of them."""
        return json.dumps([self.data.to_dict(), self.quantity], sort_keys=True)

    def load(self) -> tuple[Tensor, Tensor, Tensor]:
        """The dataset's inputs, int64 labels and the int64 keys its groups refer to (the labels,
        or the dataset's group ids under ``group_by: group``); cached in-process: read-only."""
        where = f"behaviors.{self.name}.data"
        try:
            dataset = load_dataset(self.data)
        except (StagetraceError, ValueError, TypeError) as exc:
            problem, _, fix = str(exc).partition(". Fix: ")
            raise SpecError(
                where,
                f"cannot build the dataset {self.data.target!r} with {dict(self.data.kwargs)} "
                f"({problem})",
                fix or "correct the reference or its keyword arguments",
            ) from exc
        tensors = dataset.tensors if isinstance(dataset, TensorDataset) else ()
        labelled = len(tensors) in (2, 3) and all(
            t.ndim == 1 and t.dtype == torch.int64 for t in tensors[1:]
        )
        if not labelled:
            raise SpecError(
                where,
                f"{self.data.target!r} returned {type(dataset).__name__}, not a "
                "TensorDataset(inputs, int64 labels [N]) or (inputs, labels, int64 groups [N])",
                "point the reference at a function that returns TensorDataset(inputs, labels)",
            )
        if not len(tensors[1]):
            raise SpecError(
                where,
                f"{self.data.target!r} returned no examples",
                "point the reference at a non-empty selection of data",
            )
        if self.group_by == "group" and len(tensors) != 3:
            raise SpecError(
                f"behaviors.{self.name}.group_by",
                f"{self.data.target!r} returns no group ids (a third tensor)",
                "use group_by: label, or a dataset returning TensorDataset(inputs, labels, groups)",
            )
        keys = tensors[2] if self.group_by == "group" else tensors[1]
        return tensors[0], tensors[1], keys

    def weights(self, keys: Tensor) -> tuple[list[str], Tensor | None]:
        """Output names and the float64 aggregation matrix ``A`` [num_outputs, N], so that
        behaviour = ``A @ per_example_vector``; ``keys`` are the examples' group keys (third value
        of ``load``). ``A`` is ``None`` for ``per_example`` (identity, never materialised);
        outputs are ``"<name>[i]"``, ``"<name>[group]"`` or ``"<name>[a - b]"``."""
        if self.aggregate == "per_example":
            return [f"{self.name}[{i}]" for i in range(len(keys))], None
        assert self.groups is not None
        rows = {}
        for group, members in self.groups.items():
            member = torch.isin(keys.cpu(), torch.tensor(list(members), dtype=keys.dtype))
            if not member.any():
                raise StagetraceError(
                    f"behaviors.{self.name}.groups.{group}: no example of the dataset has a "
                    f"{self.group_by} in {list(members)}. Fix: use {self.group_by}s present in "
                    "the data, or more data"
                )
            rows[group] = member.to(torch.float64) / member.sum()
        if self.aggregate == "group_mean":
            return [f"{self.name}[{g}]" for g in rows], torch.stack(list(rows.values()))
        assert self.gap is not None
        a, b = self.gap
        return [f"{self.name}[{a} - {b}]"], (rows[a] - rows[b])[None]

    def function(self, model: ModelAt) -> Callable[[Mapping[str, Tensor]], Tensor]:
        """The behaviour's outputs as a differentiable function of ``model``'s parameters (and
        floating buffers; any subset, the rest as at the checkpoint): the per-example vector
        [N], the group means [groups] or the gap [1], in the quantity's units. The whole
        dataset runs in one forward pass; the data is loaded once, here."""
        inputs, targets, keys = self.load()
        _, weights = self.weights(keys)
        inputs, targets = inputs.to(model.device), targets.to(model.device)

        def outputs(point: Mapping[str, Tensor]) -> Tensor:
            values = per_example(model, point, inputs, targets, self.quantity)
            return values if weights is None else weights.to(values) @ values

        return outputs

    def scalar(self, model: ModelAt) -> Callable[[Mapping[str, Tensor]], Tensor]:
        """``function`` as a 0-dim tensor, for a behaviour of one output (a gap, or a group
        mean over one group); a ``SpecError`` names a behaviour of more outputs."""
        self.check_scalar()
        outputs = self.function(model)
        return lambda point: outputs(point)[0]

    def check_scalar(self) -> None:
        """Refuse (``SpecError``) a behaviour of more than one output where one number is
        needed; cheap, so callers check before training."""
        single = self.aggregate == "group_gap" or (
            self.aggregate == "group_mean" and self.groups is not None and len(self.groups) == 1
        )
        if not single:
            raise SpecError(
                f"behaviors.{self.name}",
                f"the {self.aggregate} behaviour has several outputs where one number is needed",
                "use a group_gap, or a group_mean over one group",
            )

    def values(self, model: ModelAt, batch_size: int = 512) -> dict[str, float]:
        """The behaviour's outputs at ``model``'s checkpoint, {output name: value}: the
        per-example quantity in batches (float64), then aggregated."""
        inputs, targets, keys = self.load()
        names, weights = self.weights(keys)
        values = model.values(inputs, targets, self.quantity, batch_size)
        aggregated = values if weights is None else weights @ values
        return dict(zip(names, aggregated.tolist(), strict=True))


def _check(
    where: str,
    name: str,
    data: Ref,
    quantity: str,
    aggregate: str,
    groups: Mapping[str, Sequence[int]] | None,
    gap: Sequence[str] | None,
    group_by: str = "label",
) -> None:
    """Validate a behaviour's fields; a ``SpecError`` names the field under ``where``."""
    if not isinstance(name, str) or not name:
        raise SpecError(where, f"behaviour name {name!r} is empty", "give it a non-empty name")
    if not isinstance(data, Ref):
        raise SpecError(f"{where}.data", f"expected a Ref, got {data!r}", "give a Ref")
    if quantity not in QUANTITIES:
        raise SpecError(
            f"{where}.quantity", f"unknown quantity {quantity!r}", f"use one of {QUANTITIES}"
        )
    if aggregate not in AGGREGATES:
        raise SpecError(
            f"{where}.aggregate", f"unknown aggregate {aggregate!r}", f"use one of {AGGREGATES}"
        )
    if group_by not in GROUP_BY:
        raise SpecError(
            f"{where}.group_by", f"unknown group_by {group_by!r}", f"use one of {GROUP_BY}"
        )
    if (aggregate == "per_example") != (groups is None):
        raise SpecError(
            f"{where}.groups",
            f"aggregate {aggregate!r} {'takes no' if groups is not None else 'needs'} groups",
            "give groups (name -> labels) exactly when aggregate is group_mean or group_gap",
        )
    if groups is not None:
        if not isinstance(groups, Mapping) or not groups:
            raise SpecError(
                f"{where}.groups",
                f"expected a non-empty mapping of group name -> labels, got {groups!r}",
                "write groups as {name: [label, ...], ...}",
            )
        for group, labels in groups.items():
            _check_labels(labels, f"{where}.groups.{group}")
    if (aggregate == "group_gap") != (gap is not None):
        raise SpecError(
            f"{where}.gap",
            f"aggregate {aggregate!r} {'takes no' if gap is not None else 'needs a'} gap",
            "give gap: [a, b] exactly when aggregate is group_gap",
        )
    if gap is not None and (
        isinstance(gap, str)
        or not isinstance(gap, Sequence)
        or len(gap) != 2
        or gap[0] == gap[1]
        or not set(gap) <= set(groups)
    ):
        raise SpecError(
            f"{where}.gap",
            f"expected two different group names of {sorted(groups)}, got {gap!r}",
            "write gap as [a, b] (groups declared under groups) for mean(a) - mean(b)",
        )


def _check_labels(labels: Any, where: str) -> None:
    """A group's labels: a non-empty list of non-negative integers."""
    ok = isinstance(labels, Sequence) and not isinstance(labels, str) and len(labels) > 0
    if not ok or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in labels):
        raise SpecError(
            where,
            f"expected a non-empty list of non-negative integer labels, got {labels!r}",
            "list the class labels of the group, e.g. [3, 8]",
        )

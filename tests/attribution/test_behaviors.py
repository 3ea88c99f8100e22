"""Behaviours, checked against independent truth: torch's cross-entropy, hand-computed margins
and hand-computed group means; invalid declarations name the bad field."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from attribution.analysis.behaviors import Behavior
from attribution.record.errors import SpecError, StagetraceError
from attribution.record.evaluation import ModelAt, per_example
from attribution.record.references import Ref
from experiments.models import MLP

DATA = Ref("experiments.data:mnist", {"split": "test", "stop": 20})
LOGITS = torch.tensor([[2.0, 1.0, -1.0], [0.5, 3.0, 2.5], [1.0, 1.0, 0.0]])
LABELS = torch.tensor([0, 2, 1])


def test_loss_is_per_example_cross_entropy():
    torch.manual_seed(0)
    model = MLP(hidden=[8])
    inputs, targets = torch.randn(6, 784), torch.tensor([0, 3, 9, 3, 1, 0])
    params = {n: p + 0.1 for n, p in model.named_parameters()}  # params, not the module's own
    shifted = MLP(hidden=[8])
    shifted.load_state_dict(params)
    expected = F.cross_entropy(shifted(inputs), targets, reduction="none")
    got = per_example(ModelAt.of(model, model.state_dict()), params, inputs, targets, "loss")
    torch.testing.assert_close(got, expected)


def test_loss_and_margin_by_hand_on_three_classes():
    identity = ModelAt.of(nn.Identity(), {})  # the "model" returns its inputs as logits
    loss = per_example(identity, {}, LOGITS, LABELS, "loss")
    by_hand = [
        -2.0 + math.log(math.exp(2.0) + math.exp(1.0) + math.exp(-1.0)),
        -2.5 + math.log(math.exp(0.5) + math.exp(3.0) + math.exp(2.5)),
        -1.0 + math.log(math.exp(1.0) + math.exp(1.0) + math.exp(0.0)),
    ]
    torch.testing.assert_close(loss, torch.tensor(by_hand))
    margin = per_example(identity, {}, LOGITS, LABELS, "margin")
    # 2 - max(1, -1); 2.5 - max(0.5, 3); 1 - max(1, 0) (a tie with another class)
    torch.testing.assert_close(margin, torch.tensor([1.0, -0.5, 0.0]))


def test_unknown_quantity_in_per_example():
    with pytest.raises(SpecError, match=r"quantity.*Fix"):
        per_example(ModelAt.of(nn.Identity(), {}), {}, LOGITS, LABELS, "accuracy")


def test_per_example_weights_are_the_identity_not_materialised():
    behavior = Behavior("test_loss", DATA)
    names, weights = behavior.weights(torch.tensor([4, 1, 4]))
    assert names == ["test_loss[0]", "test_loss[1]", "test_loss[2]"]
    assert weights is None


def test_group_mean_and_group_gap_against_hand_means():
    targets = torch.tensor([0, 1, 2, 1, 0, 3, 2])
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0], dtype=torch.float64)
    groups = {"low": [0, 1], "two": [2], "three": [3]}
    mean = Behavior("g", DATA, aggregate="group_mean", groups=groups)
    names, weights = mean.weights(targets)
    assert names == ["g[low]", "g[two]", "g[three]"]
    assert weights.dtype == torch.float64 and weights.shape == (3, 7)
    low, two, three = (1 + 2 + 8 + 16) / 4, (4 + 64) / 2, 32.0
    torch.testing.assert_close(weights @ values, torch.tensor([low, two, three]).double())

    gap = Behavior("g", DATA, aggregate="group_gap", groups=groups, gap=("two", "low"))
    names, weights = gap.weights(targets)
    assert names == ["g[two - low]"]
    torch.testing.assert_close(weights @ values, torch.tensor([two - low]).double())


def test_a_group_without_examples_is_refused():
    behavior = Behavior("g", DATA, aggregate="group_mean", groups={"sevens": [7]})
    with pytest.raises(StagetraceError, match=r"g\.groups\.sevens.*Fix"):
        behavior.weights(torch.tensor([0, 1, 2]))


def test_from_dict_parses_a_gap():
    obj = {
        "data": {"target": "experiments.data:mnist", "kwargs": {"split": "test", "stop": 20}},
        "quantity": "margin",
        "aggregate": "group_gap",
        "groups": {"a": [3, 8], "b": [1]},
        "gap": ["a", "b"],
    }
    behavior = Behavior.from_dict("gap", obj, "behaviors.gap")
    assert behavior == Behavior(
        "gap", DATA, "margin", "group_gap", {"a": (3, 8), "b": (1,)}, ("a", "b")
    )


GOOD = {"data": {"target": "experiments.data:mnist"}}
GROUPS = {"a": [0], "b": [1]}


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ([1, 2], "b"),
        ({**GOOD, "weights": 1}, "b"),
        ({}, "b.data"),
        ({**GOOD, "quantity": "accuracy"}, "b.quantity"),
        ({**GOOD, "aggregate": "sum"}, "b.aggregate"),
        ({**GOOD, "aggregate": "group_mean"}, "b.groups"),
        ({**GOOD, "groups": GROUPS}, "b.groups"),
        ({**GOOD, "aggregate": "group_mean", "groups": {}}, "b.groups"),
        ({**GOOD, "aggregate": "group_mean", "groups": {"a": [-1]}}, "b.groups.a"),
        ({**GOOD, "aggregate": "group_mean", "groups": {"a": ["3"]}}, "b.groups.a"),
        ({**GOOD, "aggregate": "group_mean", "groups": {"a": []}}, "b.groups.a"),
        ({**GOOD, "aggregate": "group_mean", "groups": GROUPS, "gap": ["a", "b"]}, "b.gap"),
        ({**GOOD, "aggregate": "group_gap", "groups": GROUPS}, "b.gap"),
        ({**GOOD, "aggregate": "group_gap", "groups": GROUPS, "gap": ["a", "c"]}, "b.gap"),
        ({**GOOD, "aggregate": "group_gap", "groups": GROUPS, "gap": ["a", "a"]}, "b.gap"),
        ({**GOOD, "aggregate": "group_gap", "groups": GROUPS, "gap": "ab"}, "b.gap"),
    ],
)
def test_invalid_behaviours_name_the_field(obj, field):
    with pytest.raises(SpecError, match="Fix: ") as info:
        Behavior.from_dict("gap", obj, "b")
    assert info.value.field == field


def test_direct_construction_is_validated_too():
    with pytest.raises(SpecError) as info:
        Behavior("g", DATA, quantity="accuracy")
    assert info.value.field == "behaviors.g.quantity"


def test_load_returns_inputs_and_labels():
    inputs, targets, keys = Behavior("b", DATA).load()
    assert inputs.shape == (20, 784) and targets.shape == (20,) and targets.dtype == torch.int64
    assert keys is targets  # groups refer to labels by default


@pytest.mark.parametrize(
    "ref",
    [
        Ref("no_such_module_xyz:data"),
        Ref("experiments.data:mnist", {"split": "validation"}),
        Ref("builtins:list"),
    ],
    ids=["import", "bad-kwargs", "not-a-tensor-dataset"],
)
def test_load_errors_name_the_data_field(ref):
    with pytest.raises(SpecError, match="Fix: ") as info:
        Behavior("b", ref).load()
    assert info.value.field == "behaviors.b.data"


def grouped_data() -> TensorDataset:
    """Six examples with labels and a third tensor of group ids (2 * label + attribute)."""
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    attribute = torch.tensor([0, 1, 0, 1, 1, 1])
    return TensorDataset(torch.randn(6, 3), labels, 2 * labels + attribute)


GROUPED = Ref("tests.attribution.test_behaviors:grouped_data")


def test_group_by_group_ids_aggregates_over_the_third_tensor():
    groups = {"label0_attr1": [1], "label1_attr1": [3]}
    behavior = Behavior("g", GROUPED, aggregate="group_mean", groups=groups, group_by="group")
    _, labels, keys = behavior.load()
    torch.testing.assert_close(keys, 2 * labels + torch.tensor([0, 1, 0, 1, 1, 1]))
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], dtype=torch.float64)
    names, weights = behavior.weights(keys)
    assert names == ["g[label0_attr1]", "g[label1_attr1]"]
    torch.testing.assert_close(
        weights @ values, torch.tensor([(2 + 16) / 2, (8 + 32) / 2]).double()
    )


def test_group_by_needs_group_ids_and_a_known_value():
    behavior = Behavior("g", DATA, aggregate="group_mean", groups={"a": [1]}, group_by="group")
    with pytest.raises(SpecError, match="third tensor") as info:
        behavior.load()
    assert info.value.field == "behaviors.g.group_by"
    with pytest.raises(SpecError) as info:
        Behavior("g", DATA, aggregate="group_mean", groups={"a": [1]}, group_by="colour")
    assert info.value.field == "behaviors.g.group_by"


def test_correct_is_one_where_the_largest_logit_is_the_label():
    identity = ModelAt.of(nn.Identity(), {})
    got = per_example(identity, {}, LOGITS, LABELS, "correct")
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0, 0.0]))  # row 3: a tie goes to 0


@pytest.fixture
def grouped_model():
    torch.manual_seed(3)
    module = nn.Linear(3, 2)
    return ModelAt.of(module, module.state_dict())


@pytest.mark.parametrize("quantity", ["loss", "margin"])
def test_function_is_the_aggregate_of_the_per_example_values(grouped_model, quantity):
    inputs, labels, groups = grouped_data_fixed().tensors
    by_hand = per_example(grouped_model, {}, inputs, labels, quantity).double()
    cases = {
        "per_example": (Behavior("f", FIXED, quantity), by_hand),
        "group_mean": (
            Behavior(
                "f",
                FIXED,
                quantity,
                "group_mean",
                {"a": [0, 3], "b": [1]},
                group_by="group",
            ),
            torch.stack(
                [
                    by_hand[torch.isin(groups, torch.tensor([0, 3]))].mean(),
                    by_hand[groups == 1].mean(),
                ]
            ),
        ),
        "group_gap": (
            Behavior(
                "f", FIXED, quantity, "group_gap", {"a": [0, 3], "b": [1]}, ("a", "b"), "group"
            ),
            (
                by_hand[torch.isin(groups, torch.tensor([0, 3]))].mean()
                - by_hand[groups == 1].mean()
            )[None],
        ),
    }
    for aggregate, (behavior, expected) in cases.items():
        function = behavior.function(grouped_model)
        got = function(dict(grouped_model.params))
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0, msg=aggregate)
        names, _ = behavior.weights(groups)
        values = behavior.values(grouped_model, batch_size=2)
        assert list(values) == names
        torch.testing.assert_close(
            torch.tensor(list(values.values()), dtype=torch.float64), expected, atol=1e-6, rtol=0
        )


def test_function_is_differentiable_in_the_parameters(grouped_model):
    behavior = Behavior(
        "f", FIXED, "loss", "group_gap", {"a": [0, 3], "b": [1]}, ("a", "b"), "group"
    )
    scalar = behavior.scalar(grouped_model)
    params = {n: p.clone().requires_grad_(True) for n, p in grouped_model.params.items()}
    value = scalar(params)
    assert value.ndim == 0
    (gradient,) = torch.autograd.grad(value, [params["bias"]])
    # finite difference along the bias
    step = 1e-3
    moved = {**params, "bias": params["bias"].detach() + torch.tensor([step, 0.0])}
    back = {**params, "bias": params["bias"].detach() - torch.tensor([step, 0.0])}
    slope = (scalar(moved) - scalar(back)) / (2 * step)
    assert float(gradient[0]) == pytest.approx(float(slope.detach()), abs=1e-3)


def test_scalar_refuses_a_behaviour_of_several_outputs(grouped_model):
    behavior = Behavior("f", FIXED, aggregate="group_mean", groups={"a": [0], "b": [1]})
    with pytest.raises(SpecError, match="Fix: ") as info:
        behavior.scalar(grouped_model)
    assert info.value.field == "behaviors.f"
    with pytest.raises(SpecError):
        Behavior("f", FIXED).check_scalar()
    Behavior("f", FIXED, aggregate="group_mean", groups={"a": [0]}).check_scalar()


def grouped_data_fixed() -> TensorDataset:
    """Eight examples of three features, two classes and group ids 0..3."""
    generator = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    groups = torch.tensor([0, 1, 3, 0, 1, 2, 3, 3])
    return TensorDataset(torch.randn(8, 3, generator=generator), labels, groups)


FIXED = Ref("tests.attribution.test_behaviors:grouped_data_fixed")

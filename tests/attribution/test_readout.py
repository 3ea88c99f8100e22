"""The two read-outs, checked against independent truth: per-example gradients from a loop of
``.backward()``, ordinary forward passes of a model holding the shifted parameters, and real
skip-stage retraining; plus the batching (memory) guarantee and the aggregation per behaviour."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from attribution.analysis.behaviors import Behavior
from attribution.analysis.readout import behaviour_effects, evaluated_effects, linear_effects
from attribution.record.counterfactual import as_model, skip_stage
from attribution.record.errors import StagetraceError
from attribution.record.evaluation import ModelAt, directional
from attribution.record.pipeline import run_pipeline
from attribution.record.references import Ref
from attribution.record.spec import PipelineSpec
from experiments.data import mnist
from experiments.models import MLP
from tests.attribution import normnet, tiny

DATA = Ref("experiments.data:mnist", {"split": "test", "stop": 20})
QUANTITIES = ["loss", "margin"]


@pytest.fixture(scope="module")
def data():
    inputs, targets = mnist(split="test", stop=20).tensors
    return inputs.double(), targets


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MLP(hidden=[8]).double()


def params_of(model):
    return dict(model.named_parameters())


def at(model):
    """``model`` as the read-outs take it: a function at its own state."""
    return ModelAt.of(model, {n: v.detach().clone() for n, v in model.state_dict().items()})


def random_embeddings(model, scale=0.1):
    """Two random embeddings: one over every parameter, one over a subset (others are 0)."""
    gen = torch.Generator().manual_seed(1)

    def draw(p):
        return scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)

    params = params_of(model)
    return {
        "full": {n: draw(p) for n, p in params.items()},
        "partial": {n: draw(params[n]) for n in ("fc1.weight", "head.bias")},
    }


def quantity_by_hand(logits, target, quantity):
    """One example's quantity from its logits [1, C], written out independently."""
    if quantity == "loss":
        return F.cross_entropy(logits, target[None])
    others = torch.cat([logits[0, :target], logits[0, target + 1 :]])
    return logits[0, target] - others.max()


def with_params(model, params):
    """A copy of ``model`` holding ``params`` (by load_state_dict, not functional_call)."""
    copied = copy.deepcopy(model)
    copied.load_state_dict(params)
    return copied


def quantities_by_forward(model, inputs, targets, quantity):
    with torch.no_grad():
        return torch.stack(
            [
                quantity_by_hand(model(x[None]), y, quantity)
                for x, y in zip(inputs, targets, strict=True)
            ]
        ).double()


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_linear_equals_minus_per_example_gradient_dot_embedding(model, data, quantity):
    inputs, targets = data
    embeddings = random_embeddings(model)
    expected = {stage: torch.zeros(len(targets), dtype=torch.float64) for stage in embeddings}
    for i in range(len(targets)):
        model.zero_grad()
        quantity_by_hand(model(inputs[i : i + 1]), targets[i], quantity).backward()
        for stage, embedding in embeddings.items():
            dot = sum((model.get_parameter(n).grad * se).sum() for n, se in embedding.items())
            expected[stage][i] = -dot
    got = linear_effects(at(model), embeddings, inputs, targets, quantity)
    assert set(got) == set(expected)
    for stage in embeddings:
        assert got[stage].dtype == torch.float64 and got[stage].shape == (20,)
        torch.testing.assert_close(got[stage], expected[stage], atol=1e-5, rtol=0)


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_evaluated_equals_forward_passes_of_shifted_models(model, data, quantity):
    inputs, targets = data
    embeddings = random_embeddings(model)
    params = {n: p.detach() for n, p in params_of(model).items()}
    final = quantities_by_forward(model, inputs, targets, quantity)
    got = evaluated_effects(at(model), embeddings, inputs, targets, quantity)
    for stage, embedding in embeddings.items():
        shifted = {n: p + embedding[n] if n in embedding else p for n, p in params.items()}
        expected = final - quantities_by_forward(
            with_params(model, shifted), inputs, targets, quantity
        )
        torch.testing.assert_close(got[stage], expected, atol=1e-10, rtol=0)


@pytest.fixture(scope="module")
def pipeline():
    return run_pipeline(PipelineSpec.from_dict(tiny.three_stage()), None)


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_evaluated_of_an_exact_embedding_is_the_true_effect(pipeline, quantity):
    """In float64 the offset of two float32 checkpoints is exact, so theta_T + SE_k is bit for
    bit the retrained theta_T^(-k) and only forward-pass rounding remains."""
    inputs, targets = mnist(split="test", stop=100).tensors
    inputs = inputs.double()
    final_state = pipeline.checkpoint(len(pipeline.stages) - 1, "end")
    final = as_model(pipeline, final_state).double()
    params = params_of(final)
    for stage in pipeline.names:
        counterfactual = as_model(pipeline, skip_stage(pipeline, stage).state).double()
        embedding = {n: p - params[n] for n, p in counterfactual.named_parameters()}
        got = evaluated_effects(at(final), {stage: embedding}, inputs, targets, quantity)
        truth = quantities_by_forward(final, inputs, targets, quantity) - quantities_by_forward(
            counterfactual, inputs, targets, quantity
        )
        assert truth.abs().max() > 1e-2  # the stage did something
        torch.testing.assert_close(got[stage], truth, atol=1e-6, rtol=0)


def test_linear_matches_evaluated_to_first_order(model, data):
    inputs, targets = data
    tiny_embeddings = random_embeddings(model, scale=1e-4)
    linear = linear_effects(at(model), tiny_embeddings, inputs, targets, "loss")
    evaluated = evaluated_effects(at(model), tiny_embeddings, inputs, targets, "loss")
    for stage in tiny_embeddings:
        error = (linear[stage] - evaluated[stage]).norm() / evaluated[stage].norm()
        assert error < 1e-2, stage


@pytest.mark.parametrize("readout", [linear_effects, evaluated_effects])
def test_batching_changes_nothing_and_bounds_the_batch(model, data, readout):
    inputs, targets = data
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    embeddings = random_embeddings(model)
    whole = readout(at(model), embeddings, inputs, targets, "loss", batch_size=512)
    assert max(sizes) == 20
    sizes.clear()
    batched = readout(at(model), embeddings, inputs, targets, "loss", batch_size=7)
    if readout is linear_effects:  # the contraction, checked on 4 examples' own gradients
        assert sizes == [7, 1, 1, 1, 1, 7, 6]
    else:
        assert max(sizes) == 7 and sum(sizes) % 20 == 0
    for stage in embeddings:
        torch.testing.assert_close(batched[stage], whole[stage], atol=1e-6, rtol=0)


def test_behaviour_effects_aggregate_per_example_effects():
    targets = torch.tensor([0, 1, 1, 2])
    effects = {"pretrain": torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)}
    per = behaviour_effects(Behavior("loss", DATA), effects, targets)
    assert per == {"pretrain": {"loss[0]": 1.0, "loss[1]": 2.0, "loss[2]": 4.0, "loss[3]": 8.0}}
    groups = {"zero": [0], "rest": [1, 2]}
    means = Behavior("loss", DATA, aggregate="group_mean", groups=groups)
    got = behaviour_effects(means, effects, targets)["pretrain"]
    assert got == pytest.approx({"loss[zero]": 1.0, "loss[rest]": 14.0 / 3})
    gap = Behavior("loss", DATA, aggregate="group_gap", groups=groups, gap=("rest", "zero"))
    got = behaviour_effects(gap, effects, targets)["pretrain"]["loss[rest - zero]"]
    assert got == pytest.approx(14.0 / 3 - 1.0)


@pytest.mark.parametrize("readout", [linear_effects, evaluated_effects])
def test_bad_embeddings_are_refused(model, data, readout):
    inputs, targets = data
    final = at(model)
    bad = {
        "unknown key": ({"s": {"fc9.weight": torch.zeros(3)}}, r"'s'.*'fc9\.weight'.*Fix: "),
        "wrong shape": (
            {"s": {"fc1.weight": torch.zeros(784, 8)}},
            r"'s'.*'fc1\.weight'.*\[784, 8\].*\[8, 784\].*Fix: ",
        ),
        "nan": ({"s": {"head.bias": torch.full((10,), float("nan"))}}, r"'s'.*'head\.bias'.*Fix: "),
    }
    for embeddings, message in bad.values():
        with pytest.raises(StagetraceError, match=message):
            readout(final, embeddings, inputs, targets, "loss")
    with pytest.raises(StagetraceError, match=r"batch_size.*Fix: "):
        readout(final, random_embeddings(model), inputs, targets, "loss", batch_size=0)


# All K stages in one vectorised pass (torch.func.vmap over the tangents or parameter sets):
# checked against one pass per stage, finite differences and separate forward passes.


def three_stages(point, names, scale, seed=2):
    """Three float32 embeddings over ``names`` of ``point`` (the last over a subset)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(n):
        return scale * torch.randn(point[n].shape, generator=gen)

    return {
        "pretrain": {n: draw(n) for n in names},
        "finetune": {n: draw(n) for n in names},
        "adapt": {n: draw(n) for n in names[-2:]},
    }


def float32_model():
    torch.manual_seed(0)
    return MLP(hidden=[16, 8])


def norm_model():
    """BatchNorm (moved running statistics) and dropout, float32, in eval mode."""
    torch.manual_seed(0)
    module = normnet.NormNet(hidden=6)
    module.norm1.running_mean.normal_()
    module.norm1.running_var.uniform_(0.5, 2.0)
    return module


@contextlib.contextmanager
def counting_passes(module):
    """The batch size of every forward pass of ``module`` while the block runs."""
    passes = []
    hook = module.register_forward_pre_hook(lambda m, args: passes.append(len(args[0])))
    try:
        yield passes
    finally:
        hook.remove()


STEP = 1e-4
"""The finite differences' step along an embedding (float64)."""
NORM_NAMES = ["fc1.weight", "norm1.weight", "norm1.running_mean", "norm1.running_var", "head.bias"]


def three_stage_setting(data, which: str, scale: float):
    """float32 inputs and targets, the module (the MLP or the BatchNorm net), it as a
    ``ModelAt`` and three stage embeddings of ``scale`` over its parameters (the BatchNorm net:
    ``NORM_NAMES``, running statistics included)."""
    module = float32_model() if which == "mlp" else norm_model()
    model = at(module)
    names = list(model.params) if which == "mlp" else NORM_NAMES
    return data[0].float(), data[1], module, model, three_stages(model.point, names, scale)


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("which", ["mlp", "batchnorm"])
def test_vectorised_linear_equals_one_jvp_per_stage_and_finite_differences(data, quantity, which):
    inputs, targets, module, model, embeddings = three_stage_setting(data, which, 1e-2)
    with counting_passes(module) as passes:
        got = linear_effects(model, embeddings, inputs, targets, quantity, 7, contract=False)
    assert passes == [7, 7, 6]  # one vectorised pass per batch for the three stages
    contracted = linear_effects(model, embeddings, inputs, targets, quantity, batch_size=7)
    for stage, embedding in embeddings.items():
        alone = -directional(model, embedding, inputs, targets, quantity, batch_size=7)
        torch.testing.assert_close(got[stage], alone, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(contracted[stage], alone, atol=1e-6, rtol=1e-6)
        # minus the central finite difference, in float64 on modules holding the moved state
        state = {n: v.double() for n, v in module.state_dict().items()}
        ahead, behind = copy.deepcopy(module).double(), copy.deepcopy(module).double()
        ahead.load_state_dict(
            {n: v + STEP * embedding[n] if n in embedding else v for n, v in state.items()}
        )
        behind.load_state_dict(
            {n: v - STEP * embedding[n] if n in embedding else v for n, v in state.items()}
        )
        ahead.eval(), behind.eval()
        x = inputs.double()
        slope = (
            quantities_by_forward(ahead, x, targets, quantity)
            - quantities_by_forward(behind, x, targets, quantity)
        ) / (2 * STEP)
        torch.testing.assert_close(got[stage], -slope, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("which", ["mlp", "batchnorm"])
def test_evaluated_runs_theta_t_once_and_equals_separate_forward_passes(data, quantity, which):
    inputs, targets, module, model, embeddings = three_stage_setting(data, which, 0.1)
    with counting_passes(module) as passes:
        got = evaluated_effects(model, embeddings, inputs, targets, quantity, batch_size=7)
    assert passes == [7] * 4 + [7] * 4 + [6] * 4  # theta_T once and each stage, per batch
    state = module.state_dict()
    final = quantities_by_forward(module.eval(), inputs, targets, quantity)
    for stage, embedding in embeddings.items():
        alone = evaluated_effects(model, {stage: embedding}, inputs, targets, quantity)[stage]
        torch.testing.assert_close(got[stage], alone, atol=1e-6, rtol=1e-6)
        shifted = copy.deepcopy(module)
        shifted.load_state_dict(
            {n: v + embedding[n] if n in embedding else v for n, v in state.items()}
        )
        expected = final - quantities_by_forward(shifted.eval(), inputs, targets, quantity)
        torch.testing.assert_close(got[stage], expected, atol=1e-5, rtol=1e-5)


class Cube(torch.autograd.Function):
    """x**3 with its own derivatives and no vmap rule: ``torch.func.vmap`` refuses it."""

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * tangent

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class CubedLogits(torch.nn.Module):
    """A linear layer whose logits go through ``Cube``."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(784, 10)

    def forward(self, x):
        return Cube.apply(self.fc(x.reshape(len(x), -1)))


def test_models_vmap_cannot_run_fall_back_to_one_pass_per_stage(data):
    readout = linear_effects
    inputs, targets = data[0].float(), data[1]
    torch.manual_seed(0)
    module = CubedLogits()
    model = at(module)
    embeddings = three_stages(model.point, ["fc.weight", "fc.bias"], 1e-3)
    with pytest.raises(RuntimeError, match="vmap"):  # the premise: vmap refuses it
        torch.func.vmap(lambda w: model.logits(inputs, {"fc.weight": w}))(
            torch.stack([model.params["fc.weight"]] * 2)
        )
    with counting_passes(module) as passes:
        got = readout(model, embeddings, inputs, targets, "loss", batch_size=7, contract=False)
    assert passes == [7] * (1 + 3) + [7] * 3 + [6] * 3  # 1: vmap's try
    for stage, embedding in embeddings.items():
        alone = readout(model, {stage: embedding}, inputs, targets, "loss", 7, contract=False)
        torch.testing.assert_close(got[stage], alone[stage], atol=0, rtol=0)

"""Estimators, read-outs and stage TracIn on the compute of ``attribution.record.compute``.

Independent truths: the checkpoints themselves (E0 is their difference, the truth's embedding the
retrained state minus the final one, bit for bit), a module cast to bfloat16 or float64 and run
by hand (what a read-out's evaluation under that dtype must be), the float32 results (the
bfloat16 tolerances, measured below) and the stored files (cache separation). The CUDA tests
run only where torch sees a GPU; there the default compute is CUDA, so the CPU bit-for-bit tests
compare the default only where it is the CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attribution.analysis.readout import evaluated_effects, linear_effects
from attribution.record.compute import Compute, using
from attribution.record.counterfactual import skip_stage
from attribution.record.evaluation import ModelAt, final_model
from attribution.record.pipeline import run_pipeline
from attribution.record.references import load_dataset
from attribution.record.spec import PipelineSpec
from attribution.record.trajectory import Trajectory, load_state
from estimators import build, stored_embeddings
from estimators.base import embeddings_folder
from estimators.curvature import lanczos
from estimators.e2 import adjoint_effects
from estimators.stages import TrainingStart
from estimators.tracin import tracin_effects
from estimators.within_stage import example_scores
from tests.attribution.tiny import make_tiny_config

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

ESTIMATORS = {
    "e0": {},
    "e1": {},
    "e2": {},
    "e3": {"rank": 3, "sample": 64},
    "e4:2": {},
    "subset": {},
    "truth": {},
}
"""Every registered estimator, E3 kept small."""
READ_ONLY = ("e0", "e1", "e2", "e3")
"""Estimators that do not train (``Estimator.trains`` False): the dtype must not change them."""

BF16_PEARSON = 0.95
"""Lowest per-stage Pearson of a bfloat16 read-out against the float32 one on the tiny run
(measured: 0.971 for the evaluated read-out of the last stage, whose small offset mostly
vanishes when theta + SE is rounded to bfloat16; 0.9996 or more elsewhere)."""
BF16_RTOL = 0.25
"""Largest per-example difference of a bfloat16 read-out from the float32 one, relative to the
largest float32 effect of the stage (measured: 0.14 at worst, same stage; 0.09 elsewhere)."""
BF16_MEAN_RTOL = 0.02
"""Largest mean-effect error of a bfloat16 read-out, relative to the largest float32 effect
(measured: 0.002)."""
FLOAT64_RTOL = 1e-4
"""float64 read-outs against float32 ones, relative (measured: 8e-6)."""
CUDA_RTOL = 1e-5
"""Float32 on CUDA against the CPU, relative to the largest magnitude of the state concerned
(``CUDA_REPLAY_RTOL``): an embedding's error is that of the retrained or carried weights, so it
is measured against the final weights' magnitude, not the (smaller) offset's."""
CUDA_E3_RTOL = 1e-3
"""E3 on CUDA against the CPU: Lanczos on float32 curvature products amplifies round-off in the
smaller kept eigenpairs."""
CUDA_READOUT_RTOL = 1e-4
"""Read-outs on CUDA against the CPU, relative to the largest effect: the evaluated read-out
differences float32 values, and float32 round-off alone moves it by up to 8e-6 of the largest
effect on the CPU (against float64, measured), so two float32 devices may differ by twice that
and more."""


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compute_estimators") / "run"
    run_pipeline(PipelineSpec.from_dict(make_tiny_config()), root)
    return root


@pytest.fixture
def traj(recorded: Path) -> Trajectory:
    return Trajectory.open(recorded, cache=False)


@pytest.fixture
def run(recorded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(recorded, tmp_path / "run"))


def examples(traj: Trajectory, n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_dataset(traj.stages[0].data).tensors[:2]
    return x[:n], y[:n]


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of max |a - b| / max |b|."""
    assert a.keys() == b.keys()
    return max(
        float((a[n].double() - b[n].double()).abs().max()) / (float(b[n].abs().max()) or 1.0)
        for n in b
    )


def embed(run: Path, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """Fresh embeddings (no cache) of the recorded run under the current compute."""
    return build(name, ESTIMATORS[name]).embed(Trajectory.open(run, cache=False)).offsets


def assert_equal_offsets(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for stage in a:
        assert a[stage].keys() == b[stage].keys(), stage
        for name, value in a[stage].items():
            assert value.dtype == b[stage][name].dtype, (stage, name)
            assert torch.equal(value, b[stage][name]), (stage, name)


# --- CPU: float32 is the default, bit for bit ----------------------------------------------


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_an_explicit_cpu_float32_compute_is_the_default_bit_for_bit(recorded, name):
    with using(Compute("cpu", "float32")):
        pinned = embed(recorded, name)
    for offset in pinned.values():
        assert {(t.device.type, t.dtype) for t in offset.values()} == {("cpu", torch.float64)}
    if not CUDA:  # the default is the CPU here
        assert_equal_offsets(embed(recorded, name), pinned)


def test_e0_and_the_truth_are_the_checkpoints_differences_exactly(recorded, traj):
    with using(Compute("cpu")):
        e0, truth = embed(recorded, "e0"), embed(recorded, "truth")
    last = len(traj.stages) - 1
    final = traj.checkpoint(last, "end")
    for k, stage in enumerate(traj.names):
        start, end = traj.checkpoint(k, "start"), traj.checkpoint(k, "end")
        for name, value in e0[stage].items():
            assert torch.equal(value, start[name].double() - end[name].double()), (stage, name)
        skipped = skip_stage(traj, k).state
        for name, value in truth[stage].items():
            assert torch.equal(value, skipped[name].double() - final[name].double())


@pytest.mark.parametrize("name", READ_ONLY)
def test_estimators_that_do_not_train_ignore_the_dtype(recorded, name):
    with using(Compute("cpu", "float32")):
        exact = embed(recorded, name)
    with using(Compute("cpu", "bfloat16")):
        assert_equal_offsets(embed(recorded, name), exact)


# --- bfloat16 and float64 read-outs --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_an_evaluation_in_a_dtype_is_the_model_cast_to_it(traj, dtype):
    x, y = examples(traj)
    with using(Compute("cpu", str(dtype).removeprefix("torch."))):
        loss = final_model(traj).values(x, y, "loss")  # one batch: the same kernels as below
    last = len(traj.stages) - 1
    module = traj.build_model(last)
    load_state(module, traj.checkpoint(last, "end"), "final")
    module.eval().to(dtype)
    with torch.no_grad():
        logits = module(x.to(dtype)).float() if dtype == torch.bfloat16 else module(x.to(dtype))
    expected = F.cross_entropy(logits, y, reduction="none").double()
    assert loss.dtype == torch.float64 and loss.device.type == "cpu"
    assert torch.equal(loss, expected)


def test_placing_on_the_cpu_in_float32_copies_nothing(traj):
    model = final_model(traj)
    with using(Compute("cpu", "float32")):
        placed = model.placed()
    assert all(placed.params[n] is t for n, t in model.params.items())
    assert all(placed.buffers[n] is t for n, t in model.buffers.items())


def test_token_ids_keep_their_dtype_under_bfloat16():
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Embedding(11, 4), torch.nn.Flatten(), torch.nn.Linear(12, 3)
    )
    x, y = torch.randint(0, 11, (20, 3)), torch.randint(0, 3, (20,))
    model = ModelAt.of(module, module.state_dict())
    with using(Compute("cpu", "bfloat16")):
        loss = model.values(x, y, "loss")
    with torch.no_grad():
        expected = F.cross_entropy(module.to(torch.bfloat16)(x).float(), y, reduction="none")
    assert torch.equal(loss, expected.double())


@pytest.mark.parametrize("readout", [linear_effects, evaluated_effects])
@pytest.mark.parametrize("quantity", ["loss", "margin"])
def test_bfloat16_read_outs_are_close_to_float32_and_float64_ones_closer(
    recorded, traj, readout, quantity
):
    embeddings = embed(recorded, "truth")
    model, (x, y) = final_model(traj), examples(traj)
    with using(Compute("cpu", "float32")):
        exact = readout(model, embeddings, x, y, quantity)
    with using(Compute("cpu", "bfloat16")):
        low = readout(model, embeddings, x, y, quantity)
    with using(Compute("cpu", "float64")):
        high = readout(model, embeddings, x, y, quantity)
    for stage, effects in exact.items():
        scale = float(effects.abs().max())
        assert low[stage].dtype == torch.float64 and low[stage].device.type == "cpu"
        assert not torch.equal(low[stage], effects), stage  # it did run in bfloat16
        assert np.corrcoef(low[stage], effects)[0, 1] >= BF16_PEARSON, stage
        assert float((low[stage] - effects).abs().max()) <= BF16_RTOL * scale, stage
        assert abs(float(low[stage].mean() - effects.mean())) <= BF16_MEAN_RTOL * scale, stage
        assert float((high[stage] - effects).abs().max()) <= FLOAT64_RTOL * scale, stage


def test_stage_tracin_follows_the_compute(traj):
    x, y = examples(traj)
    with using(Compute("cpu", "float32")):
        exact = tracin_effects(traj, x, y, "margin")
    if not CUDA:
        default = tracin_effects(traj, x, y, "margin")
        assert all(torch.equal(default[s], exact[s]) for s in exact)
    with using(Compute("cpu", "bfloat16")):
        low = tracin_effects(traj, x, y, "margin")
    for stage, effects in exact.items():
        scale = float(effects.abs().max())
        assert not torch.equal(low[stage], effects)
        assert float((low[stage] - effects).abs().max()) <= BF16_RTOL * scale, stage


# --- stored embeddings ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["e4:2", "subset", "truth"])
def test_embeddings_from_bfloat16_training_are_stored_apart_and_never_reused_as_exact(run, name):
    estimator = build(name, ESTIMATORS[name])
    with using(Compute("cpu", "bfloat16")):
        folder = embeddings_folder(estimator)
        approx, reused = stored_embeddings(estimator, Trajectory.open(run))
        assert not reused and folder.endswith("-bfloat16")
        assert stored_embeddings(estimator, Trajectory.open(run))[1]  # reused in bfloat16
    meta = json.loads((run / folder / "meta.json").read_text())
    assert meta["training_dtype"] == "bfloat16"
    with using(Compute("cpu", "float32")):
        exact, reused = stored_embeddings(estimator, Trajectory.open(run))
        plain = embeddings_folder(estimator)
    assert not reused and plain == folder.removesuffix("-bfloat16")
    assert json.loads((run / plain / "meta.json").read_text())["training_dtype"] == "recorded"
    with using(Compute("cpu", "float32")):
        assert_equal_offsets(exact.offsets, embed(run, name))
    first = next(iter(exact.offsets))  # the last stage's is exact in any precision
    assert any(
        not torch.equal(v, exact.offsets[first][n]) for n, v in approx.offsets[first].items()
    )


@pytest.mark.parametrize("name", ["e1", "e2"])
def test_embeddings_of_estimators_that_do_not_train_are_shared_across_dtypes(run, name):
    estimator = build(name, ESTIMATORS[name])
    assert not estimator.trains
    with using(Compute("cpu", "float32")):
        exact, reused = stored_embeddings(estimator, Trajectory.open(run))
        assert not reused
    with using(Compute("cpu", "bfloat16")):
        shared, reused = stored_embeddings(estimator, Trajectory.open(run))
        assert reused and not embeddings_folder(estimator).endswith("-bfloat16")
    assert_equal_offsets(shared.offsets, exact.offsets)
    meta = json.loads((run / embeddings_folder(estimator) / "meta.json").read_text())
    assert "training_dtype" not in meta


# --- CUDA (where torch sees a GPU) ---------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_on_cuda_is_the_cpu_result_within_round_off_on_the_cpu(recorded, name):
    with using(Compute("cpu")):
        on_cpu = embed(recorded, name)
    with using(Compute("cuda")):
        on_gpu = embed(recorded, name)
    tolerance = CUDA_E3_RTOL if name == "e3" else CUDA_RTOL
    traj = Trajectory.open(recorded, cache=False)
    final = traj.checkpoint(len(traj.stages) - 1, "end")
    for stage, offsets in on_cpu.items():
        assert on_gpu[stage].keys() == offsets.keys()
        for n, offset in offsets.items():
            got = on_gpu[stage][n]
            assert (got.device.type, got.dtype) == ("cpu", torch.float64)
            scale = max(float(final[n].abs().max()), float(offset.abs().max()))
            assert float((got - offset).abs().max()) <= tolerance * scale, (stage, n)


@needs_cuda
@pytest.mark.parametrize("readout", [linear_effects, evaluated_effects])
def test_read_outs_and_evaluations_on_cuda_match_the_cpu(recorded, traj, readout):
    embeddings, model, (x, y) = embed(recorded, "truth"), final_model(traj), examples(traj)
    with using(Compute("cpu")):
        on_cpu = readout(model, embeddings, x, y, "loss")
        values_cpu = model.values(x, y, "margin")
    with using(Compute("cuda")):
        on_gpu = readout(model, embeddings, x, y, "loss")
        values_gpu = model.values(x, y, "margin")
    with using(Compute("cuda", "bfloat16")):
        low = readout(model, embeddings, x, y, "loss")
    assert values_gpu.device.type == "cpu"
    assert relative({"v": values_gpu}, {"v": values_cpu}) <= CUDA_RTOL
    for stage, effects in on_cpu.items():
        scale = float(effects.abs().max())
        assert on_gpu[stage].device.type == low[stage].device.type == "cpu"
        assert float((on_gpu[stage] - effects).abs().max()) <= CUDA_READOUT_RTOL * scale
        assert np.corrcoef(low[stage], effects)[0, 1] >= BF16_PEARSON, stage
        assert float((low[stage] - effects).abs().max()) <= BF16_RTOL * scale, stage


@needs_cuda
def test_stage_tracin_and_lanczos_on_cuda_match_the_cpu(traj):
    x, y = examples(traj)
    with using(Compute("cpu")):
        on_cpu = tracin_effects(traj, x, y, "margin")
    with using(Compute("cuda")):
        on_gpu = tracin_effects(traj, x, y, "margin")
    assert relative(on_gpu, on_cpu) <= CUDA_READOUT_RTOL
    matrix = torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    matrix = matrix + matrix.T
    values, vectors = lanczos(lambda v: matrix @ v, 40, 4, iterations=40)  # exact at full size
    gpu = matrix.cuda()
    values_gpu, vectors_gpu = lanczos(lambda v: gpu @ v, 40, 4, iterations=40, device="cuda")
    assert values_gpu.device.type == vectors_gpu.device.type == "cuda"
    torch.testing.assert_close(values_gpu.cpu(), torch.linalg.eigvalsh(matrix).flip(0)[:4])
    torch.testing.assert_close(values_gpu.cpu(), values, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vectors_gpu.abs().cpu(), vectors.abs(), rtol=1e-6, atol=1e-6)


def behaviour_of(traj: Trajectory):
    """A behaviour as callers write it: the final module and its data on the CPU."""
    module, (x, y) = traj.build_model(len(traj.stages) - 1), examples(traj, 50)

    def f(params):
        return F.cross_entropy(torch.func.functional_call(module, params, (x,)), y)

    return f


@needs_cuda
def test_e2_adjoint_and_example_scores_on_cuda_match_the_cpu(traj):
    f = behaviour_of(traj)
    with using(Compute("cpu")):
        effects_cpu = adjoint_effects(traj, f)
        scores_cpu = example_scores(traj, 0, f).scores
    with using(Compute("cuda")):
        effects_gpu = adjoint_effects(traj, f)
        scores_gpu = example_scores(traj, 0, f).scores
    scale = max(abs(v) for v in effects_cpu.values())
    for stage, effect in effects_cpu.items():
        assert abs(effects_gpu[stage] - effect) <= CUDA_READOUT_RTOL * scale, stage
    assert (scores_gpu.device.type, scores_gpu.dtype) == ("cpu", torch.float64)
    assert relative({"s": scores_gpu}, {"s": scores_cpu}) <= CUDA_READOUT_RTOL


@needs_cuda
def test_a_training_start_on_cuda_is_the_cpu_one_moved(traj):
    with using(Compute("cpu")):
        on_cpu = TrainingStart.of(traj, 1)
    with using(Compute("cuda")):
        on_gpu = TrainingStart.of(traj, 1)
    tensors = dict(on_gpu.model.named_buffers()) | on_gpu.params
    assert {t.device.type for t in tensors.values()} == {"cuda"}
    for name, value in on_cpu.params.items():  # the entry actions drew from the CPU generator
        assert torch.equal(on_gpu.params[name].cpu(), value), name
    for name, slots in on_cpu.state.items():
        for slot, value in slots.items():
            got = on_gpu.state[name][slot]
            assert got.device.type == ("cpu" if slot == "step" else "cuda"), (name, slot)
            assert torch.equal(got.cpu(), value), (name, slot)
    _, inputs, targets, _ = next(on_gpu.batches())
    assert inputs.device.type == targets.device.type == "cuda"

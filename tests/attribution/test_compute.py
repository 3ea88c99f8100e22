"""Devices and precision (``attribution.record.compute``): where replays and the truth run, in
what dtype, and what a bad request does.

Independent truths: the retraining declared without a stage (run in float32 on the CPU) for the
truth under every compute; the recorded checkpoints for replays; bfloat16's own grid (a value
that came out of bfloat16 training survives a round trip through bfloat16) for whether a
retraining really ran in bfloat16; the bytes of a run directory for "nothing written". The CUDA
tests run only where torch sees a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attribution.analysis.cli import _write
from attribution.record.compute import (
    AUTO_VARIABLE,
    Compute,
    current,
    deterministic,
    on_device,
    to_cpu,
    using,
)
from attribution.record.counterfactual import skip_stage
from attribution.record.errors import SpecError
from attribution.record.pipeline import CUDA_REPLAY_RTOL, replay, run_pipeline
from attribution.record.spec import PipelineSpec
from attribution.record.store import DiskStore
from attribution.record.trajectory import Trajectory
from tests.attribution.test_pipeline import without
from tests.attribution.tiny import make_tiny_config
from tests.helpers import check_message, cli, manifest, tree_bytes

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
without_cuda = pytest.mark.skipif(CUDA, reason="checks the refusal where there is no GPU")
REPO = Path(__file__).resolve().parents[2]

BF16_TRUTH_RTOL = 0.1
"""How far a bfloat16 retraining of the tiny run may land from the float32 truth, relative to
the largest magnitude of each tensor (measured: 0.05 at worst, fc1.weight without pretrain:
pure bfloat16 training loses updates smaller than half a bfloat16 step of the weight)."""
CUDA_TRUTH_RTOL = 1e-5
"""How far a float32 retraining on CUDA may land from the one on the CPU, relative to the
largest magnitude of each tensor (the replay's ``CUDA_REPLAY_RTOL``)."""


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of max |a - b| / max |b| (a float tensor of zeros counts its diff)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for name, value in b.items():
        scale = float(value.double().abs().max()) or 1.0
        worst = max(worst, float((a[name].double() - value.double()).abs().max()) / scale)
    return worst


def declared_without(stage: str) -> dict[str, torch.Tensor]:
    """The final state of the tiny pipeline declared without ``stage``, recorded on the CPU."""
    with using(Compute("cpu")):
        traj = run_pipeline(PipelineSpec.from_dict(without(make_tiny_config(), stage)), None)
    return traj.checkpoint(len(traj.stages) - 1, "end")


# --- the compute itself ---------------------------------------------------------------------


@without_cuda
def test_auto_resolves_to_the_cpu_without_a_gpu():
    assert current() == Compute("auto", "float32")
    assert Compute().torch_device == torch.device("cpu")
    assert Compute().to_json() == {
        "device": "auto",
        "resolved_device": "cpu",
        "dtype": "float32",
        "approximate": False,
    }


def test_the_suite_keeps_auto_on_the_cpu_and_a_bad_pin_is_refused(monkeypatch):
    assert os.environ[AUTO_VARIABLE] == "cpu"  # tests/conftest.py: bitwise checks are the CPU's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    assert Compute().torch_device == torch.device("cpu")
    monkeypatch.delenv(AUTO_VARIABLE)
    assert Compute().torch_device == torch.device("cuda")
    monkeypatch.setenv(AUTO_VARIABLE, "gpu")
    with pytest.raises(SpecError, match=f"{AUTO_VARIABLE}: 'gpu'.*Fix: set it to cpu"):
        Compute().check()


def test_using_sets_the_current_compute_and_restores_it():
    before = current()
    with using(Compute("cpu", "bfloat16")) as inner:
        assert current() is inner and current().torch_dtype == torch.bfloat16
        with using(Compute("cpu", "float64")):
            assert current().torch_dtype == torch.float64
        assert current() is inner
    assert current() == before


def test_training_precision_and_cache_folders():
    assert Compute(dtype="float32").training_dtype is None
    assert Compute(dtype="float64").training_dtype is None  # float64 is for read-outs only
    assert Compute(dtype="bfloat16").training_dtype == torch.bfloat16
    assert [Compute(dtype=d).cache_suffix for d in ("float32", "float64", "bfloat16")] == [
        "",
        "",
        "-bfloat16",
    ]


def test_recording_stays_on_the_cpu_unless_a_device_is_named():
    assert Compute("auto", "bfloat16").recording() == Compute("cpu", "float32")
    assert Compute("cuda:1", "bfloat16").recording() == Compute("cuda:1", "float32")


def test_each_torchrun_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Compute("cuda", "bfloat16").per_process() == Compute("cuda:1", "bfloat16")
    assert Compute("cpu").per_process() == Compute("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert Compute("cuda").per_process() == Compute("cuda")


@pytest.mark.parametrize(
    ("compute", "names"),
    [
        (Compute("cpu", "float16"), ["dtype", "float16", "bfloat16"]),
        (Compute("tpu"), ["device", "tpu", "cuda:N"]),
        (Compute("cpu:1"), ["device", "cpu:1"]),
        (Compute("cuda:99"), ["device", "cuda:99"]),
    ],
)
def test_bad_computes_are_refused_with_the_fix(compute, names):
    with pytest.raises(SpecError) as caught, using(compute):
        raise AssertionError("the body must not run")
    check_message(caught.value, *names)


@without_cuda
def test_cuda_asked_without_a_gpu_is_refused():
    for device in ("cuda", "cuda:0"):
        with pytest.raises(SpecError) as caught:
            Compute(device).check()
        check_message(caught.value, "device", device, "no CUDA GPU", "auto")


def test_tensors_are_moved_and_cast_for_work_and_back_for_storage():
    tensors = {"w": torch.randn(3, dtype=torch.float64), "n": torch.arange(3)}
    moved = on_device(tensors, Compute("cpu", "bfloat16"))
    assert moved["w"].dtype == torch.bfloat16 and moved["n"].dtype == torch.int64
    assert on_device(tensors, Compute("cpu", "bfloat16"), cast=False)["w"] is tensors["w"]
    stored = to_cpu(moved, {"w": torch.float64})
    assert stored["w"].dtype == torch.float64 and stored["w"].device.type == "cpu"
    assert torch.equal(stored["w"], tensors["w"].to(torch.bfloat16).double())
    assert to_cpu(moved)["w"].dtype == torch.float32  # lower precisions are stored as float32
    assert to_cpu(tensors)["w"] is tensors["w"]  # nothing copied where nothing changes


def test_deterministic_changes_nothing_on_the_cpu():
    flag = torch.are_deterministic_algorithms_enabled()
    with deterministic(Compute("cpu")):
        assert torch.are_deterministic_algorithms_enabled() == flag


# --- the truth and replays on the CPU -------------------------------------------------------


def test_the_truth_under_an_explicit_cpu_float32_compute_is_the_default_bit_for_bit(run_copy):
    expected = declared_without("finetune")
    with using(Compute("cpu", "float32")):
        pinned = skip_stage(Trajectory.open(run_copy, cache=False), "finetune").state
    for name, value in expected.items():
        assert torch.equal(pinned[name], value), name
    if not CUDA:  # the default is the CPU here: the same computation
        default = skip_stage(Trajectory.open(run_copy, cache=False), "finetune").state
        assert all(torch.equal(default[n], pinned[n]) for n in pinned)


def test_a_bfloat16_truth_is_approximate_stored_apart_and_handed_back_in_float32(run_copy):
    with using(Compute("cpu", "bfloat16")):
        approx = skip_stage(Trajectory.open(run_copy), "pretrain")
    assert not approx.reused
    exact = declared_without("pretrain")
    assert {n: (t.dtype, t.device.type) for n, t in approx.state.items()} == {
        n: (torch.float32, "cpu") for n in exact
    }
    for name, value in approx.state.items():  # every value came out of bfloat16 arithmetic
        assert torch.equal(value.to(torch.bfloat16).float(), value), name
    assert 0.0 < relative(approx.state, exact) <= BF16_TRUTH_RTOL
    folder = run_copy / "counterfactuals" / "skip-pretrain-bfloat16"
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["training_dtype"], meta["device"]) == ("bfloat16", "cpu")
    # the exact truth is never served from the approximate one
    with using(Compute("cpu")):
        truth = skip_stage(Trajectory.open(run_copy), "pretrain")
    assert not truth.reused and all(torch.equal(truth.state[n], exact[n]) for n in exact)
    assert (
        json.loads((run_copy / "counterfactuals/skip-pretrain/meta.json").read_text())[
            "training_dtype"
        ]
        == "recorded"
    )


def test_replay_verify_on_the_cpu_stays_bit_for_bit(run_copy, capsys):
    # a difference far below the CUDA tolerance still fails on the CPU
    traj = Trajectory.open(run_copy)
    end = traj.checkpoint("pretrain", "end")
    end["head.bias"] = end["head.bias"].clone()
    end["head.bias"][0] = torch.nextafter(end["head.bias"][0], torch.tensor(1.0))
    assert 0 < relative(end, traj.checkpoint("pretrain", "end")) < CUDA_REPLAY_RTOL
    path = "stages/00-pretrain/end.safetensors"
    sha = DiskStore(run_copy).put_tensors(
        path, end, {"schema": "stagetrace.trajectory", "stage": "pretrain", "role": "end"}
    )
    edited = manifest(run_copy)
    assert edited["stages"][0]["files"]["end"]["path"] == path
    edited["stages"][0]["files"]["end"]["sha256"] = sha
    (run_copy / "manifest.json").write_text(json.dumps(edited, indent=2))

    with using(Compute("cpu")):
        result = replay(Trajectory.open(run_copy))
    assert (result.tolerance, result.device, result.passed) == (0.0, "cpu", False)
    code, out, err = cli(capsys, "--device", "cpu", "replay", run_copy, "--verify")
    assert (code, err) == (1, "") and "within" not in out


def test_replay_verify_refuses_a_bfloat16_replay_and_a_plain_one_names_it(recorded_run, capsys):
    code, out, err = cli(capsys, "--dtype", "bfloat16", "replay", recorded_run, "--verify")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "--dtype" in err and "Fix:" in err
    with using(Compute("cpu", "bfloat16")):
        result = replay(Trajectory.open(recorded_run))
    assert result.worst > 0 and "bfloat16" in result.environment[-1]


@without_cuda
def test_cuda_asked_through_the_cli_exits_2_with_one_line_and_writes_nothing(run_copy, capsys):
    before = tree_bytes(run_copy)
    for command in (("counterfactual", run_copy, "--skip", "pretrain"), ("replay", run_copy)):
        code, out, err = cli(capsys, "--device", "cuda", *command)
        assert (code, out) == (2, "")
        assert len(err.strip().splitlines()) == 1
        assert err.startswith("stagetrace: error: --device: 'cuda'") and "Fix:" in err
    assert tree_bytes(run_copy) == before


@without_cuda
def test_cuda_asked_in_an_experiment_config_exits_2_and_leaves_no_run(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "experiment=stages_mnist",
            "preset=smoke",
            f"hydra.run.dir={run_dir}",
            "device=cuda",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stagetrace: error: device: 'cuda'"), lines
    assert not run_dir.exists()


def test_recorded_environment_names_the_device_it_trained_on(tmp_path):
    one_stage = without(without(make_tiny_config(), "pretrain"), "finetune")
    run_pipeline(PipelineSpec.from_dict(one_stage), tmp_path / "run")  # auto records on the CPU
    assert manifest(tmp_path / "run")["environment"]["device"] == "cpu"


# --- CUDA (where torch sees a GPU) ----------------------------------------------------------


@needs_cuda
def test_the_truth_on_cuda_is_the_cpu_truth_within_tolerance_and_handed_back_on_the_cpu(run_copy):
    with using(Compute("cuda")):
        on_gpu = skip_stage(Trajectory.open(run_copy, cache=False), "pretrain").state
    with using(Compute("cpu")):
        on_cpu = skip_stage(Trajectory.open(run_copy, cache=False), "pretrain").state
    assert {t.device.type for t in on_gpu.values()} == {"cpu"}
    assert {n: t.dtype for n, t in on_gpu.items()} == {n: t.dtype for n, t in on_cpu.items()}
    assert relative(on_gpu, on_cpu) <= CUDA_TRUTH_RTOL


@needs_cuda
def test_replay_verify_on_cuda_passes_within_its_stated_tolerance(recorded_run, capsys, tmp_path):
    code, out, err = cli(capsys, "--device", "cuda", "replay", recorded_run, "--verify")
    assert (code, err) == (0, ""), out
    assert f"within {CUDA_REPLAY_RTOL:g}" in out and "recorded on cpu, replayed on cuda" in out
    # recorded on the GPU (named explicitly), replayed there with deterministic kernels
    with using(Compute("cuda")):
        traj = run_pipeline(PipelineSpec.from_dict(make_tiny_config()), tmp_path / "gpu")
        result = replay(Trajectory.open(traj.root))
    assert manifest(tmp_path / "gpu")["environment"]["device"] == "cuda"
    assert result.passed and result.tolerance == CUDA_REPLAY_RTOL, result.to_json()
    assert torch.are_deterministic_algorithms_enabled() is False  # restored afterwards


def test_result_files_name_the_compute_and_an_approximate_truth(tmp_path):
    with using(Compute("cpu", "bfloat16")):
        written = json.loads(_write(tmp_path / "validation.json", {"rows": []}).read_text())
    assert written["compute"] == {
        "device": "cpu",
        "resolved_device": "cpu",
        "dtype": "bfloat16",
        "approximate": True,
    }

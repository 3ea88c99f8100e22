"""Per-example results beyond a size go to a memory-mapped file, with the same numbers as in RAM;
the read-outs stream over the examples in batches and equal the all-at-once computation.

Independent truth: the in-memory computation over all examples in one batch, and the kernel's
own map of the process's memory (``/proc/self/maps``) for where a result lives.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attribution.analysis.audit import audit
from attribution.analysis.behaviors import Behavior
from attribution.analysis.readout import evaluated_effects, linear_effects
from attribution.record.errors import StagetraceError
from attribution.record.evaluation import MEMMAP_VARIABLE, ModelAt, Results
from attribution.record.references import Ref
from attribution.record.trajectory import Trajectory
from experiments.data import mnist
from experiments.models import MLP

N = 30
READOUTS = [linear_effects, evaluated_effects]


def file_backed(tensor: torch.Tensor) -> bool:
    """Whether the memory holding ``tensor`` maps a file (inode != 0), per the kernel."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, _, _, _, inode, *_ = line.split()
        low, high = (int(v, 16) for v in span.split("-"))
        if low <= address < high:
            return inode != "0"
    raise AssertionError(f"address {address:#x} is in no mapping")


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    module = MLP(hidden=[8])
    model = ModelAt.of(module, {n: v.clone() for n, v in module.state_dict().items()})
    gen = torch.Generator().manual_seed(1)
    embeddings = {
        stage: {n: 0.05 * torch.randn(p.shape, generator=gen) for n, p in model.params.items()}
        for stage in ("pretrain", "finetune", "adapt")
    }
    inputs, targets = mnist(split="test", stop=N).tensors
    return model, embeddings, inputs, targets


@pytest.mark.parametrize("readout", READOUTS)
def test_streamed_memory_mapped_results_equal_all_at_once_in_memory(setting, readout):
    model, embeddings, inputs, targets = setting
    in_ram = readout(model, embeddings, inputs, targets, "margin", batch_size=N)
    on_disk = readout(model, embeddings, inputs, targets, "margin", batch_size=7, memmap_above=0)
    for stage in embeddings:
        assert not file_backed(in_ram[stage]) and file_backed(on_disk[stage])
        assert on_disk[stage].dtype == torch.float64 and on_disk[stage].shape == (N,)
        torch.testing.assert_close(on_disk[stage], in_ram[stage], atol=1e-6, rtol=0)


@pytest.mark.parametrize("readout", READOUTS)
def test_the_storage_changes_no_bit(setting, readout):
    model, embeddings, inputs, targets = setting
    on_disk = readout(model, embeddings, inputs, targets, "loss", batch_size=7, memmap_above=0)
    in_ram = readout(model, embeddings, inputs, targets, "loss", batch_size=7, memmap_above=10**9)
    for stage in embeddings:
        assert file_backed(on_disk[stage]) and not file_backed(in_ram[stage])
        assert torch.equal(on_disk[stage], in_ram[stage])


def test_the_threshold_counts_every_stage_and_example(setting, monkeypatch):
    model, embeddings, inputs, targets = setting
    size = len(embeddings) * N
    below = linear_effects(model, embeddings, inputs, targets, "loss", memmap_above=size)
    above = linear_effects(model, embeddings, inputs, targets, "loss", memmap_above=size - 1)
    assert not file_backed(below["adapt"]) and file_backed(above["adapt"])
    monkeypatch.setenv(MEMMAP_VARIABLE, str(size - 1))  # the environment sets the default
    assert file_backed(evaluated_effects(model, embeddings, inputs, targets, "loss")["adapt"])
    monkeypatch.setenv(MEMMAP_VARIABLE, str(N - 1))
    assert file_backed(model.values(inputs, targets, "loss"))
    monkeypatch.setenv(MEMMAP_VARIABLE, str(N))
    assert not file_backed(model.values(inputs, targets, "loss"))


def resident_kib(tensor: torch.Tensor) -> int:
    """The resident size (kB) of the mapping holding ``tensor``, per ``/proc/self/smaps``."""
    address, inside = tensor.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            low, high = (int(v, 16) for v in first.split("-"))
            inside = low <= address < high
        elif inside and first == "Rss:":
            return int(line.split()[1])
    raise AssertionError(f"address {address:#x} is in no mapping")


def test_results_go_to_a_file_beyond_the_threshold_and_stay_off_memory_until_read():
    small = Results((3, 4), above=12)
    small.write(0, torch.ones(3, 4))
    assert not file_backed(small.tensor())
    rows, n = 3, 200_000  # 4.6 MiB of results, written in batches
    results = Results((rows, n), above=rows * n - 1)
    expected = torch.arange(rows * n, dtype=torch.float64).reshape(rows, n)
    for i in range(0, n, 4096):
        results.write(i, expected[:, i : i + 4096].float().double())
    mapped = results.tensor()
    assert file_backed(mapped) and mapped.dtype == torch.float64
    assert resident_kib(mapped) == 0  # written through the page cache, mapped unread
    assert torch.equal(mapped, expected)
    assert resident_kib(mapped) > 0
    assert Results((0,), above=0).tensor().shape == (0,)


@pytest.mark.parametrize("value", ["ten", "-1", "1e7", ""])
def test_a_bad_threshold_is_refused_before_any_work(setting, monkeypatch, value):
    model, embeddings, inputs, targets = setting
    monkeypatch.setenv(MEMMAP_VARIABLE, value)
    passes = []
    hook = model.module.register_forward_pre_hook(lambda m, args: passes.append(1))
    try:
        with pytest.raises(StagetraceError, match=rf"{MEMMAP_VARIABLE}=.*Fix: "):
            evaluated_effects(model, embeddings, inputs, targets, "loss")
    finally:
        hook.remove()
    assert passes == []


def test_an_audit_with_memory_mapped_read_outs_is_the_same(recorded_run, monkeypatch):
    traj = Trajectory.open(recorded_run)
    test = Ref("experiments.data:mnist", {"split": "test", "stop": 40})
    behaviors = {
        "loss": Behavior("loss", test),
        "halves": Behavior(
            "halves",
            test,
            "margin",
            "group_gap",
            {"low": [0, 1, 2, 3, 4], "high": [5, 6]},
            ("low", "high"),
        ),
    }
    for readout in ("evaluated", "linear"):
        in_ram = audit(traj, "e1", behaviors, readout, batch_size=16)
        monkeypatch.setenv(MEMMAP_VARIABLE, "0")
        on_disk = audit(traj, "e1", behaviors, readout, batch_size=16)
        monkeypatch.delenv(MEMMAP_VARIABLE)
        for name in behaviors:
            assert on_disk.behaviors[name] == in_ram.behaviors[name]

"""Same content, same bytes, same fingerprint: identical recordings made in two processes get
identical files, checksums and fingerprints, so stored results are matched across them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from attribution.record.store import MemoryStore, canonical
from attribution.record.trajectory import Trajectory

ROOT = Path(__file__).resolve().parents[2]
RECORD = """
import sys
from attribution.record.pipeline import run_pipeline
from attribution.record.spec import PipelineSpec
from tests.attribution.tiny import make_tiny_config
run_pipeline(PipelineSpec.from_dict(make_tiny_config()), sys.argv[1])
"""


def test_two_processes_record_identical_bytes(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        subprocess.run([sys.executable, "-c", RECORD, str(run)], check=True, cwd=ROOT)
    files = [
        {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()}
        for run in runs
    ]
    assert files[0].keys() == files[1].keys()
    differing = [name for name in files[0] if files[0][name] != files[1][name]]
    assert set(differing) <= {"manifest.json"}  # whose creation time may differ
    manifests = [json.loads(f["manifest.json"]) for f in files]
    for manifest in manifests:
        del manifest["created"]
    assert manifests[0] == manifests[1]
    a, b = (Trajectory.open(run) for run in runs)
    assert a.fingerprint() == b.fingerprint()


def test_canonical_bytes_load_unchanged_and_sort_the_metadata():
    store = MemoryStore()
    tensors = {"w": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    store.put_tensors("x", tensors, {"z": "1", "a": "2", "m": "3"})
    data = store.get("x")
    assert canonical(data) == data
    size = int.from_bytes(data[:8], "little")
    assert size % 8 == 0
    assert data[8 : 8 + size].index(b'"a"') < data[8 : 8 + size].index(b'"z"')
    loaded = store.get_tensors("x")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())

"""Manifest and spec round trips, and what the manifest promises to its readers."""

import json

from attribution import SIGN_CONVENTION
from attribution.pipeline import run_pipeline
from attribution.spec import PipelineSpec
from attribution.trajectory import SCHEMA_VERSION, StageRecord, Trajectory
from tests.attribution import tiny


def test_pipeline_spec_round_trips_through_its_dict():
    spec = PipelineSpec.from_dict(tiny.three_stage("carry"))
    assert PipelineSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_manifest_round_trip_keeps_every_stage_record(tmp_path):
    traj = run_pipeline(PipelineSpec.from_dict(tiny.three_stage("carry")), tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["sign_convention"] == SIGN_CONVENTION
    assert manifest["complete"] is True
    for record, entry in zip(traj.stages, manifest["stages"], strict=True):
        assert StageRecord.from_dict(entry, "manifest.json", "stage") == record
        assert set(entry["files"]) == {"start", "end", "optimizer_start", "optimizer_end", "steps"}
    reopened = Trajectory.open(tmp_path / "run")
    assert reopened.stages == traj.stages
    assert reopened.fingerprint() == traj.fingerprint()
    adapt = reopened.stages[2]
    assert adapt.entry[0].kind == "add_lora" and adapt.trainable == (
        "fc1.lora_A",
        "fc1.lora_B",
        "head.weight",
        "head.bias",
    )


def test_a_hydra_run_directory_opens_its_trajectory(tmp_path):
    run_pipeline(PipelineSpec.from_dict(tiny.three_stage()), tmp_path / "trajectory")
    assert Trajectory.open(tmp_path).names == ["pretrain", "finetune", "adapt"]

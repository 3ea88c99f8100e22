"""One owner of estimator names and settings: ``estimators.registry``."""

from __future__ import annotations

import dataclasses

import pytest

from attribution.record.errors import SpecError, StagetraceError
from attribution.record.pipeline import run_pipeline
from attribution.record.references import Ref
from attribution.record.spec import PipelineSpec
from estimators import E3, E4, ESTIMATORS, build, build_all, check_evidence
from tests.attribution import tiny


def test_names_and_shorthand_build_typed_settings():
    assert build("e4:2").arguments.stride == 2
    assert build("e4", {"stride": 3}).stride == 3
    assert build("e4:2", {"stride": 2}).settings() == {"stride": 2}
    e3 = build("e3", {"rank": 5, "at": "end"})
    assert isinstance(e3, E3) and e3.arguments.rank == 5 and e3.arguments.at == "end"
    assert e3.settings() == {**E3().settings(), "rank": 5, "at": "end"}
    assert set(ESTIMATORS) == {"e0", "e1", "e2", "e3", "e4", "subset", "truth"}


def test_labels_name_the_settings_that_differ_from_the_defaults():
    assert build("e1").label == "e1"
    assert build("e4:2").label == "e4:2"
    assert build("e4").label == "e4:4"
    assert build("e3").label == "e3"
    assert build("e3", {"rank": 5, "sample": 128}).label == "e3(rank=5, sample=128)"
    assert E3(rank=20).label == "e3"


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("e9", None, "unknown estimator 'e9'"),
        ("e4:0", None, "e4.stride: expected a positive integer, got 0"),
        ("e4:x", None, "e4.stride: expected a positive integer, got 'x'"),
        ("e1:2", None, "e1 takes nothing after a colon"),
        ("e4:2", {"stride": 3}, "disagree"),
        ("e1", {"rank": 5}, "e1 has no setting 'rank'.*takes no settings"),
        ("e3", {"rnak": 5}, "e3 has no setting 'rnak'.*rank, sample"),
        ("e3", {"rank": -1}, "e3.rank: expected an integer >= 0"),
    ],
)
def test_bad_names_and_settings_are_refused_with_the_fix(name, settings, message):
    with pytest.raises(SpecError, match=message) as caught:
        build(name, settings)
    assert "Fix:" in str(caught.value)


def test_settings_for_an_estimator_that_is_not_run_are_refused():
    built = build_all(["e1", "e4:2"], {"e4": {"stride": 2}})
    assert [e.label for e in built.values()] == ["e1", "e4:2"]
    with pytest.raises(SpecError, match="settings given for e3, which is not run"):
        build_all(["e1"], {"e3": {"rank": 5}})


def test_missing_evidence_is_named_with_what_would_work():
    traj = run_pipeline(PipelineSpec.from_dict(tiny.three_stage()), None)
    check_evidence([build("e2"), E4(stride=2)], traj)
    traj.stages[1] = dataclasses.replace(traj.stages[1], data=Ref("nowhere:data", {}))
    with pytest.raises(StagetraceError, match=r"training data.*Fix: use e0 or e1"):
        check_evidence([build("e2")], traj)

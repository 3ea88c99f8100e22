"""Schedules against torch's own learning-rate schedulers and closed forms."""

import math

import pytest
import torch

from attribution.record.errors import SpecError
from attribution.record.schedules import ScheduleSpec


def torch_rates(make_scheduler, steps: int, lr: float = 1.0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler(opt)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def test_step_schedule_matches_torch_steplr():
    ours = ScheduleSpec.from_dict({"name": "step", "step_size": 4, "gamma": 0.5}, "s")
    theirs = torch_rates(lambda o: torch.optim.lr_scheduler.StepLR(o, 4, 0.5), 13)
    assert ours.multipliers(13) == pytest.approx(theirs, rel=1e-12)


def test_cosine_schedule_matches_torch_cosine_annealing():
    ours = ScheduleSpec.from_dict({"name": "cosine", "min_factor": 0.1}, "s")
    theirs = torch_rates(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=0.1), 20
    )
    assert ours.multipliers(20) == pytest.approx(theirs, rel=1e-9)


def test_warmup_schedules_closed_form():
    lin = ScheduleSpec.from_dict({"name": "warmup_linear", "warmup": 4, "end_factor": 0.0}, "s")
    assert lin.multipliers(8) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25])
    cos = ScheduleSpec.from_dict({"name": "warmup_cosine", "warmup": 2}, "s").multipliers(6)
    assert cos[:2] == pytest.approx([0.5, 1.0])
    assert cos[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])


@pytest.mark.parametrize(
    "bad", [{"name": "exotic"}, {"name": "step"}, {"name": "cosine", "warmup": 3}]
)
def test_bad_schedules_name_the_field(bad):
    with pytest.raises(SpecError, match=r"stage\.schedule"):
        ScheduleSpec.from_dict(bad, "stage.schedule")


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"name": "warmup_linear", "warmup": -1}, "warmup"),
        ({"name": "warmup_linear", "warmup": 2.5}, "warmup"),
        ({"name": "step", "step_size": 0}, "step_size"),
        ({"name": "step", "step_size": 3, "gamma": 0}, "gamma"),
        ({"name": "cosine", "min_factor": 1.5}, "min_factor"),
        ({"name": "warmup_linear", "end_factor": "low"}, "end_factor"),
    ],
)
def test_out_of_range_schedule_values_name_the_field_and_the_fix(bad, field):
    with pytest.raises(SpecError, match=rf"stage\.schedule\.{field}: expected .*Fix: give"):
        ScheduleSpec.from_dict(bad, "stage.schedule")


def test_a_warmup_longer_than_the_stage_is_refused():
    spec = ScheduleSpec.from_dict({"name": "warmup_cosine", "warmup": 1000}, "s")
    with pytest.raises(SpecError, match=r"stage\.schedule\.warmup: a warm-up of 1000 steps .* 20"):
        spec.multipliers(20, "stage.schedule")
    assert spec.multipliers(1000)[-1] == 1.0


def test_a_declared_pipeline_with_a_too_long_warmup_is_refused_before_training(tmp_path):
    from attribution.record.pipeline import run_pipeline
    from attribution.record.spec import PipelineSpec
    from tests.attribution.tiny import make_tiny_config

    config = make_tiny_config(finetune={"schedule": {"name": "warmup_linear", "warmup": 1000}})
    with pytest.raises(SpecError, match=r"pipeline\.stages\.finetune\.schedule\.warmup"):
        run_pipeline(PipelineSpec.from_dict(config), tmp_path / "run")
    assert not (tmp_path / "run").exists()

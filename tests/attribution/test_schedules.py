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

"""A real transformers Trainer run read back: its checkpoints, its optimizer state (equal to the
Trainer's own), and its logged learning rates against a linear schedule computed here; damaged or
mixed-up folders are refused; training_args.bin (a pickle) is never opened."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from attribution.record.errors import StagetraceError, TrajectoryError
from attribution.record.loaders import load_state_dict, load_trainer_run
from tests.attribution.test_loaders import CreatesAFile
from tests.helpers import installed

transformers = installed("transformers")

LR, STEPS, BATCH = 0.1, 6, 4
# the linear schedule without warmup, from its definition: step t (0-based) uses lr (T - t) / T
LINEAR = [LR * (STEPS - t) / STEPS for t in range(STEPS)]


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": ((self.lin(x).squeeze(-1) - y) ** 2).mean()}


class Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(16, 3, generator=g), torch.randn(16, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A 6-step Trainer run saving every 2 steps; (output_dir, final optimizer state, final
    weights). Each training_args.bin is replaced by a pickle that creates a file if opened."""
    out = tmp_path_factory.mktemp("trainer") / "out"
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        save_steps=2,
        logging_steps=2,
        learning_rate=LR,
        lr_scheduler_type="linear",
        per_device_train_batch_size=BATCH,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=Regression(), args=args, train_dataset=Rows())
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert type(optimizer) is torch.optim.AdamW
    for checkpoint in out.glob("checkpoint-*"):
        trap = CreatesAFile(out.parent / f"opened-{checkpoint.name}")
        torch.save(trap, checkpoint / "training_args.bin")
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    return out, optimizer.state_dict(), weights


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    """A private copy of the run that a test may damage."""
    return Path(shutil.copytree(trained[0], tmp_path / "out"))


def edit_states(folder: Path, change) -> None:
    """Apply ``change`` to the trainer_state.json of every checkpoint."""
    for path in folder.glob("checkpoint-*/trainer_state.json"):
        state = json.loads(path.read_text())
        change(state)
        path.write_text(json.dumps(state))


def test_the_run_reads_back(trained):
    out, _, weights = trained
    run = load_trainer_run(out)
    assert run.checkpoints == {s: out / f"checkpoint-{s}" for s in (2, 4, 6)}
    assert (run.global_step, run.max_steps, run.logging_steps) == (6, 6, 2)
    assert run.train_batch_size == BATCH
    assert sorted(run.learning_rates) == [2, 4, 6]
    assert json.loads(json.dumps(run.to_json()))["checkpoints"]["4"] == str(out / "checkpoint-4")
    single = load_trainer_run(out / "checkpoint-4")
    assert (single.checkpoints, single.global_step) == ({4: out / "checkpoint-4"}, 4)
    assert torch.equal(load_state_dict(out / "checkpoint-6")["lin.weight"], weights["lin.weight"])


def test_the_optimizer_state_is_the_trainers(trained):
    out, optimizer, _ = trained
    run = load_trainer_run(out)
    saved = run.optimizer_state(6)
    assert saved["state"].keys() == optimizer["state"].keys() and saved["state"]
    for index, slots in optimizer["state"].items():
        assert saved["state"][index].keys() == slots.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for slot, value in slots.items():
            assert torch.equal(saved["state"][index][slot], value), (index, slot)
    assert [g["lr"] for g in saved["param_groups"]] == [g["lr"] for g in optimizer["param_groups"]]
    assert run.scheduler_state(6)["last_epoch"] == STEPS
    with pytest.raises(StagetraceError, match=r"no checkpoint at step 5\. Fix: use one of 2, 4, 6"):
        run.optimizer_state(5)


def test_training_args_bin_is_never_opened(trained):
    out, _, _ = trained
    run = load_trainer_run(out)
    run.optimizer_state(2), run.scheduler_state(4), run.check_learning_rates(LINEAR, "sft")
    assert not list(out.parent.glob("opened-*"))
    torch.load(out / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert list(out.parent.glob("opened-*"))  # the trap was live
    (out.parent / "opened-checkpoint-2").unlink()


def test_the_logged_rates_are_the_rates_the_steps_used(trained):
    check = load_trainer_run(trained[0]).check_learning_rates(LINEAR, "sft")
    assert check.offset == 0 and check.steps == (2, 4, 6)
    assert check.max_rel_error < 1e-12
    assert "the rate step s used" in check.note


def test_a_log_one_step_ahead_is_recognised(run_dir):
    # older transformers logged after the scheduler stepped: the next step's rate
    ahead = [*LINEAR[1:], 0.0]

    def log_next_rates(state):
        for entry in state["log_history"]:
            entry["learning_rate"] = ahead[entry["step"] - 1]

    edit_states(run_dir, log_next_rates)
    check = load_trainer_run(run_dir).check_learning_rates(LINEAR, "sft")
    assert check.offset == 1 and check.steps == (2, 4)  # step 6's next step is past the stage
    assert "one step ahead" in check.note


def test_wrong_rates_are_refused_at_the_first_step_that_differs(trained):
    run = load_trainer_run(trained[0])
    wrong = [*LINEAR[:3], *(lr * 1.01 for lr in LINEAR[3:])]
    with pytest.raises(StagetraceError) as info:
        run.check_learning_rates(wrong, "sft")
    message = str(info.value)
    assert "\n" not in message and "Fix: declare the schedule the Trainer ran" in message
    assert "at step 4, but the spec's rate for that step is 0.0505" in message
    assert "learning rate 0.05 at step 4" in message
    with pytest.raises(StagetraceError, match="the Trainer logged step 6 but the spec declares 4"):
        run.check_learning_rates(LINEAR[:4], "sft")


def test_a_checkpoint_missing_from_the_state_is_refused(run_dir):
    shutil.copytree(run_dir / "checkpoint-4", run_dir / "checkpoint-5")
    with pytest.raises(TrajectoryError, match="says global_step 4, but its folder is checkpoint-5"):
        load_trainer_run(run_dir)


def test_checkpoints_of_another_run_are_refused(run_dir):
    path = run_dir / "checkpoint-2" / "trainer_state.json"
    state = json.loads(path.read_text())
    state["log_history"][0]["loss"] += 1.0
    path.write_text(json.dumps(state))
    with pytest.raises(TrajectoryError, match="disagrees with the latest checkpoint's"):
        load_trainer_run(run_dir)


def test_damaged_states_are_refused(run_dir):
    edit_states(run_dir, lambda state: state.update(max_steps=5))
    with pytest.raises(TrajectoryError, match="global_step 6 exceeds max_steps 5"):
        load_trainer_run(run_dir)
    (run_dir / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": ')
    with pytest.raises(TrajectoryError, match="not valid JSON"):
        load_trainer_run(run_dir)
    (run_dir / "checkpoint-6" / "trainer_state.json").unlink()
    with pytest.raises(TrajectoryError, match=r"trainer_state\.json: file is missing"):
        load_trainer_run(run_dir)
    (run_dir / "checkpoint-4" / "optimizer.pt").unlink()
    with pytest.raises(TrajectoryError, match=r"optimizer\.pt: file is missing"):
        load_trainer_run(run_dir / "checkpoint-4").optimizer_state(4)

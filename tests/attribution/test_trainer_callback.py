"""A real ``transformers.Trainer`` recorded by ``StagetraceCallback``, and its files audited.

A 16-unit MLP is pretrained by the Recorder (SGD in a plain loop), then fine-tuned by a real
Trainer (AdamW with weight decay on the weights only, cosine schedule, gradients clipped, head
re-initialised) while the callback records the fine-tune into the same run. The Trainer writes
its own ``checkpoint-3`` and ``checkpoint-6`` folders (``trainer_state.json``, ``optimizer.pt``,
``model.safetensors``).

Truth the recording is checked against: the Trainer's own files (its checkpoint weights and
optimizer state, its logged learning rates) and the replay of the stage (the Recorder's check,
``stagetrace replay --verify``). Then an audit spec over the files as people have them (the
pretraining as a sharded HF folder, the fine-tune as the Trainer's folder, optimizers and
schedules declared) must give the recorded run's E0 and E1 effects exactly.

Sign convention: effect_k(f) = f(theta_T) - f(theta_T^(-k)).
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from attribution.record.checkpoint_spec import build, load_spec
from attribution.record.errors import StagetraceError
from attribution.record.loaders import load_trainer_run
from attribution.record.pipeline import flatten_state, max_abs_diff
from attribution.record.recorder import Recorder
from attribution.record.references import Ref, load_dataset
from attribution.record.trainer_callback import IndexedDataset, TrainerModel
from attribution.record.trajectory import snapshot
from tests.helpers import cli, installed

transformers = installed("transformers")

MODEL = Ref("experiments.models:MLP", {"hidden": [16]})
PRETRAIN_DATA = Ref("experiments.data:mnist", {"stop": 300})
FINETUNE_DATA = Ref("experiments.data:mnist", {"start": 300, "stop": 600})
TEST_SET = {"target": "experiments.data:mnist", "kwargs": {"split": "test", "stop": 100}}
BEHAVIORS = {
    "test_loss": {"data": TEST_SET, "quantity": "loss"},
    "test_margin": {"data": TEST_SET, "quantity": "margin"},
}
SGD = {"type": "sgd", "momentum": 0.9, "weight_decay": 1e-3}
STEPS, SAVE_STEPS, LR, DECAY, MAX_NORM, SEED = 6, 3, 1e-3, 0.01, 0.5, 7


def _arguments(out: Path, **extra) -> object:
    settings = {
        "output_dir": str(out),
        "max_steps": STEPS,
        "per_device_train_batch_size": 32,
        "learning_rate": LR,
        "lr_scheduler_type": "cosine",
        "weight_decay": DECAY,
        "optim": "adamw_torch",
        "max_grad_norm": MAX_NORM,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": SAVE_STEPS,
        "report_to": [],
        "use_cpu": True,
        "seed": SEED,
        "disable_tqdm": True,
        **extra,
    }
    return transformers.TrainingArguments(**settings)


def _pretrained(root: Path | None) -> tuple[torch.nn.Module, Recorder]:
    """The model after a pretraining the Recorder recorded (SGD, constant rate, own loop)."""
    torch.manual_seed(0)
    model = MODEL.call()
    recorder = Recorder(root, model, MODEL)
    inputs, targets = load_dataset(PRETRAIN_DATA).tensors
    with recorder.stage(
        "pretrain", kind="pretrain", data=PRETRAIN_DATA, seed=1, batch_size=32
    ) as stage:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=0.05, **{k: SGD[k] for k in SGD if k != "type"}
        )
        stage.attach(optimizer)
        order = torch.Generator().manual_seed(1)
        for _ in range(6):
            batch = torch.randint(len(targets), (32,), generator=order)
            stage.log_batch(batch)
            optimizer.zero_grad()
            F.cross_entropy(model(inputs[batch]), targets[batch]).backward()
            optimizer.step()
    return model, recorder


def _finetune(model, recorder, out: Path, **options):
    """Fine-tune with a real Trainer while a StagetraceCallback records it; returns the callback."""
    from attribution.record.trainer_callback import StagetraceCallback

    extra = options.pop("args", {})
    options.setdefault("data", FINETUNE_DATA)
    dataset = options.pop("dataset", None) or IndexedDataset(load_dataset(FINETUNE_DATA))
    callback = StagetraceCallback(
        recorder,
        "finetune",
        kind="finetune",
        entry=[{"kind": "reinit", "modules": ["head"]}],
        **options,
    )
    trainer = transformers.Trainer(
        model=TrainerModel(model),
        args=_arguments(out, **extra),
        train_dataset=dataset,
        callbacks=[callback],
    )
    trainer.train()
    return callback


def _sharded(state: dict[str, torch.Tensor], folder: Path) -> None:
    """An HF folder with the weights over two safetensors shards and their index."""
    folder.mkdir(parents=True)
    names = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"architectures": ["MLP"], "hidden": [16]}))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, object]:
    """The recorded run, the folder of exported files with the audit spec, the callback."""
    root = tmp_path_factory.mktemp("trainer_callback")
    out = root / "files"
    model, recorder = _pretrained(root / "recorded")
    callback = _finetune(model, recorder, out / "trainer")
    traj = recorder.finish()
    save_file(traj.checkpoint("pretrain", "start"), out / "init.safetensors")
    _sharded(traj.checkpoint("pretrain", "end"), out / "pretrained")
    (out / "behaviors.yaml").write_text(yaml.safe_dump(BEHAVIORS, sort_keys=False))
    (reinit,) = traj.stages[1].entry
    finetune_block = {
        # as the Trainer ran it: AdamW (betas and eps are TrainingArguments' defaults), decay
        # on the weights only (its first group), cosine schedule without warm-up, clipping
        "optimizer": {
            "type": "adamw",
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "weight_decay": 0.0,
            "groups": [{"params": ["*.weight"], "weight_decay": DECAY}],
        },
        "lr": LR,
        "schedule": {"name": "cosine"},
        "steps": STEPS,
        "clip_grad_norm": MAX_NORM,
        "entry": [{"kind": "reinit", "modules": ["head"], "seed": reinit.seed}],
    }
    spec = {
        "model": MODEL.to_dict(),
        "seed": 0,
        "stages": {
            "pretrain": {
                "kind": "pretrain",
                "checkpoint": "pretrained/",
                "start": "init.safetensors",
                "pipeline": {"optimizer": SGD, "lr": 0.05, "schedule": "constant", "steps": 6},
            },
            "finetune": {
                "kind": "finetune",
                "trainer": "trainer/",
                "checkpoint": f"trainer/checkpoint-{STEPS}",
                "pipeline": finetune_block,
            },
        },
        "behaviors": "behaviors.yaml",
    }
    (out / "audit.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return traj, out, callback


def test_the_callback_records_what_the_trainer_did_and_it_replays_exactly(run, capsys) -> None:
    traj, out, callback = run
    record = traj.stages[1]
    assert record.verified is True and callback.verification.passed
    assert callback.verification.steps == 3 and callback.verification.difference == 0
    assert record.clip_grad_norm == MAX_NORM and record.batch_size == 32 and record.seed == SEED
    # the Trainer's groups by the inner model's names: decay on the weights, none on biases
    assert [(g.params, g.hyper["weight_decay"]) for g in record.groups] == [
        (("fc1.weight", "head.weight"), DECAY),
        (("fc1.bias", "head.bias"), 0.0),
    ]
    steps = traj.steps("finetune")
    assert steps.num_steps == STEPS and steps.has_batch_order
    assert all(len(steps.batch(t)) == 32 for t in range(STEPS))
    # against the Trainer's own files: its last checkpoint holds the recorded end (by the
    # model's own names), its optimizer.pt the recorded optimizer state, its log the rates
    checkpoint = out / "trainer" / f"checkpoint-{STEPS}"
    saved, end = load_file(checkpoint / "model.safetensors"), traj.checkpoint("finetune", "end")
    assert set(saved) == set(end) and all(torch.equal(saved[k], end[k]) for k in end)
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    recorded = traj.optimizer_state("finetune", "end")
    order = [n for g in record.groups for n in g.params]
    for i, name in enumerate(order):
        for slot in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[i][slot], recorded[name][slot])
    logged = load_trainer_run(out / "trainer").learning_rates
    assert logged == {s: steps.lr[s - 1, 0].item() for s in range(1, STEPS + 1)}
    assert steps.lr[:, 0].tolist() == steps.lr[:, 1].tolist()
    code, stdout, err = cli(capsys, "replay", traj.root, "--verify")
    assert code == 0, err + stdout


def _audit(capsys, target: Path, out: Path, estimator: str, *extra) -> tuple[dict, str]:
    code, stdout, err = cli(capsys, "audit", target, "--estimator", estimator, "--out", out, *extra)
    assert code == 0, err
    return json.loads(out.read_text()), stdout


@pytest.mark.parametrize("estimator", ["e0", "e1"])
def test_auditing_the_trainer_folder_equals_auditing_the_recorded_run(
    run, capsys, tmp_path, estimator
) -> None:
    """E0 reads only the boundary checkpoints, the same tensors in both: equal exactly. E1
    also reads the fine-tune's learning rates, hyperparameters and final Adam state: the
    declared cosine rates equal the ones the Trainer's LambdaLR set bit for bit (the same
    ``0.5 * (1 + cos(pi * t / T))`` times the base rate, asserted below), its optimizer.pt
    holds the recorded state, so E1 is equal exactly too."""
    traj, out, _ = run
    got, stdout = _audit(capsys, out / "audit.yaml", tmp_path / "spec.json", estimator)
    want, _ = _audit(
        capsys, traj.root, tmp_path / "run.json", estimator, "--behaviors", out / "behaviors.yaml"
    )
    assert got["estimator"]["name"] == want["estimator"]["name"] == estimator
    for name, behavior in want["behaviors"].items():
        assert got["behaviors"][name]["effects"] == behavior["effects"]
        assert got["behaviors"][name]["mean_effect"] == behavior["mean_effect"]
    built = build(load_spec(out / "audit.yaml"))
    assert torch.equal(built.trajectory.steps("finetune").lr, traj.steps("finetune").lr)
    a = flatten_state(built.trajectory.optimizer_state("finetune", "end"))
    b = flatten_state(traj.optimizer_state("finetune", "end"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the Trainer's folder gives no batch order, and the audit says so
    evidence = got["evidence"]["finetune"]
    assert evidence["batch_order"] == "unknown" and evidence["replay"] is False
    assert any("batch order" in m for m in evidence["missing"])
    assert evidence["learning_rates"]["check"]["max_rel_error"] == 0
    assert "batch order: unknown" in stdout and "missing for a better answer" in stdout
    assert f"logged by the Trainer ({STEPS} values)" in stdout


def test_settings_the_replay_cannot_reproduce_are_refused_or_recorded_without_batch_order(
    tmp_path,
) -> None:
    model, recorder = _pretrained(None)
    before = snapshot(model)
    with pytest.raises(StagetraceError, match=r"gradient_accumulation_steps=2.*batch_order=False"):
        _finetune(model, recorder, tmp_path / "a", args={"gradient_accumulation_steps": 2})
    with pytest.raises(StagetraceError, match=r"fused=True.*adamw_torch"):
        _finetune(model, recorder, tmp_path / "b", args={"optim": "adamw_torch_fused"})
    # refused before the stage opened: nothing recorded, the head not re-initialised
    assert [s.name for s in recorder.trajectory.stages] == ["pretrain"]
    assert max_abs_diff(snapshot(model), before) == 0
    # a dataset whose batches carry no indices is stopped at the first step
    plain = [{"inputs": x, "labels": y} for x, y in load_dataset(FINETUNE_DATA)]
    with pytest.raises(StagetraceError, match=r"step 0: the batch carried no example indices"):
        _finetune(model, recorder, tmp_path / "d", dataset=plain)
    assert [s.name for s in recorder.trajectory.stages] == ["pretrain"]
    # recorded without batch order: the rate of every optimizer step, no replay
    _finetune(
        model, recorder, tmp_path / "c", batch_order=False, args={"gradient_accumulation_steps": 2}
    )
    traj = recorder.finish()
    record, steps = traj.stages[1], traj.steps("finetune")
    assert record.verified is None and not steps.has_batch_order
    logged = load_trainer_run(tmp_path / "c").learning_rates
    assert logged == {s: steps.lr[s - 1, 0].item() for s in range(1, STEPS + 1)}


def test_a_stage_that_does_not_replay_is_recorded_unverified_with_a_warning(tmp_path) -> None:
    """The callback names data other than what the Trainer trains on: the replay of the
    first steps differs, so the stage is recorded ``verified: false`` and refused by replays."""
    model, recorder = _pretrained(None)
    with pytest.warns(UserWarning, match="does not replay exactly"):
        callback = _finetune(model, recorder, tmp_path / "a", data=PRETRAIN_DATA)
    traj = recorder.finish()
    assert traj.stages[1].verified is False and callback.verification.step == 0
    with pytest.raises(StagetraceError, match="finetune"):
        traj.check_replayable("finetune")


def test_the_record_layer_needs_transformers_only_for_the_callback(monkeypatch) -> None:
    """No import of transformers at the module's top level; the callback's first use without
    transformers is a StagetraceError saying what to install."""
    import attribution.record.trainer_callback as module

    top = ast.parse(Path(module.__file__).read_text()).body
    imported = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in top if isinstance(n, ast.ImportFrom)]
    assert imported and not any(m.split(".")[0] == "transformers" for m in imported)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    module._callback_class.cache_clear()
    try:
        with pytest.raises(StagetraceError, match=r"needs the transformers package.*Fix"):
            _ = module.StagetraceCallback
    finally:
        module._callback_class.cache_clear()

"""An audit spec over checkpoints as people have them, to try `stagetrace audit SPEC.yaml`.

``python -m experiments.audit_example OUT`` records a tiny three-stage pipeline (a 16-unit MLP
on an MNIST slice: pretrain; fine-tune with a re-initialised head; adapt with a rank-2 LoRA on
``fc1``) into ``OUT/recorded/``, then exports its checkpoints in the formats people have
(docs/checkpoints.md) and writes the specs that read them:

- ``init.safetensors``: the weights the pretraining started from;
- ``pretrained/``: the pretraining's end as a Hugging Face folder with sharded safetensors
  (``model.safetensors.index.json`` and two shards) and a ``config.json``;
- ``finetuned/``: the fine-tune's end as a Hugging Face folder (``model.safetensors``);
- ``finetune_run/checkpoint-N/``: a Trainer-style folder of the fine-tune (``trainer_state.json``
  with the learning rate of every step, ``optimizer.pt``, the weights);
- ``lora/``: the adapter as a PEFT folder written by peft's ``save_pretrained``;
- ``audit.yaml``: every stage with its ``pipeline`` block (data, optimizer, schedule, batch
  size, seed, steps, entry actions), so the audit can retrain: the truth;
- ``estimate.yaml``: the same checkpoints without pipeline blocks: an estimate only (E0);
- ``behaviors.yaml``: test-set loss and margin, which both specs name.

Then ``stagetrace audit OUT/audit.yaml`` writes ``OUT/attribution.json`` (docs/audit.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from attribution.record.optim import build_optimizer, load_state_by_name
from attribution.record.pipeline import run_pipeline
from attribution.record.spec import PipelineSpec
from attribution.record.trajectory import Trajectory

DATA = {"target": "experiments.data:mnist", "kwargs": {"stop": 600}}
MODEL = {"target": "experiments.models:MLP", "kwargs": {"hidden": [16]}}
CONFIG: dict[str, Any] = {
    "model": MODEL,
    "seed": 0,
    "stages": {
        "pretrain": {
            "kind": "pretrain",
            "data": DATA,
            "optimizer": {"type": "sgd", "momentum": 0.9, "weight_decay": 1e-3},
            "lr": 0.05,
            "batch_size": 32,
            "steps": 6,
            "seed": 1,
        },
        "finetune": {
            "kind": "finetune",
            "data": DATA,
            "optimizer": {"type": "adamw"},
            "lr": 1e-3,
            "schedule": {"name": "cosine"},
            "batch_size": 32,
            "steps": 5,
            "seed": 2,
            "entry": [{"kind": "reinit", "modules": ["head"]}],
        },
        "adapt": {
            "kind": "adapt",
            "data": DATA,
            "optimizer": {"type": "sgd"},
            "lr": 0.05,
            "batch_size": 32,
            "steps": 4,
            "seed": 3,
            "trainable": ["*.lora_*"],
            "entry": [{"kind": "add_lora", "modules": ["fc1"], "rank": 2}],
        },
    },
}
TEST_SET = {"target": "experiments.data:mnist", "kwargs": {"split": "test", "stop": 100}}
BEHAVIORS = {
    "test_loss": {"data": TEST_SET, "quantity": "loss"},
    "test_margin": {"data": TEST_SET, "quantity": "margin"},
}


def record(folder: Path) -> Trajectory:
    """Record the example pipeline with the tool (what the exported files are taken from)."""
    return run_pipeline(PipelineSpec.from_dict(copy.deepcopy(CONFIG)), folder)


def export(traj: Trajectory, out: Path, trainer_stage: str = "finetune") -> None:
    """Write the recorded run's checkpoints as people have them (module docstring), the
    Trainer-style folder for ``trainer_stage`` (a full-weight stage), and ``behaviors.yaml``."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(traj.checkpoint("pretrain", "start"), out / "init.safetensors")
    _sharded(traj.checkpoint("pretrain", "end"), out / "pretrained")
    _hf_folder(traj.checkpoint("finetune", "end"), out / "finetuned")
    _trainer_folder(traj, trainer_stage, out / f"{trainer_stage}_run")
    _peft_folder(traj, "adapt", out / "lora")
    (out / "behaviors.yaml").write_text(yaml.safe_dump(BEHAVIORS, sort_keys=False))


def write_spec(
    traj: Trajectory,
    path: Path,
    blocks: str | None = "full",
    start: str | None = "init.safetensors",
    stand_in: str | None = None,
) -> Path:
    """An audit spec over the exported files: ``blocks`` "full" (each stage's recorded pipeline
    settings: replay and truth), "optimizer" (without data: learning rates and optimizer, E1) or
    None (no pipeline block: E0); the first stage's ``start`` file or ``stand_in``."""
    pretrain: dict[str, Any] = {"kind": "pretrain", "checkpoint": "pretrained/"}
    if start is not None:
        pretrain["start"] = start
    if stand_in is not None:
        pretrain["stand_in"] = stand_in
    stages = {
        "pretrain": pretrain,
        "finetune": {"kind": "finetune", "checkpoint": "finetuned/", "trainer": "finetune_run/"},
        "adapt": {"kind": "adapt", "adapter": "lora/"},
    }
    if blocks is not None:
        for name, stage in stages.items():
            block = dict(traj.pipeline["stages"][name])
            block.pop("kind")
            if blocks == "optimizer":
                for key in ("data", "batch_size", "seed"):
                    block.pop(key)
            stage["pipeline"] = block
    spec = {"model": MODEL, "seed": 0, "stages": stages, "behaviors": "behaviors.yaml"}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _sharded(state: dict[str, torch.Tensor], folder: Path) -> None:
    """A Hugging Face folder with the state split over two safetensors shards."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    size = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _config(folder)


def _hf_folder(state: dict[str, torch.Tensor], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    _config(folder)


def _config(folder: Path) -> None:
    config = {"architectures": ["MLP"], **MODEL["kwargs"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _trainer_folder(traj: Trajectory, stage: str, folder: Path) -> None:
    """``checkpoint-N`` as a Trainer saves it at the stage's last step N: the weights,
    ``optimizer.pt`` (the optimizer's ``state_dict()``: parameters by index in the order of the
    stage's parameter groups) and ``trainer_state.json`` logging every step's learning rate (the
    rate that step used, as current transformers log it)."""
    record, lr = traj.stages[traj.index(stage)], traj.steps(stage).lr
    n = record.num_steps
    checkpoint = folder / f"checkpoint-{n}"
    checkpoint.mkdir(parents=True, exist_ok=True)
    save_file(traj.checkpoint(stage, "end"), checkpoint / "model.safetensors")
    model = traj.load_model(stage, "end")
    params = dict(model.named_parameters())
    optimizer = build_optimizer(
        record.optimizer, [([params[p] for p in g.params], g.hyper) for g in record.groups]
    )
    load_state_by_name(
        optimizer, traj.optimizer_state(stage, "end"), {id(p): k for k, p in params.items()}
    )
    torch.save(optimizer.state_dict(), checkpoint / "optimizer.pt")
    state = {
        "global_step": n,
        "max_steps": n,
        "logging_steps": 1,
        "train_batch_size": record.batch_size,
        "log_history": [{"step": s, "learning_rate": float(lr[s - 1, 0])} for s in range(1, n + 1)],
    }
    (checkpoint / "trainer_state.json").write_text(json.dumps(state, indent=2))


def _peft_folder(traj: Trajectory, stage: str, folder: Path) -> None:
    """The stage's LoRA adapter written by peft itself: ``get_peft_model`` on the model before
    the stage, its factors set to the recorded ones, ``save_pretrained``."""
    import peft

    record = traj.stages[traj.index(stage)]
    (action,) = [a for a in record.entry if a.kind == "add_lora"]
    base = traj.load_model(traj.index(stage) - 1, "end")
    config = peft.LoraConfig(
        r=action.rank, lora_alpha=action.alpha, target_modules=list(action.modules)
    )
    model = peft.get_peft_model(base, config)
    end = traj.checkpoint(stage, "end")
    with torch.no_grad():
        for module in action.modules:
            layer = model.base_model.model.get_submodule(module)
            layer.lora_A["default"].weight.copy_(end[f"{module}.lora_A"])
            layer.lora_B["default"].weight.copy_(end[f"{module}.lora_B"])
    model.save_pretrained(folder)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the example into")
    args = parser.parse_args(argv)
    traj = record(args.out / "recorded")
    export(traj, args.out)
    write_spec(traj, args.out / "audit.yaml")
    write_spec(traj, args.out / "estimate.yaml", blocks=None)
    print(f"wrote {args.out}/audit.yaml; run: stagetrace audit {args.out}/audit.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())

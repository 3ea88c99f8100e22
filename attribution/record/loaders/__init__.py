"""Checkpoints as people have them (``docs/checkpoints.md``): safetensors and torch weights,
sharded or not; PEFT LoRA adapters; Hugging Face ``Trainer`` runs; and what changed between two
states. Nothing here imports transformers or peft, and no file is unpickled other than through
``torch.load(weights_only=True)``."""

from attribution.record.loaders.changes import StateChanges, compare_states
from attribution.record.loaders.lora import LoRAAdapter, LoRAModule, load_peft_adapter
from attribution.record.loaders.trainer import LRCheck, TrainerRun, load_trainer_run
from attribution.record.loaders.weights import load_model_config, load_state_dict

__all__ = [
    "LRCheck",
    "LoRAAdapter",
    "LoRAModule",
    "StateChanges",
    "TrainerRun",
    "compare_states",
    "load_model_config",
    "load_peft_adapter",
    "load_state_dict",
    "load_trainer_run",
]

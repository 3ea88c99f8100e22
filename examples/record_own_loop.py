"""Record your own training loop with stagetrace, then replay it and skip a stage.

The loop below is ordinary PyTorch: its own optimizers, its own scheduler, its own batching, and
gradient clipping in the second stage, which it declares to the recorder (``clip_grad_norm``) so
that replays clip too. The recorder adds three calls per stage (``stage``, ``attach``,
``log_batch``), checks each stage's first steps replay exactly when the stage ends, and writes a
trajectory that ``stagetrace replay RUN --verify`` reproduces bit for bit.

    python examples/record_own_loop.py runs/own_loop
    stagetrace replay runs/own_loop --verify
    stagetrace counterfactual runs/own_loop --skip pretrain
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from attribution.record.recorder import Recorder
from attribution.record.references import Ref
from attribution.record.trajectory import Trajectory


def train(root: Path | None, steps: int = 100) -> Trajectory:
    """Two stages on MNIST: SGD with a cosine schedule, then AdamW with a re-initialised head and
    gradients clipped to norm 1."""
    model_ref = Ref("experiments.models:MLP", {"hidden": [64]})
    torch.manual_seed(0)
    model = model_ref.call()
    recorder = Recorder(root, model, model_ref)
    stages = [
        ("pretrain", Ref("experiments.data:mnist", {"stop": 5000, "digits": [0, 1, 2, 3, 4]}), []),
        (
            "finetune",
            Ref("experiments.data:mnist", {"start": 5000, "stop": 8000}),
            [{"kind": "reinit", "modules": ["head"]}],
        ),
    ]
    for seed, (name, data, entry) in enumerate(stages, start=1):
        inputs, targets = data.call().tensors
        max_norm = None if name == "pretrain" else 1.0
        with recorder.stage(
            name,
            kind="pretrain" if seed == 1 else "finetune",
            data=data,
            seed=seed,
            batch_size=64,
            entry=entry,
            clip_grad_norm=max_norm,
        ) as stage:
            if name == "pretrain":
                optimizer = torch.optim.SGD(
                    model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4
                )
            else:
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
            stage.attach(optimizer)
            shuffler = torch.Generator().manual_seed(seed)
            for _ in range(steps):
                batch = torch.randint(len(targets), (64,), generator=shuffler)
                stage.log_batch(batch)
                optimizer.zero_grad()
                F.cross_entropy(model(inputs[batch]), targets[batch]).backward()
                if max_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                optimizer.step()
                scheduler.step()
    return recorder.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="new directory for the trajectory")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per stage")
    args = parser.parse_args()
    traj = train(args.root, args.steps)
    print(f"recorded {', '.join(traj.names)} -> {traj.root}")


if __name__ == "__main__":
    main()

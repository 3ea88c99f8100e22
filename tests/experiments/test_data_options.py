"""The `data` config group of spurious_image (conf/data/): each option gives a valid pipeline
whose stages and test set come from its loader, with a model that fits the loader's images.

Independent truths: group ids written into tiny CelebA and ChestX-ray14 files here
(``2 * label + attribute``), the documented image shapes, and closed forms of the shortcut
builders (no label noise: no carriers; every label flipped and the marker agreeing: all).
"""

import csv
import gzip
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import experiments  # noqa: F401  (registers the ${mul:...} resolver)
from attribution.analysis.behaviors import Behavior
from attribution.record.errors import SpecError
from attribution.record.pipeline import run_pipeline
from attribution.record.references import Ref, load_dataset
from attribution.record.spec import PipelineSpec
from experiments.data import fashion, patch_mnist
from experiments.models import MLP, SmallCNN
from experiments.tasks.spurious_image import shortcut_carriers

REPO = Path(__file__).resolve().parents[2]
STAGES = ["pretrain", "finetune", "adapt"]
# data option -> (loader, shape of one input as the model sees it)
OPTIONS = {
    "patch_mnist": ("experiments.data:patch_mnist", [1, 28, 28]),
    "colored_mnist": ("experiments.data:colored_mnist", [2, 28, 28]),
    "fashion": ("experiments.data:patch_mnist", [1, 28, 28]),
    "celeba": ("experiments.data:celeba", [3, 32, 32]),
    "chestxray": ("experiments.data:chest_xray", [1, 32, 32]),
}


def composed(*overrides: str) -> dict:
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", ["experiment=spurious_image", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def data_refs(config: dict) -> list[dict]:
    stages = config["pipeline"]["stages"]
    return [stages[s]["data"] for s in STAGES] + [config["evaluation"]["data"]]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_every_option_composes_a_valid_pipeline(option, model):
    config = composed(f"data={option}", f"model={model}")
    spec = PipelineSpec.from_dict(config["pipeline"])
    assert [s.name for s in spec.stages] == STAGES
    loader, shape = OPTIONS[option]
    assert {ref["target"] for ref in data_refs(config)} == {loader}
    for name, settings in config["behaviors"].items():
        behavior = Behavior.from_dict(name, settings, f"behaviors.{name}")
        assert behavior.data.to_dict() == Ref.from_dict(config["evaluation"]["data"], "").to_dict()
    net = spec.model.call()
    assert net(torch.zeros(2, *shape)).shape == (2, 2)
    if option == "fashion":
        assert all(ref["kwargs"]["source"] == "fashion" for ref in data_refs(config))


def test_default_is_patch_mnist_and_only_celeba_turns_the_shortcut_around():
    assert composed() == composed("data=patch_mnist")
    for option in ("patch_mnist", "colored_mnist", "fashion", "chestxray"):
        assert composed(f"data={option}")["behaviors"]["misled_loss"]["groups"] == {
            "misled": [1, 2]
        }
    celeba = composed("data=celeba")["behaviors"]
    # blond hair goes with women (Male = 0): groups (not blond, female) and (blond, male) go against
    assert celeba["misled_loss"]["groups"] == {"misled": [0, 3]}
    assert celeba["shortcut_gap"]["groups"] == {"against_shortcut": [0, 3], "with_shortcut": [1, 2]}


@pytest.mark.parametrize("option", ["patch_mnist", "colored_mnist"])
def test_mnist_options_build_their_data_and_the_model_takes_it(option):
    config = composed(f"data={option}", "evaluation.data.kwargs.stop=16")
    inputs, labels, groups = load_dataset(Ref.from_dict(config["evaluation"]["data"], "")).tensors
    assert list(inputs.shape[1:]) == OPTIONS[option][1]
    assert torch.equal(groups // 2, labels) and set(groups.tolist()) <= {0, 1, 2, 3}
    net = PipelineSpec.from_dict(config["pipeline"]).model.call()
    assert net(inputs).shape == (16, 2)


# ------------------------------------------------------------ CelebA and ChestX-ray14 on disk

# (split, blond, male) of each tiny CelebA image; (list, pneumothorax, male) for ChestX-ray14
ROWS = [("train", i % 2, (i // 2) % 2) for i in range(9)] + [
    ("test", 0, 0),
    ("test", 0, 1),
    ("test", 1, 0),
    ("test", 1, 1),
]


def write_celeba(root: Path) -> None:
    """The release's layout with two attribute columns and 13 images of 20x24 pixels."""
    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = [str(len(ROWS)), "Blond_Hair Male"]
    partition = []
    for i, (split, blond, male) in enumerate(ROWS):
        name = f"{i + 1:06d}.jpg"
        pixels = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img_align_celeba" / name)
        lines.append(f"{name} {2 * blond - 1} {2 * male - 1}")
        partition.append(f"{name} {0 if split == 'train' else 2}")
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")


def write_chestxray(root: Path) -> None:
    """The release's layout: images/, Data_Entry_2017.csv and both split lists."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    lists = {"train": [], "test": []}
    with open(root / "Data_Entry_2017.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Finding Labels", "Patient Gender", "View Position"])
        for i, (split, sick, male) in enumerate(ROWS):
            name = f"{i:08d}_000.png"
            pixels = rng.integers(0, 256, (30, 26), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / name)
            findings = "Effusion|Pneumothorax" if sick else "No Finding"
            writer.writerow([name, findings, "M" if male else "F", "PA"])
            lists[split].append(name)
    (root / "train_val_list.txt").write_text("\n".join(lists["train"]) + "\n")
    (root / "test_list.txt").write_text("\n".join(lists["test"]) + "\n")


def tiny_overrides(root: Path) -> list[str]:
    """Point the option at ``root`` and shrink its windows, batches and steps to the tiny files;
    16-pixel images, so the model's input must follow ``source.size``."""
    windows = {"pretrain": (0, 3), "finetune": (3, 6), "adapt": (6, 9)}
    out = [f"source.root={root}", "source.size=16", "evaluation.data.kwargs.stop=4"]
    for stage, (start, stop) in windows.items():
        where = f"pipeline.stages.{stage}"
        out += [f"{where}.data.kwargs.stop={stop}", f"{where}.batch_size=2", f"{where}.steps=2"]
        if start:
            out.append(f"{where}.data.kwargs.start={start}")
    return out


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize(
    ("option", "write", "channels"),
    [("celeba", write_celeba, 3), ("chestxray", write_chestxray, 1)],
)
def test_files_on_disk_feed_every_stage_and_the_test_set(tmp_path, option, write, channels, model):
    write(tmp_path)
    config = composed(f"data={option}", f"model={model}", *tiny_overrides(tmp_path))
    stages = config["pipeline"]["stages"]
    expected = {"pretrain": ROWS[0:3], "finetune": ROWS[3:6], "adapt": ROWS[6:9]}
    for stage, rows in expected.items():
        inputs, labels, groups = load_dataset(Ref.from_dict(stages[stage]["data"], "")).tensors
        assert inputs.shape == (3, channels, 16, 16)
        assert labels.tolist() == [label for _, label, _ in rows]
        assert groups.tolist() == [2 * label + male for _, label, male in rows]
    test = load_dataset(Ref.from_dict(config["evaluation"]["data"], "")).tensors
    assert test[2].tolist() == [0, 1, 2, 3]  # the test rows, in file order

    spec = PipelineSpec.from_dict(config["pipeline"])
    traj = run_pipeline(spec, None)  # in memory: two steps per stage
    assert traj.names == STAGES
    net = spec.model.call()
    net.load_state_dict(traj.checkpoint("pretrain", "end"))
    assert net(test[0]).shape == (4, 2)


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("celeba", "stagetrace cannot download CelebA; get it from https://mmlab.ie.cuhk.edu.hk"),
        ("chestxray", "stagetrace cannot download it; get it from https://nihcc.app.box.com"),
        ("fashion", "sudo apt-get install dataset-fashion-mnist"),
    ],
)
def test_absent_files_stop_the_run_before_training(tmp_path, option, says):
    if option == "fashion" and Path(fashion.DEFAULT_ROOT).is_dir():
        pytest.skip("Fashion-MNIST is installed here")
    root = [] if option == "fashion" else [f"source.root={tmp_path / 'absent'}"]
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "experiment=spurious_image",
            f"data={option}",
            *root,
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and "Fix:" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (run_dir / "trajectory").exists()  # nothing trained, nothing recorded


def test_colored_mnist_runs_end_to_end(tmp_path):
    """The smoke preset on colour: about 10 s on one thread (small models want one; with two
    threads on a busy machine it took three times as long)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "experiment=spurious_image",
            "data=colored_mnist",
            "preset=spurious_smoke",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    report = (tmp_path / "report.md").read_text()
    assert "Blamed stage" in report and "carry the shortcut" in report
    config = OmegaConf.load(tmp_path / "config.resolved.yaml")
    assert config.pipeline.model.kwargs.input_shape == [2, 28, 28]
    assert config.pipeline.stages.finetune.data.target == "experiments.data:colored_mnist"


def test_shortcut_builders_read_fashion_from_a_root(tmp_path):
    """``root`` reaches Fashion-MNIST's reader; MNIST, read from a package, refuses one."""
    classes = np.array([9, 0, 5, 4, 7, 2], dtype=np.uint8)
    for prefix in ("train", "t10k"):
        for kind, array in (("images", np.zeros((6, 28, 28), np.uint8)), ("labels", classes)):
            dims = 3 if kind == "images" else 1
            header = bytes([0, 0, 0x08, dims]) + b"".join(
                int(d).to_bytes(4, "big") for d in array.shape
            )
            name = f"{prefix}-{kind}-idx{dims}-ubyte.gz"
            (tmp_path / name).write_bytes(gzip.compress(header + array.tobytes()))
    _, labels, groups = patch_mnist(
        "test", correlation=1.0, label_noise=0.0, source="fashion", root=str(tmp_path)
    ).tensors
    assert labels.tolist() == [1, 0, 1, 0, 1, 0] and groups.tolist() == [3, 0, 3, 0, 3, 0]
    with pytest.raises(SpecError, match="root: got 'x' for source mnist"):
        patch_mnist("test", stop=4, root="x")


# ------------------------------------------------------------ shortcut carriers and models


def one_stage(ref: Ref) -> SimpleNamespace:
    """What shortcut_carriers reads of a trajectory: the data reference of a named stage."""
    return SimpleNamespace(stages=[SimpleNamespace(data=ref)], index=lambda name: 0)


@pytest.mark.parametrize("builder", ["patch_mnist", "colored_mnist"])
def test_shortcut_carriers_of_the_planted_builders(builder):
    target = f"experiments.data:{builder}"
    clean = {"split": "test", "stop": 64, "correlation": 1.0, "label_noise": 0.0}
    carriers = shortcut_carriers(one_stage(Ref(target, clean)), "stage")
    assert carriers.shape == (64,) and not carriers.any()  # no label noise: nothing to carry
    flipped = {**clean, "label_noise": 1.0}  # every label wrong, every marker agreeing with it
    assert shortcut_carriers(one_stage(Ref(target, flipped)), "stage").all()


def test_shortcut_carriers_are_not_known_for_natural_data():
    ref = Ref("experiments.data:celeba", {"root": "/nowhere", "split": "train"})
    assert shortcut_carriers(one_stage(ref), "stage") is None  # and nothing is loaded


def test_models_take_an_input_shape():
    colour = torch.randn(3, 3, 20, 12)
    cnn = SmallCNN(channels=[4, 8], groups=2, num_classes=2, input_shape=[3, 20, 12])
    assert cnn.head.in_features == 8 * 5 * 3  # 20x12 -> 10x6 -> 5x3
    assert torch.equal(cnn(colour), cnn(colour.reshape(3, -1)))
    mlp = MLP(hidden=[8], num_classes=2, input_shape=[3, 20, 12])
    assert mlp.fc1.in_features == 720 and mlp(colour).shape == (3, 2)
    assert MLP(hidden=[8]).fc1.in_features == 784 == SmallCNN().conv1.in_channels * 28 * 28
    with pytest.raises(SpecError, match="in_features=784 and input_shape"):
        MLP(in_features=784, input_shape=[1, 28, 28])
    with pytest.raises(SpecError, match=r"input_shape.*too small for 2"):
        SmallCNN(input_shape=[1, 3, 3])
    with pytest.raises(SpecError, match=r"input_shape: got \[28, 28\]"):
        SmallCNN(input_shape=[28, 28])


def test_logger_wandb_is_offline_and_four_stages_extend_three():
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        wandb = compose("config", ["logger=wandb"])
        offline = compose("config", ["logger=offline"])
        three = compose("config", ["experiment=fidelity"])
        four = compose("config", ["experiment=fidelity", "stages=four"])
    assert OmegaConf.to_container(wandb) == OmegaConf.to_container(offline)
    assert wandb.logger.mode == "offline"
    three_stages, four_stages = three.pipeline.stages, four.pipeline.stages
    assert list(four_stages) == ["pretrain", "finetune", "refine", "adapt"]
    assert all(four_stages[name] == three_stages[name] for name in three_stages)
    assert four_stages.refine.data.kwargs.transforms[0].name == "noise"

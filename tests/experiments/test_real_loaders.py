"""Fashion-MNIST, CelebA and ChestX-ray14 loaders on small files written here in each layout."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attribution.record.errors import SpecError, StagetraceError
from experiments.data import celeba, chest_xray, fashion_mnist, patch_mnist
from experiments.data import fashion as fashion_module
from experiments.data.fashion import read_idx

LEVEL = 1 / 127.5  # one 8-bit grey level in the loaders' [-1, 1] units


def to_unit(pixels) -> torch.Tensor:
    """8-bit pixels mapped to [-1, 1] as the CelebA and ChestX-ray14 loaders document."""
    return torch.as_tensor(np.asarray(pixels, dtype=np.float64) / 255.0 * 2.0 - 1.0).float()


# ---------------------------------------------------------------- Fashion-MNIST


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file: 0, 0, type 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.fixture
def fashion_root(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """Train files gzipped (as the Debian package ships them), test files plain."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(12, dtype=np.uint8) % 10,
        "test_images": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "test_labels": np.array([9, 0, 5, 4, 7, 2], dtype=np.uint8),
    }
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", arrays["train_images"])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", arrays["train_labels"])
    write_idx(tmp_path / "t10k-images-idx3-ubyte", arrays["test_images"])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", arrays["test_labels"])
    return tmp_path, arrays


@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_reads_gzipped_and_plain_idx(fashion_root, split):
    root, arrays = fashion_root
    inputs, labels = fashion_mnist(split, root=str(root)).tensors
    images = arrays[f"{split}_images"]
    expected = (images.astype(np.float64) / 255.0 - fashion_module.MEAN) / fashion_module.STD
    assert inputs.shape == (len(images), 1, 28, 28) and inputs.dtype == torch.float32
    assert np.allclose(inputs[:, 0].numpy(), expected, atol=1e-5)
    assert labels.dtype == torch.int64 and labels.tolist() == arrays[f"{split}_labels"].tolist()


def test_fashion_slice_and_flatten(fashion_root):
    root, _ = fashion_root
    whole = fashion_mnist("train", root=str(root), flatten=True).tensors
    part = fashion_mnist("train", start=3, stop=8, root=str(root), flatten=True).tensors
    assert part[0].shape == (5, 784)
    assert all(torch.equal(p, w[3:8]) for p, w in zip(part, whole, strict=True))
    with pytest.raises(SpecError, match=r"start/stop"):
        fashion_mnist("train", stop=13, root=str(root))


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]))  # float IDX, not ubyte
    with pytest.raises(StagetraceError, match=r"bad-idx.*unsigned-byte"):
        read_idx(bad)
    short = tmp_path / "short-idx.gz"
    write_idx(short, np.zeros((4, 3), dtype=np.uint8))
    short.write_bytes(gzip.compress(gzip.decompress(short.read_bytes())[:-2]))
    with pytest.raises(StagetraceError, match=r"short-idx.gz.*\(4, 3\)"):
        read_idx(short)
    write_idx(short, np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert read_idx(short).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_fashion_absent_says_how_to_install(tmp_path):
    with pytest.raises(StagetraceError, match=r"sudo apt-get install dataset-fashion-mnist"):
        fashion_mnist(root=str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StagetraceError, match=r"train-images-idx3-ubyte"):
        fashion_mnist(root=str(tmp_path / "empty"))


def test_shortcut_builders_read_fashion(fashion_root, monkeypatch):
    root, arrays = fashion_root
    monkeypatch.setattr(fashion_module, "DEFAULT_ROOT", str(root))
    inputs, labels, groups = patch_mnist(
        "test", correlation=1.0, label_noise=0.0, patch=3, source="fashion"
    ).tensors
    clean = (arrays["test_labels"] >= 5).astype(np.int64)
    assert labels.tolist() == clean.tolist() and groups.tolist() == (3 * clean).tolist()
    images = arrays["test_images"].astype(np.float64) / 255.0
    images[clean == 1, :3, :3] = 1.0
    expected = (images - fashion_module.MEAN) / fashion_module.STD
    assert np.allclose(inputs[:, 0].numpy(), expected, atol=1e-5)


def test_installed_fashion_mnist():
    if not Path(fashion_module.DEFAULT_ROOT).is_dir():
        pytest.skip(
            f"Fashion-MNIST is not installed at {fashion_module.DEFAULT_ROOT} "
            "(sudo apt-get install dataset-fashion-mnist)"
        )
    inputs, labels = fashion_mnist("train").tensors
    assert inputs.shape == (60000, 1, 28, 28)
    assert torch.bincount(labels, minlength=10).tolist() == [6000] * 10
    assert abs(inputs.double().mean().item()) < 1e-3
    assert abs(inputs.double().std().item() - 1.0) < 1e-3
    assert torch.bincount(fashion_mnist("test").tensors[1]).tolist() == [1000] * 10


# ---------------------------------------------------------------- CelebA

CELEBA_COLUMNS = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]
# Listed out of name order on purpose: the loader must follow list_attr_celeba.txt.
CELEBA_FILES = ["000004.jpg", "000001.jpg", "000007.jpg", "000002.jpg", "000003.jpg"]
CELEBA_FILES += ["000008.jpg", "000005.jpg", "000006.jpg"]
CELEBA_PARTS = [0, 0, 1, 0, 2, 0, 1, 2]


@pytest.fixture
def celeba_root(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    """8 solid-colour 10x12 JPEGs with random -1/1 attributes; returns root, values, colours."""
    rng = np.random.default_rng(1)
    values = rng.choice([-1, 1], size=(len(CELEBA_FILES), len(CELEBA_COLUMNS)))
    colours = rng.integers(0, 256, size=(len(CELEBA_FILES), 3))
    (tmp_path / "img_align_celeba").mkdir()
    for name, colour in zip(CELEBA_FILES, colours, strict=True):
        pixels = np.broadcast_to(colour.astype(np.uint8), (12, 10, 3))
        Image.fromarray(np.ascontiguousarray(pixels)).save(
            tmp_path / "img_align_celeba" / name, quality=95, subsampling=0
        )
    lines = [str(len(CELEBA_FILES)), " ".join(CELEBA_COLUMNS)]
    lines += [
        f"{n} " + " ".join(f"{v:2d}" for v in row)
        for n, row in zip(CELEBA_FILES, values, strict=True)
    ]
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    partition = [f"{n} {p}" for n, p in sorted(zip(CELEBA_FILES, CELEBA_PARTS, strict=True))]
    (tmp_path / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    return tmp_path, values, colours


@pytest.mark.parametrize(("split", "code"), [("train", 0), ("valid", 1), ("test", 2)])
@pytest.mark.parametrize(("target", "attribute"), [("Blond_Hair", "Male"), ("Smiling", "Young")])
def test_celeba_reads_the_fixture(celeba_root, split, code, target, attribute):
    root, values, colours = celeba_root
    inputs, labels, groups = celeba(str(root), split, target, attribute, size=4).tensors
    rows = [i for i, part in enumerate(CELEBA_PARTS) if part == code]
    label = (values[rows, CELEBA_COLUMNS.index(target)] == 1).astype(np.int64)
    attr = (values[rows, CELEBA_COLUMNS.index(attribute)] == 1).astype(np.int64)
    assert labels.dtype == groups.dtype == torch.int64
    assert labels.tolist() == label.tolist()
    assert groups.tolist() == (2 * label + attr).tolist()
    assert inputs.shape == (len(rows), 3, 4, 4) and inputs.dtype == torch.float32
    expected = to_unit(colours[rows])[:, :, None, None].expand_as(inputs)
    assert torch.allclose(inputs, expected, atol=2 * LEVEL)  # JPEG: within a grey level or two


def test_celeba_slices_within_the_split(celeba_root):
    root, _, _ = celeba_root
    whole = celeba(str(root), "train", size=4).tensors
    part = celeba(str(root), "train", size=4, start=1, stop=3).tensors
    assert all(torch.equal(p, w[1:3]) for p, w in zip(part, whole, strict=True))
    with pytest.raises(SpecError, match=r"start/stop.*4 rows"):
        celeba(str(root), "train", size=4, stop=5)


def test_celeba_errors_name_the_problem(celeba_root, tmp_path):
    root, _, _ = celeba_root
    with pytest.raises(StagetraceError, match=r"nowhere.*mmlab.ie.cuhk.edu.hk"):
        celeba(str(tmp_path / "nowhere"))
    with pytest.raises(SpecError, match=r"'Blond'.*Blond_Hair") as caught:
        celeba(str(root), target="Blond")
    assert caught.value.field == "target"
    with pytest.raises(SpecError, match=r"'Female'.*Male") as caught:
        celeba(str(root), attribute="Female")
    assert caught.value.field == "attribute"
    with pytest.raises(SpecError, match=r"split.*train, valid, test"):
        celeba(str(root), split="val")
    (root / "img_align_celeba" / "000002.jpg").unlink()  # a train image
    with pytest.raises(StagetraceError, match=r"000002.jpg does not exist"):
        celeba(str(root), size=4)
    assert len(celeba(str(root), "test", size=4).tensors[1]) == 2  # other splits still load
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(StagetraceError, match=r"list_eval_partition.txt does not exist"):
        celeba(str(root))


def test_celeba_rejects_a_damaged_attribute_file(celeba_root):
    root, _, _ = celeba_root
    path = root / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:3], lines[3].replace(" 1", " 2", 1), *lines[4:]]))
    with pytest.raises(StagetraceError, match=r"list_attr_celeba.txt line 4"):
        celeba(str(root))
    path.write_text("\n".join(lines[:-1]))
    with pytest.raises(StagetraceError, match=r"declares 8 images but 7 follow"):
        celeba(str(root))


# ---------------------------------------------------------------- ChestX-ray14

CHEST_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
# name, findings, sex, view
CHEST_ROWS = [
    ("00000001_000.png", "Pneumothorax", "M", "PA"),
    ("00000001_001.png", "No Finding", "M", "AP"),
    ("00000002_000.png", "Effusion|Pneumothorax", "F", "AP"),
    ("00000003_000.png", "Effusion", "F", "PA"),
    ("00000004_000.png", "Mass|Pneumothorax", "F", "PA"),
    ("00000005_000.png", "No Finding", "M", "PA"),
    ("00000006_000.png", "Atelectasis", "F", "AP"),
    ("00000007_000.png", "Pneumothorax", "M", "AP"),
]
CHEST_TEST = {"00000002_000.png", "00000005_000.png", "00000007_000.png"}


def grey_of(index: int) -> int:
    return 20 + 29 * index


def write_chest(root: Path, header: str = CHEST_HEADER, nested: bool = True) -> None:
    """CSV, split lists and 12x8 PNGs whose centre 8x8 square is one grey and whose two
    left and right columns are black, so that a loader that skips the centre crop is caught."""
    lines = [header]
    lines += [
        f"{n},{f},0,{i},40,{s},{v},2500,2048,0.143,0.143"
        for i, (n, f, s, v) in enumerate(CHEST_ROWS)
    ]
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    names = [row[0] for row in CHEST_ROWS]
    (root / "test_list.txt").write_text("\n".join(sorted(CHEST_TEST, reverse=True)) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(n for n in names if n not in CHEST_TEST))
    for index, name in enumerate(names):
        folder = root / (f"images_00{1 + index // 4}/images" if nested else "images")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.zeros((8, 12), dtype=np.uint8)
        pixels[:, 2:10] = grey_of(index)
        Image.fromarray(pixels).save(folder / name)


def chest_truth(rows: list[int], attribute: str) -> tuple[list[int], list[int]]:
    """Labels and groups of ``rows`` straight from CHEST_ROWS."""
    labels = [int("Pneumothorax" in CHEST_ROWS[i][1].split("|")) for i in rows]
    attrs = [
        int(CHEST_ROWS[i][2] == "M") if attribute == "sex" else int(CHEST_ROWS[i][3] == "AP")
        for i in rows
    ]
    return labels, [2 * lab + a for lab, a in zip(labels, attrs, strict=True)]


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("attribute", ["sex", "view"])
def test_chest_reads_the_fixture(tmp_path, nested, attribute):
    write_chest(tmp_path, nested=nested)
    inputs, labels, groups = chest_xray(str(tmp_path), attribute=attribute, size=4).tensors
    truth_labels, truth_groups = chest_truth(list(range(len(CHEST_ROWS))), attribute)
    assert labels.tolist() == truth_labels and groups.tolist() == truth_groups
    assert labels.dtype == groups.dtype == torch.int64
    assert inputs.shape == (len(CHEST_ROWS), 1, 4, 4) and inputs.dtype == torch.float32
    greys = to_unit([grey_of(i) for i in range(len(CHEST_ROWS))])
    assert torch.allclose(inputs, greys[:, None, None, None].expand_as(inputs), atol=LEVEL / 2)


@pytest.mark.parametrize("split", ["train", "test"])
def test_chest_split_lists_keep_csv_order(tmp_path, split):
    write_chest(tmp_path)
    _, labels, groups = chest_xray(str(tmp_path), split=split, size=4).tensors
    in_test = [row[0] in CHEST_TEST for row in CHEST_ROWS]
    rows = [i for i, t in enumerate(in_test) if t == (split == "test")]
    assert (labels.tolist(), groups.tolist()) == chest_truth(rows, "sex")
    part = chest_xray(str(tmp_path), split=split, size=4, start=1, stop=2).tensors
    assert (part[1].tolist(), part[2].tolist()) == chest_truth(rows[1:2], "sex")


def test_chest_errors_name_the_problem(tmp_path):
    with pytest.raises(StagetraceError, match=r"nowhere.*nihcc"):
        chest_xray(str(tmp_path / "nowhere"))
    write_chest(tmp_path, header=CHEST_HEADER.replace("View Position", "Projection"))
    assert len(chest_xray(str(tmp_path), size=4).tensors[0]) == len(CHEST_ROWS)
    with pytest.raises(StagetraceError, match=r"no column 'View Position'.*Patient Gender"):
        chest_xray(str(tmp_path), attribute="view")
    with pytest.raises(SpecError, match=r"attribute.*sex, view"):
        chest_xray(str(tmp_path), attribute="age")
    with pytest.raises(SpecError, match=r"'Pneumonia'.*Atelectasis, Effusion, Mass"):
        chest_xray(str(tmp_path), finding="Pneumonia")
    with pytest.raises(StagetraceError, match=r"missing.csv does not exist"):
        chest_xray(str(tmp_path), csv="missing.csv")
    (tmp_path / "images_002" / "images" / "00000006_000.png").unlink()
    with pytest.raises(StagetraceError, match=r"image 00000006_000.png not found"):
        chest_xray(str(tmp_path), size=4)
    (tmp_path / "test_list.txt").unlink()
    with pytest.raises(StagetraceError, match=r"test_list.txt does not exist"):
        chest_xray(str(tmp_path), split="test")


def test_chest_rejects_an_unknown_attribute_value(tmp_path):
    write_chest(tmp_path)
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text(
        path.read_text().replace(
            "00000003_000.png,Effusion,0,3,40,F", "00000003_000.png,Effusion,0,3,40,O"
        )
    )
    with pytest.raises(StagetraceError, match=r"Patient Gender of 00000003_000.png is 'O'"):
        chest_xray(str(tmp_path), size=4)

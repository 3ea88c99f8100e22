"""Weights as people have them (attribution.record.loaders): single and sharded safetensors and
torch files load bit for bit; damaged, incomplete or unsafe files are refused with one line that
names the file and the fix, and nothing is written; compare_states sorts names correctly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from attribution.record.errors import StagetraceError, TrajectoryError
from attribution.record.loaders import (
    compare_states,
    load_model_config,
    load_state_dict,
)


def sample_state() -> dict[str, torch.Tensor]:
    """Tensors of every dtype a checkpoint holds, with values that no rounding would keep."""
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(5, 3, generator=g),
        "layers.0.weight": torch.randn(3, 3, generator=g).to(torch.bfloat16),
        "layers.0.bias": torch.randn(3, generator=g).to(torch.float16),
        "layers.1.weight": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "position_ids": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
    }


SHARDS = {"a": ("embed.weight", "layers.0.weight", "mask"), "b": ("layers.0.bias",)}
SHARDS["b"] += ("layers.1.weight", "position_ids")


def write_sharded(folder: Path, state: dict[str, torch.Tensor], kind: str) -> Path:
    """Shards and index as save_pretrained writes them; kind is 'safetensors' or 'bin'."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(SHARDS.values()):
        part = {n: state[n] for n in names}
        if kind == "safetensors":
            shard = f"model-0000{i + 1}-of-00002.safetensors"
            save_file(part, folder / shard)
        else:
            shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
            torch.save(part, folder / shard)
        weight_map.update(dict.fromkeys(names, shard))
    index = folder / (
        "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    )
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def assert_bitwise(loaded: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(state)
    for name, value in state.items():
        assert loaded[name].dtype == value.dtype, name
        assert loaded[name].shape == value.shape, name
        assert (
            loaded[name].reshape(-1).view(torch.uint8).tolist()
            == value.reshape(-1).view(torch.uint8).tolist()
        ), name


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def refused(path: Path, *, contains: str, root: Path) -> str:
    """The one-line error for loading ``path``; checks nothing under ``root`` was written."""
    before = listing(root)
    with pytest.raises(StagetraceError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert "\n" not in message and "Fix: " in message
    assert contains in message, message
    assert listing(root) == before
    return message


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_a_sharded_checkpoint_round_trips_bit_for_bit(tmp_path, kind):
    state = sample_state()
    index = write_sharded(tmp_path / "model", state, kind)
    assert_bitwise(load_state_dict(index), state)
    assert_bitwise(load_state_dict(tmp_path / "model"), state)  # the folder finds its index


def test_single_files_and_a_folder_with_model_safetensors(tmp_path):
    state = sample_state()
    (tmp_path / "hf").mkdir()
    save_file(state, tmp_path / "hf" / "model.safetensors")
    torch.save(state, tmp_path / "weights.pt")
    assert_bitwise(load_state_dict(tmp_path / "hf"), state)
    assert_bitwise(load_state_dict(str(tmp_path / "hf" / "model.safetensors")), state)
    assert_bitwise(load_state_dict(tmp_path / "weights.pt"), state)


def test_a_missing_shard_is_named(tmp_path):
    index = write_sharded(tmp_path / "model", sample_state(), "safetensors")
    (index.parent / "model-00002-of-00002.safetensors").unlink()
    message = refused(index, contains="model-00002-of-00002.safetensors", root=tmp_path)
    assert "shard is missing" in message and "'layers.0.bias'" in message


def test_a_truncated_safetensors_file_is_refused(tmp_path):
    save_file(sample_state(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-17])
    refused(tmp_path / "model.safetensors", contains="truncated or corrupt", root=tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:5])
    refused(tmp_path, contains="not a readable safetensors file", root=tmp_path)


class CreatesAFile:
    """Unpickling this object opens (creates) ``path`` for writing: code run by a load."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickle_that_would_run_code_is_not_loaded(tmp_path):
    target = tmp_path / "created-by-unpickling"
    torch.save({"weight": torch.ones(2), "payload": CreatesAFile(target)}, tmp_path / "model.bin")
    message = refused(tmp_path / "model.bin", contains="NOT loaded", root=tmp_path)
    assert "weights_only" in message and "io.open" in message
    assert not target.exists()
    # the file is live: an unrestricted load would have created the file
    torch.load(tmp_path / "model.bin", weights_only=False)
    assert target.exists()


def test_non_tensor_content_is_refused(tmp_path):
    torch.save({"weight": torch.ones(2), "step": 3}, tmp_path / "a.pt")
    refused(tmp_path / "a.pt", contains="entry 'step' is a int, not a tensor", root=tmp_path)
    torch.save({"state_dict": {"weight": torch.ones(2)}}, tmp_path / "b.pt")
    refused(tmp_path / "b.pt", contains="the state dict may sit under this key", root=tmp_path)
    torch.save([torch.ones(2)], tmp_path / "c.pt")
    refused(tmp_path / "c.pt", contains="holds a list", root=tmp_path)


def test_shards_that_disagree_with_their_index_are_refused(tmp_path):
    state = sample_state()
    index = write_sharded(tmp_path / "m", state, "safetensors")
    second = index.parent / "model-00002-of-00002.safetensors"
    # a name held by two shards
    save_file({n: state[n] for n in (*SHARDS["b"], "mask")}, second)
    refused(index, contains="the index puts it in model-00001-of-00002", root=tmp_path)
    # a name the index does not list
    save_file({**{n: state[n] for n in SHARDS["b"]}, "extra": torch.ones(1)}, second)
    refused(index, contains="the index lists no such name", root=tmp_path)
    # a name the index lists but the shard lacks
    save_file({n: state[n] for n in SHARDS["b"][:2]}, second)
    refused(index, contains="lacks 1 tensors its index maps to it", root=tmp_path)
    # a name listed twice in the index itself
    text = index.read_text().replace('"mask":', '"mask": "x", "mask":')
    index.write_text(text)
    refused(index, contains="'mask' appears twice", root=tmp_path)


def test_an_index_may_not_point_outside_its_folder(tmp_path):
    index = tmp_path / "m" / "model.safetensors.index.json"
    index.parent.mkdir()
    save_file({"w": torch.ones(1)}, tmp_path / "outside.safetensors")
    index.write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    refused(index, contains="not a file name inside the folder", root=tmp_path)


def test_missing_files_folders_and_formats(tmp_path):
    refused(tmp_path / "nothing.safetensors", contains="file is missing", root=tmp_path)
    refused(tmp_path, contains="holds no checkpoint", root=tmp_path)
    (tmp_path / "w.npz").write_bytes(b"x")
    refused(tmp_path / "w.npz", contains="unknown checkpoint format", root=tmp_path)


def test_load_model_config(tmp_path):
    with pytest.raises(TrajectoryError, match=r"config\.json: file is missing"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 8}')
    assert load_model_config(tmp_path) == {"model_type": "gpt2", "n_embd": 8}
    (tmp_path / "config.json").write_text('{"model_type": ')
    with pytest.raises(TrajectoryError, match="not valid JSON"):
        load_model_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(TrajectoryError, match="not an object"):
        load_model_config(tmp_path)


def test_compare_states_sorts_every_name():
    before = sample_state()
    after = dict(before)
    after["embed.weight"] = before["embed.weight"].clone()
    after["embed.weight"][0, 0] = torch.nextafter(before["embed.weight"][0, 0], torch.tensor(9.0))
    after["layers.1.weight"] = before["layers.1.weight"].float()  # same values, new dtype
    after["position_ids"] = torch.arange(8)
    del after["mask"]
    after["head.weight"] = torch.zeros(2, 2)
    after["layers.0.bias"] = before["layers.0.bias"].clone()  # a copy is still frozen
    changes = compare_states(before, after)
    assert changes.changed == ("embed.weight",)
    assert changes.frozen == ("layers.0.bias", "layers.0.weight")
    assert changes.retyped == ("layers.1.weight",)
    assert changes.reshaped == {"position_ids": ((7,), (8,))}
    assert (changes.added, changes.removed) == (("head.weight",), ("mask",))
    assert json.loads(json.dumps(changes.to_json()))["reshaped"] == {"position_ids": [[7], [8]]}
    assert changes.describe() == [
        "1 changed: embed.weight",
        "2 frozen: layers.0.bias, layers.0.weight",
        "1 added: head.weight",
        "1 removed: mask",
        "1 retyped: layers.1.weight",
        "1 reshaped: position_ids [7] -> [8]",
    ]


def test_frozen_means_the_same_bits():
    nan = torch.tensor([float("nan"), 1.0])
    zero = torch.tensor([0.0])
    changes = compare_states({"a": nan, "z": zero}, {"a": nan.clone(), "z": -zero})
    assert (changes.frozen, changes.changed) == (("a",), ("z",))

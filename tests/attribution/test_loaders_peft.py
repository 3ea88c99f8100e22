"""PEFT LoRA adapters read without peft: the merge equals peft's own merge_and_unload(), and the
factors in the tool's LoRALinear compute what the peft model computes. peft itself is the truth."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from attribution.record.entry import apply_entry
from attribution.record.errors import StagetraceError, TrajectoryError
from attribution.record.loaders import load_peft_adapter
from attribution.record.spec import EntryAction
from tests.helpers import installed

peft = installed("peft")
conv1d = installed("transformers.pytorch_utils").Conv1D


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.v = nn.Linear(4, 5)


class Net(nn.Module):
    """An embedding, two blocks of two linear layers, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(5, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        for block in self.layers:
            h = torch.tanh(block.v(torch.tanh(block.q(h))))[..., :4]
        return self.head(torch.cat([h, h[..., :1]], -1))


class ConvNet(nn.Module):
    """GPT-2's layout: a Conv1D (weight [in, out]) beside an nn.Linear (weight [out, in])."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = conv1d(6, 4)  # 4 -> 6
        self.up = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.tanh(self.mlp(x)))


def trained_adapter(model: nn.Module, tmp_path, **config):
    """Wrap ``model`` with peft, give every trainable tensor (adapter factors, modules_to_save
    copies, biases) random values as training would, save it; return (base state, peft model,
    folder)."""
    torch.manual_seed(0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    wrapped.save_pretrained(tmp_path / "adapter")
    return base, wrapped, tmp_path / "adapter"


def peft_merged(wrapped) -> dict[str, torch.Tensor]:
    return copy.deepcopy(wrapped).merge_and_unload().state_dict()


def assert_states_close(ours: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(truth)
    for name in truth:
        torch.testing.assert_close(ours[name], truth[name], rtol=1e-6, atol=1e-6, msg=name)


CONFIGS = {
    "plain": dict(r=2, lora_alpha=4, target_modules=["q", "v", "emb"], modules_to_save=["head"]),
    "bias": dict(r=2, lora_alpha=4, target_modules=["q", "v"], bias="all"),
    "lora_only": dict(r=2, lora_alpha=4, target_modules=["q", "emb"], bias="lora_only"),
    "rslora": dict(r=4, lora_alpha=3, use_rslora=True, target_modules=["q", "v", "emb"]),
    "patterns": dict(
        r=2,
        lora_alpha=4,
        target_modules=["q", "v", "emb"],
        rank_pattern={"1.q": 3, "q": 5, "v": 1},
        alpha_pattern={"q": 8, "emb": 0.5},
    ),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_the_merge_equals_peft_merge_and_unload(tmp_path, case):
    base, wrapped, folder = trained_adapter(Net(), tmp_path, **CONFIGS[case])
    adapter = load_peft_adapter(folder)
    targets = CONFIGS[case]["target_modules"]
    assert set(adapter.modules) == {
        n for n in dict(Net().named_modules()) if n.endswith(tuple(targets))
    }
    assert all(m.embedding == (m.name == "emb") for m in adapter.modules.values())
    merged = adapter.merged(base)
    assert_states_close(merged, peft_merged(wrapped))
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {f"{m}.weight" for m in adapter.modules} | set(adapter.modules_to_save)


def test_scalings_follow_peft_rules(tmp_path):
    for case, expected in {
        "rslora": {"layers.0.q": (4, 3 / 2), "emb": (4, 3 / 2)},
        # the first pattern that matches the end of the name after a dot wins ("1.q" over "q")
        "patterns": {
            "layers.0.q": (5, 8 / 5),
            "layers.1.q": (3, 8 / 3),
            "layers.1.v": (1, 4),
            "emb": (2, 0.5 / 2),
        },
    }.items():
        _, wrapped, folder = trained_adapter(Net(), tmp_path / case, **CONFIGS[case])
        adapter = load_peft_adapter(folder)
        peft_layers = dict(wrapped.base_model.model.named_modules())
        for name, (r, scaling) in expected.items():
            module = adapter.modules[name]
            assert (module.r, module.scaling) == (r, pytest.approx(scaling, rel=1e-12))
            assert module.scaling == peft_layers[name].scaling["default"]


def test_modules_to_save_replace_the_base_tensors(tmp_path):
    base, wrapped, folder = trained_adapter(Net(), tmp_path, **CONFIGS["plain"])
    adapter = load_peft_adapter(folder)
    saved = wrapped.base_model.model.head.modules_to_save["default"]
    assert set(adapter.modules_to_save) == {"head.weight", "head.bias"}
    assert torch.equal(adapter.modules_to_save["head.weight"], saved.weight)
    assert not torch.equal(saved.weight, base["head.weight"])


def test_the_factors_in_the_tools_lora_linear_compute_the_peft_model(tmp_path):
    config = dict(CONFIGS["patterns"], target_modules=["q", "v"], alpha_pattern={"q": 8})
    net = Net()
    base, wrapped, folder = trained_adapter(net, tmp_path, **config)
    adapter = load_peft_adapter(folder)
    tool = Net()
    for name, module in adapter.modules.items():
        action = EntryAction("add_lora", (name,), rank=module.r, alpha=module.alpha)
        apply_entry(tool, action)
    tool.load_state_dict({**base, **adapter.as_lora_parameters()}, strict=True)
    tokens = torch.tensor([[1, 4, 9, 0], [3, 3, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(tool(tokens), wrapped(tokens), rtol=1e-6, atol=1e-6)


def test_as_lora_parameters_refuses_what_lora_linear_cannot_hold(tmp_path):
    _, _, plain = trained_adapter(Net(), tmp_path / "p", **CONFIGS["plain"])
    with pytest.raises(StagetraceError, match="'emb' adapts an embedding"):
        load_peft_adapter(plain).as_lora_parameters()
    config = dict(CONFIGS["rslora"], target_modules=["q"])
    _, _, rslora = trained_adapter(Net(), tmp_path / "r", **config)
    with pytest.raises(StagetraceError, match=r"rsLoRA.*alpha as scaling x r = 6"):
        load_peft_adapter(rslora).as_lora_parameters()


def test_conv1d_fan_in_fan_out_and_peft_per_layer_flip(tmp_path):
    config = dict(r=2, lora_alpha=6, target_modules=["mlp", "up"], fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        base, wrapped, folder = trained_adapter(ConvNet(), tmp_path, **config)
    # peft flipped the setting for the nn.Linear `up` and saved the flipped value, which is
    # wrong for the Conv1D `mlp`: the merge sees it in mlp's non-square weight
    assert json.loads((folder / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    with pytest.raises(StagetraceError, match=r"Fix: pass fan_in_fan_out=\{'mlp': True\}") as info:
        load_peft_adapter(folder).merged(base)
    assert "\n" not in str(info.value) and "Fix: " in str(info.value)
    adapter = load_peft_adapter(folder, fan_in_fan_out={"mlp": True})
    assert adapter.modules["mlp"].fan_in_fan_out and not adapter.modules["up"].fan_in_fan_out
    assert_states_close(adapter.merged(base), peft_merged(wrapped))


def test_merged_refuses_a_base_without_the_modules(tmp_path):
    base, _, folder = trained_adapter(Net(), tmp_path, **CONFIGS["plain"])
    adapter = load_peft_adapter(folder)
    missing = {k: v for k, v in base.items() if not k.startswith("layers.1.")}
    with pytest.raises(StagetraceError, match=r"no 'layers\.1\.q\.weight' in the base") as info:
        adapter.merged(missing)
    assert "(and 1 more)" in str(info.value) and "Fix: " in str(info.value)
    reshaped = dict(base, **{"layers.0.v.weight": torch.zeros(5, 5)})
    with pytest.raises(StagetraceError, match=r"\[5, 5\] in the base, the adapter's update"):
        adapter.merged(reshaped)
    smaller_head = dict(base, **{"head.weight": torch.zeros(2, 5)})
    with pytest.raises(StagetraceError, match=r"modules_to_save tensor 'head\.weight'"):
        adapter.merged(smaller_head)


def test_an_adapter_whose_config_disagrees_with_its_weights_is_refused(tmp_path):
    _, _, folder = trained_adapter(Net(), tmp_path, **CONFIGS["plain"])
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, r=3)))
    with pytest.raises(TrajectoryError, match="gives it rank 3"):
        load_peft_adapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(TrajectoryError, match=r"DoRA \(use_dora\) adapters are not supported"):
        load_peft_adapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, modules_to_save=None)))
    with pytest.raises(TrajectoryError, match=r"'base_model\.model\.head\.bias' is neither"):
        load_peft_adapter(folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(TrajectoryError, match=r"adapter_config\.json: file is missing"):
        load_peft_adapter(folder)

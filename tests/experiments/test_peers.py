"""The peers against independent truth: explicit per-example gradients of a hand-written model,
retraining at tiny rates (where first order is exact in the limit), the damped influence's
closed form at large damping, and Kronfluence's own pairwise scores."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from attribution.record.counterfactual import skip_stage
from attribution.record.errors import SpecError
from attribution.record.evaluation import final_model
from attribution.record.pipeline import run_pipeline
from attribution.record.spec import PipelineSpec
from experiments import peers
from experiments.peers import Query

MODEL = {"target": "experiments.models:MLP", "kwargs": {"in_features": 4, "hidden": [3]}}


def blobs(n: int = 40, seed: int = 0) -> TensorDataset:
    """Three Gaussian classes in 4 dimensions, float32."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[1.0, 0, 0, 1], [0, 1.0, -1, 0], [-1.0, -1, 0, 0]])
    return TensorDataset(centres[y] + 0.7 * torch.randn(n, 4, generator=g), y)


def stage(seed, lr, steps, batch_size=8, **extra):
    return {
        "data": {"target": "tests.experiments.test_peers:blobs", "kwargs": {"seed": seed}},
        "optimizer": {"type": "sgd", **extra.pop("optimizer", {})},
        "lr": lr,
        "batch_size": batch_size,
        "steps": steps,
        "seed": seed,
        **extra,
    }


def record(**stages):
    return run_pipeline(PipelineSpec.from_dict({"model": MODEL, "stages": stages}), None)


TEST = blobs(12, seed=99).tensors


def logits(state, x):
    """The MLP written out; LoRA adapters (when the state has them) merged by their formula."""

    def weight(layer):
        w = state[f"{layer}.weight"]
        if f"{layer}.lora_A" in state:
            w = w + state[f"{layer}.scale"] * state[f"{layer}.lora_B"] @ state[f"{layer}.lora_A"]
        return w

    hidden = torch.relu(x @ weight("fc1").T + state["fc1.bias"])
    return hidden @ weight("head").T + state["head.bias"]


def gradients(state, names, x, y, quantity="loss"):
    """[n, p] explicit per-example gradients of ``quantity`` in ``names``, one backward each."""
    rows = []
    for i in range(len(y)):
        leaves = {n: state[n].detach().clone().requires_grad_(True) for n in names}
        z = logits({**state, **leaves}, x[i : i + 1])
        if quantity == "loss":
            value = F.cross_entropy(z, y[i : i + 1])
        else:
            others = z.clone()
            others[0, y[i]] = float("-inf")
            value = z[0, y[i]] - others.max()
        grads = torch.autograd.grad(value, list(leaves.values()))
        rows.append(torch.cat([g.flatten() for g in grads]).double())
    return torch.stack(rows)


def queries(quantity="loss"):
    return {"test": Query(*TEST, quantity)}


@pytest.mark.parametrize("quantity", ["loss", "margin"])
def test_gradsim_equals_the_hand_sum_of_rate_weighted_gradient_products(quantity):
    head_only = {"groups": [{"params": ["head.*"], "lr": 0.05}]}
    traj = record(
        a=stage(1, lr=0.2, steps=3, optimizer=head_only, schedule={"name": "cosine"}),
        b=stage(2, lr=0.1, steps=2, batch_size=5, trainable=["head.*"]),
    )
    result = peers.gradsim(traj, queries(quantity), batch_size=5)
    state = traj.checkpoint("b", "end")
    for k, name in enumerate(["a", "b"]):
        record_k, log = traj.stages[k], traj.steps(k)
        x, y = blobs(seed=k + 1).tensors
        expected = torch.zeros(len(TEST[1]), dtype=torch.float64)
        for group, params in enumerate(g.params for g in record_k.groups):
            test = gradients(state, params, *TEST, quantity)
            for t in range(log.num_steps):
                batch = log.batch(t)
                train = gradients(state, params, x[batch], y[batch])
                expected -= float(log.lr[t, group]) * (test @ train.mean(0))
        assert expected.abs().max() > 1e-4
        torch.testing.assert_close(result.effects["test"][name], expected, rtol=2e-4, atol=1e-7)
    rates = traj.steps("a").lr[0]
    assert len(rates) == 2 and rates[0] != rates[1]  # stage a: two groups at their own rates
    assert result.seconds["test"] > 0
    assert result.to_json()["mean_effects"]["test"]["b"] == pytest.approx(
        float(result.effects["test"]["b"].mean())
    )


def test_gradsim_has_the_sign_and_size_of_retraining_at_tiny_rates():
    errors = []
    for lr in (1e-2, 1e-3):
        traj = record(a=stage(1, lr=lr, steps=1), b=stage(2, lr=lr, steps=1))
        estimated = peers.gradsim(traj, queries())
        model = final_model(traj)
        final = model.values(*TEST, "loss")
        for name in ("a", "b"):
            truth = final - model.at(skip_stage(traj, name).state).values(*TEST, "loss")
            effect = estimated.effects["test"][name]
            assert torch.equal(effect.sign(), truth.sign())  # < 0: the stage lowered the loss
            errors.append(float((effect - truth).abs().max() / truth.abs().max()))
    assert max(errors[:2]) < 0.05
    assert max(errors[2:]) < max(errors[:2]) / 5  # first order: the error shrinks with the rate


def test_ekfac_tends_to_the_rate_weighted_gradient_product_over_the_damping(tmp_path):
    lora = [{"kind": "add_lora", "modules": ["fc1"], "rank": 2, "alpha": 4}]
    traj = record(
        a=stage(1, lr=0.3, steps=4),
        b=stage(2, lr=0.2, steps=2, batch_size=6, entry=lora, trainable=["*.lora_*", "head.*"]),
    )
    state = {**traj.checkpoint("b", "end"), "fc1.scale": torch.tensor(4 / 2)}
    merged = peers.merged_final_model(traj)
    torch.testing.assert_close(merged(TEST[0]), logits(state, TEST[0]))  # the adapter merged
    damping = 1e4
    result = peers.ekfac(traj, queries(), damping=damping, fit_examples=64, batch_size=16)
    # the merged weights as the parameters Kronfluence attributes
    merged_state = {n: p.detach() for n, p in merged.named_parameters()}
    names = list(merged_state)
    test = gradients(merged_state, names, *TEST)
    rates = {"a": 0.3, "b": 0.2}
    mass = 0.3 * 4 + 0.2 * 2
    assert result.settings["lr_mass"] == pytest.approx(mass)
    for k, name in enumerate(["a", "b"]):
        log = traj.steps(k)
        x, y = blobs(seed=k + 1).tensors
        expected = torch.zeros(len(TEST[1]), dtype=torch.float64)
        for t in range(log.num_steps):
            batch = log.batch(t)
            train = gradients(merged_state, names, x[batch], y[batch])
            expected -= rates[name] / len(batch) * (test @ train.sum(0))
        expected /= mass * damping
        assert expected.abs().max() > 1e-7
        torch.testing.assert_close(
            result.effects["test"][name], expected, rtol=0.01, atol=0.01 * expected.abs().max()
        )


def test_ekfac_stage_sum_is_the_weighted_sum_of_kronfluences_pairwise_scores(tmp_path):
    traj = record(a=stage(1, lr=0.3, steps=5), b=stage(2, lr=0.1, steps=3, batch_size=4))
    result = peers.ekfac(
        traj, queries("margin"), fit_examples=48, batch_size=16, output_dir=tmp_path
    )
    model = peers.merged_final_model(traj)
    from kronfluence.analyzer import prepare_model
    from kronfluence.arguments import ScoreArguments

    task = peers.kronfluence_task("margin")
    analyzer = peers.analyzer_for(prepare_model(model, task), task, tmp_path)
    mass = result.settings["lr_mass"]
    for k, name in enumerate(["a", "b"]):
        examples = peers.stage_examples(traj, k)
        # each distinct example once, weighted by its rate over its batch size
        batches = torch.cat([traj.steps(k).batch(t) for t in range(traj.steps(k).num_steps)])
        assert torch.equal(examples.indices, torch.unique(batches))
        rate = traj.steps(k).lr[0, 0]
        counts = torch.stack([(batches == i).sum() for i in examples.indices])
        size = 8 if k == 0 else 4
        torch.testing.assert_close(examples.weights, (counts * rate / size).float())
        unweighted = peers.Examples(examples.dataset, examples.indices, torch.ones(len(counts)))
        analyzer.compute_pairwise_scores(
            scores_name=f"check{k}",
            factors_name=peers.FACTORS,
            query_dataset=TensorDataset(*TEST),
            train_dataset=unweighted,
            per_device_query_batch_size=16,
            per_device_train_batch_size=16,
            score_args=ScoreArguments(
                damping_factor=None
            ),  # ekfac's default: Kronfluence's heuristic
            overwrite_output_dir=True,
        )
        pairwise = analyzer.load_pairwise_scores(f"check{k}")["all_modules"].double()
        assert pairwise.shape == (len(TEST[1]), len(counts))
        expected = -(pairwise @ examples.weights.double()) / mass
        assert expected.abs().max() > 1e-6
        torch.testing.assert_close(
            result.effects["test"][name], expected, rtol=1e-3, atol=1e-4 * expected.abs().max()
        )


def test_check_peers_refuses_before_any_work(monkeypatch):
    with pytest.raises(SpecError, match=r"unknown peers.*Fix: use gradsim and/or ekfac"):
        peers.check_peers(["gradsim", "trak"], {})
    with pytest.raises(SpecError, match=r"peer_settings\.trak: is not a peer"):
        peers.check_peers(["gradsim"], {"trak": {}})
    peers.check_peers(["gradsim"], {"ekfac": {"damping": 1.0}})  # the config's, ekfac not run
    with pytest.raises(SpecError, match=r"unknown settings \['rank'\]"):
        peers.check_peers(["ekfac"], {"ekfac": {"rank": 3}})
    with pytest.raises(SpecError, match="fit_examples: 0 is not a positive integer"):
        peers.check_peers(["ekfac"], {"ekfac": {"fit_examples": 0}})
    with pytest.raises(SpecError, match=r"damping: -1\.0 is not a positive number"):
        peers.check_peers(["ekfac"], {"ekfac": {"damping": -1.0}})
    peers.check_peers(["gradsim", "ekfac"], {"ekfac": {"damping": None, "seed": 3}})
    monkeypatch.setitem(sys.modules, "kronfluence.analyzer", None)  # as if not installed
    peers.check_peers(["gradsim"], {})
    with pytest.raises(SpecError, match=r"needs Kronfluence.*--no-deps kronfluence==1\.0\.1"):
        peers.check_peers(["gradsim", "ekfac"], {})


@pytest.mark.parametrize(
    "hide, peers_option, message",
    [
        (False, "peers=[gradsim,trak]", "unknown peers ['trak']"),
        (True, "peers=[gradsim,ekfac]", "the ekfac peer needs Kronfluence"),
    ],
    ids=["unknown", "kronfluence-missing"],
)
def test_the_fidelity_run_exits_2_and_writes_nothing(tmp_path, hide, peers_option, message):
    run_dir = tmp_path / "run"
    argv = ["experiment=fidelity", "preset=fidelity_smoke", peers_option]
    argv.append(f"hydra.run.dir={run_dir}")
    hidden = "sys.modules['kronfluence.analyzer'] = None; " if hide else ""
    script = f"import runpy, sys; {hidden}sys.argv = ['run', *{argv!r}]; "
    script += "runpy.run_module('experiments.run', run_name='__main__', alter_sys=True)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Fix:" in done.stderr
    assert "Traceback" not in done.stderr
    assert not run_dir.exists()

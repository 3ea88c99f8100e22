"""The text transformer: its attention against torch's fused kernel, padding, derivatives
(forward mode, reverse mode, second order) against finite differences, the functional optimizer
step against torch.optim, and LoRA adapters on its projections."""

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vjp

from attribution.record.entry import LoRALinear, apply_entry
from attribution.record.optim import HYPERPARAMETERS, build_optimizer
from attribution.record.spec import EntryAction
from estimators.functional import StepRule
from experiments.models import TextTransformer

KWARGS = {"vocab_size": 50, "max_len": 12, "dim": 16, "heads": 2, "layers": 2, "hidden": 24}
LORA = ("*.attn.query", "*.attn.value", "*.up", "*.down")


def model_and_batch(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = TextTransformer(**KWARGS).to(dtype)
    tokens = torch.randint(2, 50, (6, 12))
    for i, length in enumerate([12, 9, 5, 3, 1, 7]):  # padded tails of different lengths
        tokens[i, length:] = 0
    return model, tokens, torch.tensor([0, 1, 1, 0, 1, 0])


def test_attention_equals_torch_scaled_dot_product_attention():
    model, tokens, _ = model_and_batch()
    attention = model.blocks[0].attn
    x = torch.randn(6, 12, 16)
    keep = tokens != 0
    n, length, dim = x.shape

    def split(t):
        return t.reshape(n, length, 2, dim // 2).transpose(1, 2)

    q, k, v = (split(p(x)) for p in (attention.query, attention.key, attention.value))
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    expected = attention.out(fused.transpose(1, 2).reshape(n, length, dim))
    torch.testing.assert_close(attention(x, keep), expected, rtol=1e-5, atol=1e-6)


def test_padding_does_not_change_the_logits():
    model, tokens, _ = model_and_batch()
    short = tokens[:, :7]  # rows 2-5 hold at most 7 tokens: only padding is cut from them
    logits_long, logits_short = model(tokens), model(short)
    torch.testing.assert_close(logits_long[2:], logits_short[2:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits_long[:2], logits_short[:2])  # rows 0, 1 lost words
    assert sum(p.numel() for p in TextTransformer().parameters()) < 1_000_000


def test_forward_reverse_and_second_derivatives_against_finite_differences():
    model, tokens, labels = model_and_batch(torch.float64)
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    direction = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}

    def loss(point):
        return F.cross_entropy(functional_call(model, point, (tokens,)), labels)

    def moved(eps):
        return {n: p + eps * direction[n] for n, p in params.items()}

    eps = 1e-5
    finite = (loss(moved(eps)) - loss(moved(-eps))) / (2 * eps)
    _, forward = jvp(loss, (params,), (direction,))
    torch.testing.assert_close(forward, finite, rtol=1e-6, atol=1e-9)
    _, pull = vjp(loss, params)
    (reverse,) = pull(torch.tensor(1.0, dtype=torch.float64))
    dot = sum((reverse[n] * direction[n]).sum() for n in params)
    torch.testing.assert_close(dot, finite, rtol=1e-6, atol=1e-9)
    # second order: forward-over-reverse Hessian-vector product against differenced gradients
    _, hvp = jvp(grad(loss), (params,), (direction,))
    g_plus, g_minus = grad(loss)(moved(eps)), grad(loss)(moved(-eps))
    for n in params:
        torch.testing.assert_close(
            hvp[n], (g_plus[n] - g_minus[n]) / (2 * eps), rtol=1e-4, atol=1e-7
        )
    # reverse-over-reverse (double backward, what the fused kernel lacks on the CPU)
    live = {n: p.clone().requires_grad_() for n, p in params.items()}
    first = torch.autograd.grad(loss(live), list(live.values()), create_graph=True)
    slope = sum((g * direction[n]).sum() for g, n in zip(first, live, strict=True))
    second = torch.autograd.grad(slope, list(live.values()))
    for g, n in zip(second, live, strict=True):
        torch.testing.assert_close(g, hvp[n], rtol=1e-8, atol=1e-10)


def test_functional_adamw_step_matches_torch_optim_on_the_model():
    model, tokens, labels = model_and_batch()
    names = [n for n, _ in model.named_parameters()]
    hyper = {**HYPERPARAMETERS["adamw"], "weight_decay": 0.01}
    optimizer = build_optimizer("adamw", [(list(model.parameters()), {"lr": 1e-3, **hyper})])
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = grad(lambda p: F.cross_entropy(functional_call(model, p, (tokens,)), labels))(params)
    F.cross_entropy(model(tokens), labels).backward()
    for n, p in model.named_parameters():  # the same gradients reach both
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-6, atol=1e-7)
    optimizer.step()
    rule = StepRule("adamw", dict.fromkeys(names, hyper))
    state = rule.init_state(params, {})
    stepped, _ = rule.step(params, state, grads, dict.fromkeys(names, 1e-3), rule.fresh({}))
    for n, p in model.named_parameters():
        torch.testing.assert_close(stepped[n], p.detach(), rtol=1.3e-6, atol=1e-6)
        assert not torch.equal(stepped[n], params[n])


def test_lora_adapters_wrap_the_projections_without_changing_the_function():
    model, tokens, _ = model_and_batch()
    before = model(tokens)
    apply_entry(model, EntryAction(kind="add_lora", modules=LORA, rank=2, alpha=4.0, seed=3))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == [
        f"blocks.{i}.{p}" for i in range(2) for p in ("attn.query", "attn.value", "up", "down")
    ]
    torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)  # B starts at zero
    names = {n for n, _ in model.named_parameters()}
    assert {"blocks.0.attn.query.weight", "blocks.0.attn.query.lora_A"} <= names

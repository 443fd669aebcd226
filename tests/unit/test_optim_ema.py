"""Optimizer parameter groups, learning-rate schedule, EMA."""

import copy
import math

import pytest
import torch

from moedit.config import TrainConfig, from_dict
from moedit.models import build_model
from moedit.train.ema import EMA
from moedit.train.optim import build_optimizer, lr_at, param_groups


def small_model():
    cfg = from_dict({"model": {"preset": "micro", "image_size": 8, "patch_size": 2, "qk_norm": True,
                               "moe": {"num_experts": 2, "router": {"top_k": 1, "selection_bias": True}}}})
    return build_model(cfg.model)


def test_no_weight_decay_on_norms_biases_embeddings():
    model = small_model()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "y_embedder.embedding_table.weight" in no_decay_names
    assert any(n.endswith("q_norm.weight") for n in no_decay_names)
    assert all(not n.endswith(".bias") for n in decay_names)
    assert "blocks.0.moe.experts.w1_EDH" in decay_names and "blocks.0.moe.experts.b1_EH" in no_decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_parameters_stay_float32_after_a_bf16_autocast_step():
    model = small_model()
    opt = build_optimizer(model, TrainConfig(lr=1e-2), torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    out.float().square().mean().backward()
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule(schedule):
    cfg = TrainConfig(steps=1000, warmup_steps=100, lr=1e-3, lr_schedule=schedule, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert lr_at(99, cfg) == pytest.approx(1e-3)
    lrs = [lr_at(s, cfg) for s in range(100, 1000)]
    if schedule == "constant":
        assert all(v == 1e-3 for v in lrs)
    else:
        assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
        assert all(a >= b for a, b in zip(lrs, lrs[1:]))
        assert lr_at(550, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 450 / 899)))


def test_ema_ramp_and_buffers():
    model = small_model()
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.blocks[0].moe.router.bias_E.fill_(0.5)
    before = {n: p.clone() for n, p in ema.model.named_parameters()}
    ema.update(model)  # first update: d = min(0.99, 1/10) = 0.1
    for n, p in ema.model.named_parameters():
        target = dict(model.named_parameters())[n]
        assert torch.allclose(p, 0.1 * before[n] + 0.9 * target.detach(), atol=1e-6)
    assert torch.equal(ema.model.blocks[0].moe.router.bias_E, torch.full((2,), 0.5))
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training


def test_cpu_optimizer_is_the_fused_kernel_and_agrees_with_the_foreach_reference():
    """build_optimizer takes AdamW's fused kernel on CPU (the fast path); five steps of it on the same
    gradients land where the foreach AdamW (the reference) does, weight-decay groups included."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    cfg = TrainConfig(lr=3e-2, weight_decay=0.1, betas=[0.9, 0.95])
    fast = build_optimizer(model, cfg, torch.device("cpu"))
    assert all(group["fused"] for group in fast.param_groups)
    reference = torch.optim.AdamW(param_groups(twin, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), foreach=True)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for net, opt in ((model, fast), (twin, reference)):
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for a, b, a0 in zip(model.parameters(), twin.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert (a - a0).abs().min() > 1e-3  # every weight moved: the comparison is not of two idle copies

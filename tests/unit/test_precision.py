"""The bf16 trap (docs/PRECISION.md): lost-update accounting, parameter groups, stochastic rounding,
bf16 parameter storage with its remedies, config validation, and exact resume with bf16 weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from moedit.config import ConfigError, TrainConfig, from_dict
from moedit.diagnostics.precision import (
    PrecisionMonitor,
    bf16_lost_mask,
    bf16_ulp,
    counts_to_metrics,
    param_group,
    update_counts,
)
from moedit.models import build_model
from moedit.train import checkpoint as ckpt
from moedit.train.bf16 import Bf16StorageOptimizer, stochastic_round_bf16, store_parameters
from moedit.train.ema import EMA
from moedit.train.metrics import read_metrics
from moedit.train.optim import build_optimizer
from moedit.train.trainer import Trainer

torch.set_num_threads(2)
BF16 = torch.bfloat16
ULP_1_5 = 2.0**-7  # bf16 spacing in [1, 2)


# ----------------------------------------------------------------------------- ulp and lost updates


def test_bf16_ulp_values():
    w = torch.tensor([1.0, 1.5, -3.0, 0.1, 0.0])
    expected = torch.tensor([2.0**-7, 2.0**-7, 2.0**-6, 2.0**-11, 2.0**-133])
    assert torch.equal(bf16_ulp(w), expected)


def test_update_below_half_ulp_is_lost_above_is_kept():
    w_old = torch.full((5,), 1.5)
    dw = torch.tensor([0.4, 0.6, -0.4, -0.6, 0.0]) * ULP_1_5
    assert bf16_lost_mask(w_old, dw).tolist() == [True, False, True, False, False]  # zero: not lost
    # at a power of two the grid below is twice as fine: −0.4 ulp(1) is 0.8 of the step down, kept
    assert not bf16_lost_mask(torch.tensor([1.0]), torch.tensor([-0.4 * ULP_1_5])).item()


def test_update_counts_and_metrics_on_hand_built_tensors():
    w_old = torch.full((5,), 1.5).to(BF16)
    dw = torch.tensor([0.4, 0.6, -0.4, -0.6, 0.0]) * ULP_1_5
    w_intended = w_old.float() + dw
    w_new = w_intended.to(BF16)  # round to nearest: what bf16 storage keeps
    moved, zero, lost_bf16, lost, kept_num, kept_den = update_counts(w_old, w_intended, w_new).tolist()
    assert (moved, zero, lost_bf16, lost) == (4, 1, 2, 2)
    assert kept_num == pytest.approx(2 * ULP_1_5) and kept_den == pytest.approx(2.0 * ULP_1_5)
    metrics = counts_to_metrics("router", [moved, zero, lost_bf16, lost, kept_num, kept_den])
    assert metrics == {"update_zero/router": 0.2, "bf16_lost/router": 0.5, "update_lost/router": 0.5,
                       "update_kept/router": pytest.approx(1.0)}
    # float32 storage keeps everything; bf16_lost still says what bf16 would have lost
    counts = update_counts(w_old.float(), w_intended, w_intended).tolist()
    assert counts[2:4] == [2, 0] and counts[4] == pytest.approx(counts[5])
    assert counts_to_metrics("rest", [0, 7, 0, 0, 0, 0]) == {"update_zero/rest": 1.0}  # nothing moved


# ----------------------------------------------------------------------------- parameter groups


def tiny_cfg(router: str, **train):
    moe = {"num_experts": 2, "num_shared": 1, "router": {"name": router, "top_k": 1}}
    return from_dict({"model": {"preset": "micro", "image_size": 8, "patch_size": 2, "class_dropout": 0.5,
                                "moe": moe}, "train": train})


@pytest.mark.parametrize("router", ["topk", "expert_choice", "diffmoe", "race", "promoe"])
def test_param_groups_of_every_router(router):
    model = build_model(tiny_cfg(router).model)
    groups = {name: param_group(name) for name, _ in model.named_parameters()}
    assert groups["blocks.0.moe.experts.w1_EDH"] == "experts" and groups["blocks.1.moe.shared.b2_ED"] == "experts"
    assert groups["blocks.0.attn.qkv.weight"] == "rest" and groups["y_embedder.embedding_table.weight"] == "rest"
    routing = {n for n, g in groups.items() if g in ("router", "prototypes")}
    assert routing and all(".moe.router." in n for n in routing)
    if router == "promoe":
        assert groups["blocks.0.moe.router.prototypes_ED"] == "prototypes"
    else:
        assert groups["blocks.0.moe.router.gate.net.head.weight"] == "router"
    if router == "race":
        assert groups["blocks.0.moe.router.target_head.weight"] == "router"
    if router == "diffmoe":
        assert groups["blocks.0.moe.router.predictor.fc1.weight"] == "router"


# ----------------------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    x = torch.tensor([1.5 + 0.3 * ULP_1_5, -1.5 - 0.7 * ULP_1_5, 1e-3 + 1e-7]).repeat(20_000, 1)
    rounded = stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(rounded[:, 0].unique().tolist()) == {1.5, 1.5 + ULP_1_5}  # the two neighbours only
    assert torch.allclose(rounded.mean(0), x[0], rtol=0, atol=0.02 * ULP_1_5)
    exact = torch.tensor([1.5, -2.0, 0.0, float("inf"), float("-inf")])
    assert torch.equal(stochastic_round_bf16(exact).float(), exact)
    assert stochastic_round_bf16(torch.tensor([float("nan")])).isnan().all()


def test_stochastic_rounding_is_deterministic_under_a_seed():
    x = torch.randn(1000)
    a, b = (stochastic_round_bf16(x, torch.Generator().manual_seed(7)) for _ in range(2))
    c = stochastic_round_bf16(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tiny_updates_survive_stochastic_rounding_in_expectation():
    """400 updates of 0.05 ulp: lost entirely to round-to-nearest, ≈ 20 ulp of drift under SR."""
    generator = torch.Generator().manual_seed(1)
    nearest = stochastic = torch.full((256,), 1.5, dtype=BF16)
    for _ in range(400):
        nearest = (nearest.float() + 0.05 * ULP_1_5).to(BF16)
        stochastic = stochastic_round_bf16(stochastic.float() + 0.05 * ULP_1_5, generator)
    assert torch.all(nearest == 1.5)
    assert (stochastic.float().mean().item() - 1.5) / ULP_1_5 == pytest.approx(20.0, abs=1.5)


# ----------------------------------------------------------------------------- bf16 storage


def one_step(model, optimizer, monitor=None) -> None:
    x = torch.randn(4, 1, 8, 8)
    with torch.autocast("cpu", dtype=BF16):
        out = model(x, torch.rand(4), torch.tensor([0, 1, 2, 10]), target=x)
        loss = out.float().square().mean() + sum(v.float() for v in model.aux_losses().values())
    loss.backward()
    if monitor is not None:
        monitor.before_step(0)
    optimizer.step()
    if monitor is not None:
        monitor.after_step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("stochastic", [False, True])
def test_pure_bf16_step_keeps_dtypes_and_float32_moments(stochastic):
    cfg = tiny_cfg("race", precision="bf16", param_dtype="bf16", router_fp32=False, stochastic_rounding=stochastic)
    model = build_model(cfg.model)
    store_parameters(model, cfg.train, BF16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"), seed=0)
    assert isinstance(optimizer, Bf16StorageOptimizer)
    monitor = PrecisionMonitor(model, 1, optimizer.intended_value)
    one_step(model, optimizer, monitor)
    assert all(p.dtype == BF16 and p.grad is None for p in model.parameters())
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if b.is_floating_point())
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(param_group(n) == "router" for n in moved) and any(param_group(n) == "rest" for n in moved)
    metrics = monitor.read()
    assert 0.0 <= metrics["update_lost/router"] <= 1.0 and "bf16_lost/rest" in metrics
    assert monitor.read() == {}  # reset after reading


@pytest.mark.parametrize("router", ["topk", "promoe"])
def test_router_fp32_keeps_router_float32_and_experts_bf16(router):
    cfg = tiny_cfg(router, precision="bf16", param_dtype="bf16")  # router_fp32 defaults to true
    model = build_model(cfg.model)
    store_parameters(model, cfg.train, BF16)
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    ema = EMA(model, 0.9)
    one_step(model, optimizer)
    for name, param in model.named_parameters():
        routing = param_group(name) in ("router", "prototypes")
        assert param.dtype == (torch.float32 if routing else BF16), name
    ema.update(model)
    assert all(p.dtype == torch.float32 for p in ema.model.parameters())


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("train, message", [
    ({"param_dtype": "fp16"}, "train.param_dtype"),
    ({"param_dtype": "bf16", "precision": "fp32"}, "set train.precision=bf16"),
    ({"stochastic_rounding": True}, "train.stochastic_rounding=true"),
    ({"router_fp32": False}, "train.router_fp32=false"),
    ({"bf16_monitor_every": -1}, "train.bf16_monitor_every"),
])
def test_impossible_precision_combinations_are_rejected(train, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"train": train})


def test_bf16_storage_with_float32_compute_is_rejected_at_build():
    model = build_model(tiny_cfg("topk").model)
    with pytest.raises(ConfigError, match="auto is float32 on CPU"):
        store_parameters(model, TrainConfig(param_dtype="bf16"), None)


# ----------------------------------------------------------------------------- trainer and checkpoints


def trainer_config(out_dir, **train) -> dict:
    return {
        "seed": 1,
        "model": {"preset": "micro", "image_size": 8, "patch_size": 2,
                  "moe": {"num_experts": 2, "num_shared": 1, "router": {"name": "promoe", "top_k": 1}}},
        "data": {"name": "synthetic", "image_size": 8},
        "train": {"out_dir": str(out_dir), "steps": 2, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1,
                  "ckpt_every": 1, "log_every": 1, "ema_decay": 0.9, "precision": "bf16", "param_dtype": "bf16",
                  "router_fp32": False, "stochastic_rounding": True, "bf16_monitor_every": 1, **train},
        "sample": {"steps": 1, "per_class": 1},
    }


def test_bf16_checkpoint_round_trip_resumes_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(from_dict(trainer_config(straight)), progress=False).train()
    Trainer(from_dict(trainer_config(split, steps=1)), progress=False).train()
    Trainer(from_dict(trainer_config(split)), resume=True, progress=False).train()
    for name in ("model.safetensors", "ema.safetensors", "trainer.safetensors"):
        a, b = (load_file(str(ckpt.list_checkpoints(d / "checkpoints")[-1] / name)) for d in (straight, split))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        if name == "model.safetensors":
            assert a["blocks.0.moe.experts.w1_EDH"].dtype == BF16
            assert a["blocks.0.moe.router.prototypes_ED"].dtype == BF16
        if name == "ema.safetensors":
            assert a["blocks.0.moe.experts.w1_EDH"].dtype == torch.float32
    logged = read_metrics(straight / "metrics.jsonl")
    assert all(f"bf16_lost/{g}" in logged[-1] for g in ("prototypes", "experts", "rest"))
    assert "update_lost/prototypes" in logged[-1] and "update_kept/experts" in logged[-1]

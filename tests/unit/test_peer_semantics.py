"""The peers' semantics where moedit used to differ (issue: faithful to the peers): DiT-MoE's position
table, the EfficientMoE recipe's rotate-half RoPE pairing, facebookresearch/DiT's guidance of the first
latent channels only, top-1 weights that stay trainable, DiffMoE's SiLU predictor and its threshold that
starts at 0. Each reference below is written from the equations, not from any peer's code."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moedit.config import ConfigError, MoEConfig, RouterConfig, from_dict
from moedit.models.embed import Rope2D
from moedit.moe.routers.diffmoe import DiffMoERouter
from moedit.moe.routers.topk import TopKRouter
from moedit.moe.routing import RoutingContext
from moedit.samplers.guidance import classifier_free_guidance

pytestmark = pytest.mark.usefixtures("one_thread")


def _preset(name: str):
    return from_dict({"model": {"preset": name}}).model


@pytest.mark.parametrize("name", ["DiT-MoE-S/2-8E2A", "DiT-MoE-XL/2-8E2A", "DiT-MoE-G/2-16E2A", "ProMoE-S/2",
                                  "ProMoE-XL/2", "DiffMoE-L-E16", "Race-DiT-XL/2-4in32", "DiT-XL/2", "DiT-S/4"])
def test_presets_named_after_dit_based_papers_use_dits_columns_first_position_table(name):
    assert _preset(name).pos_embed == "sincos_wh"


@pytest.mark.parametrize("name", ["DSMoE-S-E16", "DSMoE-3B-E16"])
def test_dsmoe_presets_use_the_recipes_rotate_half_rope(name):
    model = _preset(name)
    assert (model.pos_embed, model.rope_pairing) == ("rope", "rotate_half")


# ----------------------------------------------------------------------------- 2-D RoPE pairings


def _angles(grid: int, d: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column angle of every token (row-major) and frequency j < d/4: pos · θ^(−j/(d/4))."""
    q = d // 4
    freq = torch.tensor([theta ** (-j / q) for j in range(q)], dtype=torch.float64)
    rows = torch.arange(grid, dtype=torch.float64).repeat_interleave(grid)
    cols = torch.arange(grid, dtype=torch.float64).repeat(grid)
    return rows[:, None] * freq, cols[:, None] * freq


def _rotate(a, b, angle):
    return a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()


def _reference_rope(x_LD: torch.Tensor, grid: int, pairing: str) -> torch.Tensor:
    """Channels [0, d/2) rotate by the row, [d/2, d) by the column; inside each half the pairs are
    (x_2j, x_2j+1) (adjacent) or (x_j, x_j+d/4) (rotate_half, the recipe's GPT-NeoX-style pairing)."""
    L, d = x_LD.shape
    q, out = d // 4, x_LD.double().clone()
    for half, angle in zip((0, d // 2), _angles(grid, d)):
        for j in range(q):
            i1, i2 = (half + 2 * j, half + 2 * j + 1) if pairing == "adjacent" else (half + j, half + j + q)
            out[:, i1], out[:, i2] = _rotate(x_LD[:, i1].double(), x_LD[:, i2].double(), angle[:, j])
    return out


@pytest.mark.parametrize("pairing", ["adjacent", "rotate_half"])
def test_rope_pairings_match_their_equations(pairing):
    grid, d = 3, 16
    x_BHLd = torch.randn(2, 2, grid * grid, d)
    got = Rope2D(d, grid, pairing=pairing)(x_BHLd)
    for b in range(2):
        for h in range(2):
            torch.testing.assert_close(got[b, h].double(), _reference_rope(x_BHLd[b, h], grid, pairing),
                                       rtol=1e-5, atol=1e-5)


def test_the_two_pairings_are_one_permutation_apart_but_not_interchangeable():
    grid, d = 4, 8
    x = torch.randn(1, 1, grid * grid, d)
    adjacent, half = Rope2D(d, grid), Rope2D(d, grid, pairing="rotate_half")
    assert not torch.allclose(adjacent(x), half(x))  # a checkpoint's attention ports only with its own
    perm = half.order_d  # rotate_half's pairs laid out adjacently
    torch.testing.assert_close(half(x)[..., perm], adjacent(x[..., perm]))


def test_an_unknown_pairing_is_a_config_error():
    with pytest.raises(ConfigError, match="model.rope_pairing='neox' is not valid; choose one of: adjacent, rotate_half"):
        from_dict({"model": {"pos_embed": "rope", "rope_pairing": "neox"}})


# ----------------------------------------------------------------------------- guidance channels


def _fake_model(x_BCHW, t_B, y_B):
    """A prediction whose every channel depends on the label (null label 10 → the unconditional one)."""
    return x_BCHW * (1.0 + y_B.float().view(-1, 1, 1, 1)) + torch.arange(x_BCHW.shape[1]).view(1, -1, 1, 1)


def test_guiding_the_first_channels_only_is_dits_sampling():
    x, t, y = torch.randn(2, 4, 3, 3), torch.rand(2), torch.tensor([1, 7])
    s, null = 4.0, 10
    cond, uncond = _fake_model(x, t, y), _fake_model(x, t, torch.full_like(y, null))
    everything = classifier_free_guidance(_fake_model, s, null)(x, t, y)
    torch.testing.assert_close(everything, uncond + s * (cond - uncond))  # moedit's default: all channels
    dit = classifier_free_guidance(_fake_model, s, null, channels=3)(x, t, y)
    # facebookresearch/DiT: ε guided on the first 3 of 4 latent channels, the 4th the conditional prediction
    torch.testing.assert_close(dit[:, :3], (uncond + s * (cond - uncond))[:, :3])
    torch.testing.assert_close(dit[:, 3:], cond[:, 3:])


def test_cfg_channels_beyond_the_image_channels_are_refused():
    with pytest.raises(ConfigError, match="sample.cfg_channels=2 must be between 1 and model.in_channels=1"):
        from_dict({"sample": {"cfg_channels": 2}})
    assert from_dict({"model": {"in_channels": 4}, "sample": {"cfg_channels": 3}}).sample.cfg_channels == 3


# ----------------------------------------------------------------------------- top-1 weights


def _top1(**kw) -> TopKRouter:
    torch.manual_seed(0)
    return TopKRouter(8, 4, RouterConfig(gate="linear", score="softmax", top_k=1, normalize=True, **kw))


def test_top1_with_normalize_keeps_the_score_so_the_gate_learns_from_the_output():
    router = _top1()
    x = torch.randn(6, 8)
    routing = router(x, RoutingContext(batch=1, seq_len=6))
    probs = torch.softmax(router.gate(x, RoutingContext(batch=1, seq_len=6)), -1)
    torch.testing.assert_close(routing.weight_M, probs[routing.token_M, routing.expert_M])
    routing.weight_M.sum().backward()  # a loss through the weights alone reaches the gate
    assert router.gate.net.head.weight.grad.abs().sum() > 0
    assert "has no effect with top_k=1" in TopKRouter.config_warnings(MoEConfig(router=router.cfg))[0]


def test_normalize_top1_is_the_exact_conversion_option_and_is_warned_about():
    router = _top1(normalize_top1=True)
    routing = router(torch.randn(6, 8), RoutingContext(batch=1, seq_len=6))
    assert torch.equal(routing.weight_M, torch.ones(6))  # weight ≡ scale: exact top-1 upcycling ...
    assert "gets no gradient from the output" in TopKRouter.config_warnings(MoEConfig(router=router.cfg))[0]


def test_top2_still_renormalises():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, RouterConfig(gate="linear", score="softmax", top_k=2, normalize=True))
    routing = router(torch.randn(5, 8), RoutingContext(batch=1, seq_len=5))
    torch.testing.assert_close(routing.weight_M.view(5, 2).sum(-1), torch.ones(5))


# ----------------------------------------------------------------------------- DiffMoE


def _diffmoe() -> DiffMoERouter:
    torch.manual_seed(1)
    return DiffMoERouter(8, 4, RouterConfig(name="diffmoe", capacity=1.0))


def test_diffmoes_capacity_predictor_uses_silu():
    router, x = _diffmoe(), torch.randn(5, 8)
    p = router.predictor
    torch.testing.assert_close(p(x), p.fc2(F.silu(p.fc1(x))))
    assert not torch.allclose(p(x), p.fc2(F.gelu(p.fc1(x))))


def test_diffmoes_threshold_starts_at_zero_and_blends_five_percent_per_step():
    router = _diffmoe().train()
    ctx = RoutingContext(batch=2, seq_len=4)
    assert router.threshold.value_X.tolist() == [0.0] * 4  # untrained: every token to every expert
    values = []
    for step in range(3):
        x = torch.randn(8, 8)
        router(x, ctx)
        values.append(torch.sigmoid(router.predictor(x)).topk(2, dim=0).values[-1].detach())  # C = 8/4 = 2
        router.after_optimizer_step()
    expected = torch.zeros(4)
    for v in values:
        expected = 0.95 * expected + 0.05 * v
    torch.testing.assert_close(router.threshold.value_X, expected)
    assert math.isclose(router.cfg.threshold_decay, 0.95)


# ----------------------------------------------------------------------------- DSMoE's dense blocks


def test_dsmoe_dense_blocks_are_the_released_silu_mlp():
    from moedit.models import build_model

    cfg = from_dict({"model": {"preset": "DSMoE-S-E16", "depth": 2, "width": 48, "heads": 2, "image_size": 8,
                               "in_channels": 1, "num_classes": 3}}).model
    assert (cfg.ffn, cfg.dense_ffn, cfg.mlp_ratio) == ("swiglu", "mlp_silu", 4.0)
    model = build_model(cfg)
    dense = model.blocks[0].mlp  # block 0 is dense (interleaved: odd blocks MoE)
    x = torch.randn(5, 48)
    torch.testing.assert_close(dense(x), F.linear(F.silu(F.linear(x, dense.fc1.weight, dense.fc1.bias)),
                                                  dense.fc2.weight, dense.fc2.bias))
    assert dense.fc1.weight.shape == (4 * 48, 48) and model.blocks[1].moe.experts.kind == "swiglu"


def test_an_expert_kind_moedit_lacks_is_a_config_error_and_conversion_refuses_mixed_kinds():
    from moedit.convert.dense import convert_dense
    from moedit.convert.keys import ConversionError
    from moedit.models import build_model

    with pytest.raises(ConfigError, match="model.ffn='mlp_silu' is not valid; choose one of: mlp, swiglu"):
        from_dict({"model": {"ffn": "mlp_silu", "moe": {"num_experts": 2}}})
    dense_cfg = from_dict({"model": {"preset": "micro", "image_size": 8, "patch_size": 2, "dense_ffn": "mlp_silu"}}).model
    with pytest.raises(ConversionError, match="dense_ffn=mlp_silu but experts would run model.ffn=mlp"):
        convert_dense(build_model(dense_cfg), dense_cfg, {"num_experts": 2, "expert_ratio": 4.0})


def test_diffmoes_released_inference_takes_the_best_scored_tokens_of_each_pool():
    torch.manual_seed(3)
    router = DiffMoERouter(8, 4, RouterConfig(name="diffmoe", capacity=1.0, capacity_inference="topk")).eval()
    with torch.no_grad():
        router.threshold.value_X.copy_(torch.tensor([0.3, 0.5, 0.55, 0.7]))
    B, L = 4, 5
    x = torch.randn(B * L, 8)
    labels = torch.tensor([1, 10, 2, 10])  # samples 1 and 3: null label (10) -> a pool of their own
    routing = router(x, RoutingContext(batch=B, seq_len=L, labels_B=labels, null_label=10))
    prob = torch.sigmoid(router.predictor(x)).detach()
    scores = torch.softmax(router.gate(x, RoutingContext(batch=B, seq_len=L)), -1).detach()
    want = set()
    for pool in ([0, 2], [1, 3]):  # DiffMoE's sampler: conditional and unconditional calls apart
        rows = torch.cat([torch.arange(b * L, (b + 1) * L) for b in pool])
        for e in range(4):
            k = int((prob[rows, e] > router.threshold.value_X[e]).sum())
            want |= {(int(rows[i]), e) for i in scores[rows, e].topk(k).indices}
    got = set(zip(routing.token_M.tolist(), routing.expert_M.tolist()))
    assert got == want and len(want) > 0
    threshold_rule = {(i, e) for i in range(B * L) for e in range(4) if prob[i, e] > router.threshold.value_X[e]}
    assert got != threshold_rule  # same counts per pool and expert, other tokens: the modes differ

"""DiT backbone: every configuration path builds and trains, presets, label dropout, adaLN-Zero,
auxiliary losses, patch layout and 2-D RoPE."""

from __future__ import annotations

import pytest
import torch

from moedit.config import ConfigError, ModelConfig, from_dict
from moedit.models import build_model
from moedit.models.dit import DiT, moe_block_indices
from moedit.models.embed import Rope2D, sincos_2d
from moedit.models.ffn import MLP, SwiGLU
from moedit.models.presets import MODEL_PRESETS, resolve_model_preset
from moedit.moe.dispatch import dispatch
from moedit.moe.layer import MoELayer
from moedit.moe.routing import RoutingContext

from model_helpers import wake_up  # tests/model_helpers.py

WIDTH = 32
BASE = dict(image_size=16, in_channels=1, patch_size=4, width=WIDTH, depth=2, heads=2, num_classes=10)
MOE = dict(num_experts=4, expert_ratio=2.0, router=dict(top_k=2))


def _model(seed: int = 0, **overrides) -> DiT:
    """Build through from_dict so the config is validated exactly as a run would."""
    cfg = from_dict({"model": {**BASE, **overrides}}).model
    torch.manual_seed(seed)
    return build_model(cfg)


def _moe(**kw) -> dict:
    router = {**MOE["router"], **kw.pop("router", {})}
    return {**MOE, **kw, "router": router}


def _inputs(model: DiT, B: int = 2, seed: int = 0):
    c, s = model.cfg.in_channels, model.cfg.image_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, c, s, s, generator=gen)
    t = torch.rand(B, generator=gen)
    y = torch.randint(model.cfg.num_classes, (B,), generator=gen)
    return x, t, y


def _train_step_grads(model: DiT, B: int = 2) -> torch.Tensor:
    """Forward + backward of a loss that includes the aux losses; checks every gradient."""
    model.train()
    x, t, y = _inputs(model, B)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    loss = out.square().mean() + sum(model.aux_losses().values(), torch.zeros(()))
    loss.backward()
    loads = {}
    for i, block in enumerate(model.blocks):
        if block.moe is not None:
            loads[f"blocks.{i}.moe.experts."] = block.moe.last_routing.load_E()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        prefix = next((k for k in loads if name.startswith(k)), None)
        if prefix is None:
            assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
        else:  # routed experts: exactly the experts that received tokens learn
            for e, load in enumerate(loads[prefix].tolist()):
                assert bool(p.grad[e].abs().sum() > 0) == (load > 0), (name, e, load)
    return out


CONFIGS = {
    "dense": {},
    "dense_swiglu": dict(ffn="swiglu"),
    "dense_rope": dict(pos_embed="rope"),
    "dense_qk_norm": dict(qk_norm=True),
    "dense_rope_qk_norm": dict(pos_embed="rope", qk_norm=True),
    "moe_all": dict(moe=_moe()),
    "moe_interleaved": dict(depth=4, moe=_moe(placement="interleaved")),
    "moe_swiglu": dict(ffn="swiglu", moe=_moe()),
    "moe_rope_qk_norm": dict(pos_embed="rope", qk_norm=True, moe=_moe()),
    "gate_mlp": dict(moe=_moe(router=dict(gate="mlp", gate_hidden=24))),
    "gate_cross_attn": dict(moe=_moe(router=dict(gate="cross_attn", gate_heads=2))),
    "score_sigmoid": dict(moe=_moe(router=dict(score="sigmoid", normalize=True, scale=2.5))),
    "score_identity": dict(moe=_moe(router=dict(score="identity"))),
    "top1": dict(moe=_moe(router=dict(top_k=1))),
    "shared_1": dict(moe=_moe(num_shared=1, shared_ratio=1.0, expert_ratio=0.5)),
    "shared_2_swiglu": dict(ffn="swiglu", moe=_moe(num_shared=2, shared_ratio=0.75, expert_ratio=0.5)),
    "selection_bias": dict(moe=_moe(router=dict(score="sigmoid", selection_bias=True))),
    "grouped": dict(moe=_moe(backend="grouped")),
    "deepseek_like": dict(ffn="swiglu", moe=_moe(num_shared=1, backend="grouped", router=dict(
        score="sigmoid", selection_bias=True, normalize=True, scale=2.5, gate="mlp"))),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_config_path_trains(name: str) -> None:
    model = wake_up(_model(**CONFIGS[name]))
    _train_step_grads(model)
    if model.cfg.moe is not None:
        assert set(model.aux_losses()) == {"balance", "z"}
        model.after_optimizer_step()


@pytest.mark.parametrize("name", ["dense", "moe_all", "gate_cross_attn"])
def test_batch_of_one(name: str) -> None:
    model = wake_up(_model(**CONFIGS[name]))
    _train_step_grads(model, B=1)


@pytest.mark.parametrize("patch", [2, 4, 7])
def test_patch_sizes_on_28px_rgb(patch: int) -> None:
    model = wake_up(_model(image_size=28, in_channels=3, patch_size=patch, moe=_moe()))
    assert model.grid == 28 // patch
    assert model.pos_embed.shape == (1, (28 // patch) ** 2, WIDTH)
    out = _train_step_grads(model)
    assert out.shape == (2, 3, 28, 28)


def test_wrong_input_shape_is_rejected() -> None:
    model = _model()
    with pytest.raises(ValueError, match="expects images"):
        model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        DiT(ModelConfig(**{**BASE, "patch_size": 5}))


def test_block_types_and_placement() -> None:
    dense = _model()
    assert all(b.moe is None and isinstance(b.mlp, MLP) for b in dense.blocks)
    assert dense.blocks[0].mlp.fc1.out_features == 4 * WIDTH
    assert dense.moe_layers() == [] and moe_block_indices(dense.cfg) == []
    assert isinstance(_model(ffn="swiglu").blocks[0].mlp, SwiGLU)

    every = _model(depth=3, moe=_moe())
    assert all(b.mlp is None and isinstance(b.moe, MoELayer) for b in every.blocks)
    assert len(every.moe_layers()) == 3

    inter = _model(depth=5, moe=_moe(placement="interleaved"))
    assert moe_block_indices(inter.cfg) == [1, 3]
    assert [b.moe is not None for b in inter.blocks] == [False, True, False, True, False]
    assert all((b.mlp is None) == (b.moe is not None) for b in inter.blocks)
    assert len(inter.moe_layers()) == 2


def test_expert_and_shared_widths() -> None:
    model = _model(ffn="swiglu", moe=_moe(num_experts=3, num_shared=2, expert_ratio=0.5, shared_ratio=1.5))
    layer = model.moe_layers()[0]
    assert (layer.experts.num_experts, layer.experts.hidden, layer.experts.kind) == (3, 16, "swiglu")
    assert (layer.shared.num_experts, layer.shared.hidden, layer.shared.kind) == (2, 48, "swiglu")
    assert layer.experts.w1_EDH.shape == (3, WIDTH, 16)
    assert layer.shared.w2_EHD.shape == (2, 48, WIDTH)
    default = _model(moe=_moe(num_shared=1, expert_ratio=0.75)).moe_layers()[0]
    assert default.shared.hidden == default.experts.hidden == 24  # shared_ratio None -> expert_ratio
    assert _model(moe=_moe()).moe_layers()[0].shared is None


def test_moe_layer_adds_every_shared_expert() -> None:
    model = _model(moe=_moe(num_shared=2, shared_ratio=1.0))
    layer = model.moe_layers()[0]
    x = torch.randn(2, 5, WIDTH)
    ctx = RoutingContext(batch=2, seq_len=5)
    out = layer(x, ctx)
    x_ND = x.reshape(10, WIDTH)
    expected = dispatch(x_ND, layer.last_routing, layer.experts, "loop")
    for s in range(2):
        expected = expected + layer.shared.forward_expert(s, x_ND)
    torch.testing.assert_close(out.reshape(10, WIDTH), expected)


def test_loop_and_grouped_backends_give_the_same_model() -> None:
    outs, grads = {}, {}
    reference = None
    for backend in ("loop", "grouped"):
        model = _model(ffn="swiglu", moe=_moe(backend=backend, num_shared=1, router=dict(score="sigmoid")))
        if reference is None:
            reference = wake_up(model).state_dict()
        else:
            model.load_state_dict(reference)
        model.eval()
        x, t, y = _inputs(model, B=3)
        outs[backend] = model(x, t, y)
        outs[backend].square().mean().backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    assert outs["loop"].abs().max() > 0
    torch.testing.assert_close(outs["grouped"], outs["loop"], rtol=1e-5, atol=1e-6)
    for name, g in grads["loop"].items():
        torch.testing.assert_close(grads["grouped"][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["dense", "moe_all", "shared_2_swiglu", "gate_cross_attn"])
def test_adaln_zero_init_outputs_exactly_zero(name: str) -> None:
    model = _model(**CONFIGS[name])
    x, t, y = _inputs(model)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0
    # adaLN-Zero: every block starts as the identity on its residual stream
    identity = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, args, out: identity.append(torch.equal(out, args[0])))
    model(x, t, y)
    assert identity == [True] * len(model.blocks)
    assert torch.count_nonzero(wake_up(model)(x, t, y)) > 0
    identity.clear()
    model(x, t, y)
    assert identity == [False] * len(model.blocks)


def test_aux_losses_sum_over_the_moe_layers_only() -> None:
    assert _model().aux_losses() == {}
    dense = _model()
    dense(*_inputs(dense))
    assert dense.aux_losses() == {}

    model = wake_up(_model(depth=4, moe=_moe(placement="interleaved")))
    assert model.aux_losses() == {}  # nothing before the first forward
    model(*_inputs(model))
    layers = model.moe_layers()
    assert len(layers) == 2
    aux = model.aux_losses()
    assert set(aux) == {"balance", "z"}
    for name in aux:
        values = [layer.last_routing.aux[name] for layer in layers]
        assert values[0].item() != pytest.approx(values[1].item())  # a real sum, not a copy
        assert aux[name].item() == pytest.approx(sum(v.item() for v in values), rel=1e-6)  # dense blocks add nothing
        assert sorted(model.aux_losses_by_layer()[name]) == [1, 3]  # interleaved: blocks 1 and 3 are MoE
        assert aux[name].requires_grad


def test_label_dropout_only_in_training() -> None:
    model = _model(class_dropout=0.999)
    null = model.null_label
    assert null == 10
    y = torch.randint(10, (2000,), generator=torch.Generator().manual_seed(0))
    model.train()
    dropped = model.y_embedder.drop(y)
    is_null = dropped == null
    assert is_null.float().mean() > 0.99
    assert torch.equal(dropped[~is_null], y[~is_null])  # kept labels are unchanged
    model.eval()
    assert torch.equal(model.y_embedder.drop(y), y)
    off = _model(class_dropout=0.0).train()
    assert torch.equal(off.y_embedder.drop(y), y)

    # and the forward pass really uses the dropped labels
    seen = []
    model.y_embedder.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    x, t, _ = _inputs(model, B=64)
    y64 = torch.randint(10, (64,))
    model.train()
    model(x, t, y64)
    assert (seen[-1] == null).float().mean() > 0.9
    model.eval()
    model(x, t, y64)
    assert torch.equal(seen[-1], y64)


@pytest.mark.parametrize("size,dims", [("S", (12, 384, 6)), ("B", (12, 768, 12)),
                                       ("L", (24, 1024, 16)), ("XL", (28, 1152, 16))])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_dit_presets(size: str, dims: tuple[int, int, int], patch: int) -> None:
    name = f"DiT-{size}/{patch}"
    assert name in MODEL_PRESETS
    resolved = resolve_model_preset({"preset": name})
    assert (resolved["depth"], resolved["width"], resolved["heads"], resolved["patch_size"]) == (*dims, patch)
    assert resolve_model_preset({"preset": name, "depth": 3, "heads": 2})["depth"] == 3


def test_preset_with_explicit_keys_through_from_dict() -> None:
    cfg = from_dict({"model": {"preset": "DiT-S/4", "image_size": 32, "depth": 2}}).model
    assert (cfg.depth, cfg.width, cfg.heads, cfg.patch_size) == (2, 384, 6, 4)
    assert cfg.preset == "DiT-S/4"
    micro = from_dict({"model": {"preset": "micro"}}).model
    assert (micro.depth, micro.width, micro.heads, micro.patch_size) == (2, 32, 2, 4)
    with pytest.raises(ConfigError, match="DiT-S/2"):
        resolve_model_preset({"preset": "DiT-M/2"})


def test_patch_layout_round_trip() -> None:
    """unpatchify inverts a manual patchify, and the patch embedder reads the same patches."""
    model = _model(image_size=12, in_channels=3, patch_size=4)
    g, p, C = 3, 4, 3
    x = torch.randn(2, C, 12, 12)
    tokens = x.view(2, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * C)
    torch.testing.assert_close(model.unpatchify(tokens), x, rtol=0, atol=0)
    # changing one pixel changes exactly the token of its patch (row-major token order)
    base = model.x_embedder(x)
    x2 = x.clone()
    x2[1, 2, 5, 10] += 1.0  # row 5 -> patch row 1, column 10 -> patch column 2
    diff = (model.x_embedder(x2) - base).abs().sum(-1)
    changed = torch.nonzero(diff > 0).tolist()
    assert changed == [[1, 1 * g + 2]]


def test_rope_relative_position_property() -> None:
    d, grid = 16, 5
    rope = Rope2D(d, grid)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    L = grid * grid
    q_rot = rope(q.expand(1, 1, L, d))[0, 0]  # the same vector at every position
    k_rot = rope(k.expand(1, 1, L, d))[0, 0]
    scores = q_rot @ k_rot.T  # scores[a, b] = <R_a q, R_b k>
    pos = lambda r, c: r * grid + c  # noqa: E731
    # equal offsets (dr, dc) give equal scores
    for (r1, c1, r2, c2), (r3, c3, r4, c4) in [((0, 0, 1, 2), (2, 1, 3, 3)), ((4, 4, 0, 1), (4, 3, 0, 0)),
                                               ((1, 3, 1, 0), (3, 4, 3, 1))]:
        assert r1 - r2 == r3 - r4 and c1 - c2 == c3 - c4
        assert scores[pos(r1, c1), pos(r2, c2)].item() == pytest.approx(
            scores[pos(r3, c3), pos(r4, c4)].item(), abs=1e-4)
    # zero offset recovers the plain dot product; rotations preserve the norm
    torch.testing.assert_close(torch.diagonal(scores), (q @ k).expand(L), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm().expand(L), rtol=1e-5, atol=1e-5)
    # and the position does matter, along rows and along columns
    assert abs(scores[pos(0, 0), pos(0, 1)] - scores[pos(0, 0), pos(0, 0)]) > 1e-3
    assert abs(scores[pos(0, 0), pos(1, 0)] - scores[pos(0, 0), pos(0, 0)]) > 1e-3
    assert abs(scores[pos(0, 0), pos(0, 1)] - scores[pos(0, 0), pos(1, 0)]) > 1e-3
    # position 0 is the identity; bf16 input keeps its dtype
    torch.testing.assert_close(q_rot[0], q)
    assert rope(q.expand(1, 1, L, d).bfloat16()).dtype == torch.bfloat16


def test_rope_model_attention_is_position_aware() -> None:
    """Without any absolute embedding, a RoPE model still distinguishes positions; sincos adds one."""
    rope = wake_up(_model(pos_embed="rope"))
    sincos = wake_up(_model(pos_embed="sincos"))
    assert rope.blocks[0].attn.rope is not None and sincos.blocks[0].attn.rope is None
    rope.eval()
    x = torch.zeros(1, 1, 16, 16)
    x[..., :4, :4] = torch.randn(4, 4)  # one non-zero patch, all others identical
    t, y = torch.tensor([0.5]), torch.tensor([3])
    out = rope(x, t, y)
    # the zero patches at different positions see different relative positions of the odd patch
    assert not torch.allclose(out[..., 4:8, 4:8], out[..., 12:16, 12:16], atol=1e-6)


def test_sincos_positions_are_added_and_rope_adds_none() -> None:
    model = _model(pos_embed="sincos")
    g = model.grid
    table = sincos_2d(WIDTH, g)
    torch.testing.assert_close(model.pos_embed[0], table)
    # first half of the channels encodes the row, the second half the column
    rows = table[:, : WIDTH // 2].view(g, g, -1)
    cols = table[:, WIDTH // 2 :].view(g, g, -1)
    assert torch.equal(rows[1, 0], rows[1, 3]) and not torch.equal(rows[0, 0], rows[1, 0])
    assert torch.equal(cols[0, 2], cols[3, 2]) and not torch.equal(cols[0, 0], cols[0, 1])
    # on a constant image every patch looks the same: only sincos can tell them apart
    x = torch.full((1, 1, 16, 16), 0.3)
    t, y = torch.tensor([0.5]), torch.tensor([3])
    for pos_embed, distinct in (("sincos", True), ("rope", False)):
        m = wake_up(_model(pos_embed=pos_embed)).eval()
        patches = m(x, t, y).unfold(2, 4, 4).unfold(3, 4, 4).reshape(16, -1)
        spread = (patches - patches[:1]).abs().max().item()
        assert (spread > 1e-4) == distinct, (pos_embed, spread)


@pytest.mark.parametrize("tokens", [1, 49, 128])
def test_cpu_explicit_attention_matches_sdpa(tokens: int) -> None:
    """The CPU short-sequence path (two matmuls and a softmax) is SDPA's math: forward and gradients."""
    import torch.nn.functional as F

    from moedit.models.dit import CPU_EXPLICIT_ATTENTION_MAX_TOKENS, attention

    assert tokens <= CPU_EXPLICIT_ATTENTION_MAX_TOKENS
    torch.manual_seed(tokens)
    qkv = [torch.randn(3, 2, tokens, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(3, 2, tokens, 8, dtype=torch.float64)
    ours = torch.autograd.grad(attention(*qkv), qkv, grad_out)
    reference = torch.autograd.grad(F.scaled_dot_product_attention(*qkv), qkv, grad_out)
    torch.testing.assert_close(attention(*qkv), F.scaled_dot_product_attention(*qkv))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)


def test_fused_modulate_and_gated_residual_are_the_adaln_formulas() -> None:
    from moedit.models.dit import gated_residual, modulate

    x, h = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    shift, scale, gate = torch.randn(3, 2, 4).unbind(0)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    torch.testing.assert_close(gated_residual(x, gate, h), x + gate[:, None] * h)

"""The video DiT (models/dit.py, models/embed.py; docs/VIDEO.md): an image model is the one-frame case of the
same code, 3-D patches round-trip, 3-D RoPE depends only on relative positions, factorised attention equals
its per-frame / per-position reference, every router trains on clips, and bad inputs are refused clearly."""

from __future__ import annotations

import pytest
import torch

from moedit.config import ConfigError, default_aux_weights, from_dict
from moedit.models import build_model
from moedit.models.dit import attention
from moedit.models.embed import Rope, rope_axis_channels, sincos_1d, token_positions
from moedit.moe.routers import ROUTERS
from moedit.objectives.rectified_flow import RectifiedFlow

from model_helpers import wake_up  # tests/model_helpers.py

pytestmark = pytest.mark.usefixtures("one_thread")

VIDEO = {"preset": "micro", "image_size": 8, "patch_size": 2, "frames": 4, "in_channels": 1, "class_dropout": 0.25}


def _model(seed: int = 0, moe: dict | None = None, **overrides):
    cfg = from_dict({"model": {**VIDEO, **overrides, **({"moe": moe} if moe else {})}}).model
    torch.manual_seed(seed)
    return build_model(cfg)


def _inputs(model, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.input_shape(), generator=gen)
    return x, torch.rand(batch, generator=gen), torch.randint(10, (batch,), generator=gen)


# ----------------------------------------------------------------------------- the image model is T = 1


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
@pytest.mark.parametrize("moe", [None, {"num_experts": 4, "expert_ratio": 1.0, "router": {"top_k": 2}}])
def test_one_frame_clip_equals_the_image(pos_embed, moe):
    model = _model(frames=1, pos_embed=pos_embed, moe=moe).eval()
    wake_up(model)
    x, t, y = _inputs(model)
    image_out = model(x, t, y)
    clip_out = model(x.unsqueeze(2), t, y)  # (B, C, 1, H, W)
    assert image_out.shape == x.shape and clip_out.shape == x.unsqueeze(2).shape
    torch.testing.assert_close(clip_out.squeeze(2), image_out, rtol=0, atol=0)
    assert model.last_context.frames == 1


def test_one_temporal_token_has_no_temporal_position_term():
    """frames = temporal_patch: one temporal token, so the table is the image model's and there is no time axis
    in RoPE; a clip model with more frames adds the 1-D table per frame."""
    one = _model(frames=2, temporal_patch=2)
    image = _model(frames=1)
    torch.testing.assert_close(one.pos_embed, image.pos_embed, rtol=0, atol=0)
    four = _model(frames=4)
    S = four.grid ** 2
    per_frame = four.pos_embed[0].view(4, S, -1) - image.pos_embed[0][None]
    torch.testing.assert_close(per_frame, sincos_1d(four.cfg.width, 4)[:, None].expand_as(per_frame))


def test_image_model_weights_keep_their_shapes():
    """The image model still has facebookresearch/DiT's 2-D patch embedder (checkpoints convert unchanged);
    a temporal patch > 1 makes it 3-D."""
    assert _model(frames=1).x_embedder.proj.weight.ndim == 4
    assert _model(frames=4).x_embedder.proj.weight.ndim == 4  # pt = 1: the same 2-D kernel on every frame
    assert _model(frames=4, temporal_patch=2).x_embedder.proj.weight.shape[2:] == (2, 2, 2)


# ----------------------------------------------------------------------------- 3-D patches


@pytest.mark.parametrize("pt", [1, 2])
def test_patchify_round_trip_and_token_order(pt):
    model = _model(frames=4, temporal_patch=pt, in_channels=3, image_size=12, patch_size=4)
    x = torch.randn(2, 3, 4, 12, 12)
    tokens = model.patchify(x)
    assert tokens.shape == (2, (4 // pt) * 9, pt * 16 * 3)
    torch.testing.assert_close(model.unpatchify(tokens), x, rtol=0, atol=0)
    # one changed pixel changes exactly the token of its patch, in (frame, row, column) order
    base = model.x_embedder(x)
    x2 = x.clone()
    x2[1, 2, 3, 5, 10] += 1.0  # frame 3 -> temporal token 3 // pt, row 5 -> 1, column 10 -> 2
    changed = torch.nonzero((model.x_embedder(x2) - base).abs().sum(-1) > 0).tolist()
    assert changed == [[1, (3 // pt) * 9 + 1 * 3 + 2]]
    # and patchify puts that pixel in the same token
    assert torch.nonzero((model.patchify(x2) - tokens).abs().sum(-1) > 0).tolist() == changed


# ----------------------------------------------------------------------------- 3-D RoPE


@pytest.mark.parametrize("pairing", ["adjacent", "rotate_half"])
def test_rope_3d_logits_depend_only_on_relative_positions(pairing):
    head_dim, channels = 32, rope_axis_channels(32, 0.25)
    assert channels == [8, 12, 12]
    positions = token_positions(3, 4)
    shifted = [p + offset for p, offset in zip(positions, (5.0, 2.0, 7.0))]
    rope, rope_shifted = Rope(head_dim, positions, channels, pairing=pairing), Rope(head_dim, shifted, channels,
                                                                                   pairing=pairing)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 48, head_dim, generator=gen), torch.randn(2, 2, 48, head_dim, generator=gen)
    logits = rope(q) @ rope(k).transpose(-1, -2)
    torch.testing.assert_close(rope_shifted(q) @ rope_shifted(k).transpose(-1, -2), logits, rtol=1e-4, atol=1e-4)
    # and positions do matter: shifting only q's frame changes the logits
    moved = Rope(head_dim, [positions[0] + 1, *positions[1:]], channels, pairing=pairing)
    assert not torch.allclose(moved(q) @ rope(k).transpose(-1, -2), logits, atol=1e-3)
    # a rotation keeps each vector's norm
    torch.testing.assert_close(rope(q).norm(dim=-1), q.norm(dim=-1))


def test_rope_time_axis_rotates_only_its_channels():
    head_dim, channels = 32, [8, 12, 12]
    positions = token_positions(3, 2)
    rope = Rope(head_dim, positions, channels)
    x = torch.randn(1, 1, 12, head_dim)
    same_frame_other = Rope(head_dim, [positions[0] * 0, *positions[1:]], channels)(x)
    # with every frame index set to 0, only the first 8 (time) channels differ from the real rotation
    diff = (rope(x) - same_frame_other).abs().amax(dim=(0, 1, 2))
    assert diff[8:].max() == 0 and diff[:8].max() > 0


def test_rope_split_refuses_odd_shares():
    with pytest.raises(ValueError, match="do not split into two even halves"):
        rope_axis_channels(24, 0.25)  # 6 time channels leave 18: 9 + 9
    with pytest.raises(ConfigError, match="do not split into two even halves"):
        from_dict({"model": {**VIDEO, "pos_embed": "rope", "width": 96, "heads": 4}})


# ----------------------------------------------------------------------------- factorised attention


def _reference_factorised(attn, x_BLD, frames):
    """Spatial attention frame by frame, or temporal attention position by position, with plain loops."""
    B, L, D = x_BLD.shape
    h, S = attn.heads, L // frames
    q, k, v = attn.qkv(x_BLD).view(B, L, 3, h, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.rope is not None:
        q, k = attn.rope(q), attn.rope(k)
    out = torch.zeros_like(q)
    groups = ([list(range(f * S, (f + 1) * S)) for f in range(frames)] if attn.axis == "spatial"
              else [list(range(s, L, S)) for s in range(S)])
    for idx in groups:
        out[:, :, idx] = torch.softmax(q[:, :, idx] @ k[:, :, idx].transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v[:, :, idx]
    return attn.proj(out.transpose(1, 2).reshape(B, L, D))


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_factorised_attention_equals_its_loop_reference(pos_embed):
    model = _model(frames=4, attention="factorised", pos_embed=pos_embed)
    block, frames = model.blocks[0], model.time_grid
    x = torch.randn(2, frames * model.grid ** 2, model.cfg.width, requires_grad=True)
    for attn in (block.attn, block.attn_temporal):
        got = attn(x)
        want = _reference_factorised(attn, x, frames)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(got)
        grad_got = torch.autograd.grad(got, [x, attn.qkv.weight], g)
        grad_want = torch.autograd.grad(want, [x, attn.qkv.weight], g)
        for a, b in zip(grad_got, grad_want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_spatial_attention_does_not_mix_frames_and_temporal_does_not_mix_positions():
    model = _model(frames=4, attention="factorised")
    block, S = model.blocks[0], model.grid ** 2
    x = torch.randn(1, 4 * S, model.cfg.width)
    x2 = x.clone()
    x2[0, 2 * S + 3] += 1.0  # frame 2, spatial position 3
    spatial = (block.attn(x2) - block.attn(x)).abs().sum(-1)[0]
    assert set(torch.nonzero(spatial > 0).flatten().tolist()) == set(range(2 * S, 3 * S))
    temporal = (block.attn_temporal(x2) - block.attn_temporal(x)).abs().sum(-1)[0]
    assert set(torch.nonzero(temporal > 0).flatten().tolist()) == {3, S + 3, 2 * S + 3, 3 * S + 3}


def test_full_attention_over_a_clip_is_one_attention():
    model = _model(frames=2)
    attn = model.blocks[0].attn
    x = torch.randn(1, 2 * model.grid ** 2, model.cfg.width)
    q, k, v = attn.qkv(x).view(1, x.shape[1], 3, attn.heads, -1).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(attn(x), attn.proj(attention(q, k, v).transpose(1, 2).reshape(x.shape)))


# ----------------------------------------------------------------------------- every router trains on clips


@pytest.mark.parametrize("attention_kind", ["full", "factorised"])
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_trains_on_video(name, attention_kind):
    moe = {"num_experts": 4, "expert_ratio": 1.0, "num_shared": 1 if name.startswith("promoe") else 0,
           "router": {"name": name}}
    model = _model(moe=moe, attention=attention_kind, temporal_patch=2, pos_embed="rope").train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, flow = torch.optim.AdamW(model.parameters(), lr=1e-3), RectifiedFlow()
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x0, _, y = _inputs(model, batch=4, seed=step)
        loss, _ = flow.loss(model, x0, y, generator=gen, pass_target=model.wants_target)
        total = loss + sum(default_aux_weights()[n] * v for n, v in model.aux_losses().items())
        assert torch.isfinite(total)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        model.after_optimizer_step()
    assert model.last_context.frames == 2 and model.last_context.seq_len == 2 * 16
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("blocks.0.moe.experts") for n in moved) and any(".attn." in n for n in moved)


# ----------------------------------------------------------------------------- bad input


def test_wrong_clip_shape_is_refused_clearly():
    model = _model(frames=4)
    with pytest.raises(ValueError, match=r"expects clips of shape \(B, 1, 4, 8, 8\), got \(2, 1, 3, 8, 8\)"):
        model(torch.randn(2, 1, 3, 8, 8), torch.rand(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="expects clips"):
        model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.zeros(2, dtype=torch.long))  # an image to a clip model


@pytest.mark.parametrize("overrides, message", [
    ({"frames": 6, "temporal_patch": 4}, "model.frames=6 is not divisible by model.temporal_patch=4"),
    ({"frames": 1, "attention": "factorised"}, "needs at least two temporal tokens"),
    ({"frames": 0}, "model.frames"),
    ({"attention": "axial"}, "model.attention"),
    ({"pos_embed": "rope", "rope_time_fraction": 1.5}, "rope_time_fraction"),
])
def test_bad_video_config_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"model": {**VIDEO, **overrides}})

"""Diffusion Transformer backbone (Peebles & Xie, arXiv 2212.09748) with dense or MoE FFNs, for images
and video.

    x_BCHW or x_BCTHW ─patchify─► tokens + positions ─► blocks(adaLN-Zero, c = t_emb + y_emb)
                      ─► final layer ─► out, shaped like x

Video (docs/VIDEO.md): a clip of T frames is cut into pt×p×p patches (`model.temporal_patch` = pt), giving
T/pt · (H/p)² tokens in (frame, row, column) order; positions are sin-cos (spatial table + a temporal one)
or 3-D RoPE (models/embed.py). `model.attention` is `full`, one attention over every token of the clip
(CogVideoX, Open-Sora 2.0), or `factorised`, each block attending within each frame and then across frames
at each spatial position (STDiT / Latte style); the temporal attention has its own projections and reuses
the block's attention modulation (shift, scale, gate), as STDiT does. An image model is the one-frame case of
the same code: an image is a clip of T = 1, and with one temporal token there is no temporal position term.

The model knows no diffusion math: `model(x_t, t, y) -> prediction` with t ∈ [0, 1]. Each block's
FFN is a dense MLP/SwiGLU or an `MoELayer`, chosen by `ModelConfig.moe` and its placement.
Parameter names follow facebookresearch/DiT (x_embedder, t_embedder, y_embedder, blocks.N.attn.qkv,
blocks.N.mlp.fc1, blocks.N.adaLN_modulation, final_layer) so that dense checkpoints map onto it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moedit.config import ModelConfig
from moedit.models.embed import (LabelEmbedder, Rope, TimestepEmbedder, rope_axis_channels, sincos_1d, sincos_2d,
                                 token_positions)
from moedit.models.ffn import build_ffn
from moedit.moe.layer import MoELayer
from moedit.moe.routing import RoutingContext


# On CPU, attention over at most this many tokens runs as two plain matmuls and a softmax: at these
# lengths that is 1.4-3x faster than SDPA in training (49 tokens: 5.0 vs 6.9 ms forward + backward, batch 64,
# 4 heads of 32; studies/quickstart_kernels.py, docs/QUICKSTART.md); from ~200 tokens on SDPA wins.
CPU_EXPLICIT_ATTENTION_MAX_TOKENS = 128


def modulate(x_BLD: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    # x·(1 + scale) + shift as one pass over x (addcmul) rather than two: the step is memory-bound on CPU
    return torch.addcmul(shift_BD[:, None], x_BLD, 1 + scale_BD[:, None])


def gated_residual(x_BLD: torch.Tensor, gate_BD: torch.Tensor, h_BLD: torch.Tensor) -> torch.Tensor:
    """x + gate·h (adaLN-Zero's gated residual), one pass."""
    return torch.addcmul(x_BLD, gate_BD[:, None], h_BLD)


def attention(q_BhLd: torch.Tensor, k_BhLd: torch.Tensor, v_BhLd: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v: SDPA, except short sequences on CPU (see CPU_EXPLICIT_ATTENTION_MAX_TOKENS)."""
    if q_BhLd.device.type != "cpu" or q_BhLd.shape[-2] > CPU_EXPLICIT_ATTENTION_MAX_TOKENS:
        return F.scaled_dot_product_attention(q_BhLd, k_BhLd, v_BhLd)
    scores_BhLL = (q_BhLd * q_BhLd.shape[-1] ** -0.5) @ k_BhLd.transpose(-1, -2)
    return scores_BhLL.softmax(dim=-1) @ v_BhLd


def _split_axis(t_BhLd: torch.Tensor, frames: int, axis: str) -> torch.Tensor:
    """Tokens regrouped for factorised attention: `spatial` attends within each frame ((B·T) h S d),
    `temporal` across frames at each spatial position ((B·S) h T d); `all`: unchanged."""
    if axis == "all":
        return t_BhLd
    B, h, L, d = t_BhLd.shape
    t_BhTSd = t_BhLd.view(B, h, frames, L // frames, d)
    order = (0, 2, 1, 3, 4) if axis == "spatial" else (0, 3, 1, 2, 4)
    grouped = t_BhTSd.permute(*order)
    return grouped.reshape(-1, h, grouped.shape[3], d)


def _merge_axis(t_GhXd: torch.Tensor, B: int, frames: int, axis: str) -> torch.Tensor:
    """The inverse of _split_axis: back to (B, h, L, d)."""
    if axis == "all":
        return t_GhXd
    h, d = t_GhXd.shape[1], t_GhXd.shape[3]
    if axis == "spatial":
        return t_GhXd.view(B, frames, h, -1, d).permute(0, 2, 1, 3, 4).reshape(B, h, -1, d)
    return t_GhXd.view(B, -1, h, frames, d).permute(0, 2, 3, 1, 4).reshape(B, h, -1, d)


class Attention(nn.Module):
    """Multi-head self-attention over `axis`: `all` tokens, or within each frame (`spatial`) or across
    frames (`temporal`) of a clip of `frames` temporal tokens. RoPE rotates q and k at their full (frame,
    row, column) positions before the regrouping, so each attention sees the offsets along its own axes."""

    def __init__(self, width: int, heads: int, qk_norm: bool, rope: Rope | None, frames: int = 1,
                 axis: str = "all"):
        super().__init__()
        self.heads, self.frames, self.axis = heads, frames, axis
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        head_dim = width // heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.rope = rope

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # each B h L d
        # qk-norm in float32 (its weights are float32): a bf16 input would take an unfused mixed path
        q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        q, k, v = (_split_axis(t, self.frames, self.axis) for t in (q, k, v))
        out_BhLd = _merge_axis(attention(q, k, v), B, self.frames, self.axis)
        return self.proj(out_BhLd.transpose(1, 2).reshape(B, L, D))


class DiTBlock(nn.Module):
    """adaLN-Zero block; exactly one of `mlp` (dense) and `moe` is set."""

    def __init__(self, cfg: ModelConfig, use_moe: bool, rope: Rope | None):
        super().__init__()
        D = cfg.width
        frames = cfg.frames // cfg.temporal_patch
        factorised = cfg.attention == "factorised"
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, cfg.heads, cfg.qk_norm, rope, frames, "spatial" if factorised else "all")
        self.attn_temporal = Attention(D, cfg.heads, cfg.qk_norm, rope, frames, "temporal") if factorised else None
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = None if use_moe else build_ffn(cfg.dense_ffn or cfg.ffn, D, int(round(cfg.mlp_ratio * D)))
        target_dim = cfg.temporal_patch * cfg.patch_size ** 2 * cfg.in_channels  # race's target head predicts a patch
        self.moe = MoELayer(D, cfg.moe, cfg.ffn, target_dim) if use_moe else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x_BLD: torch.Tensor, c_BD: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c_BD).chunk(6, dim=-1)
        x_BLD = gated_residual(x_BLD, gate1, self.attn(modulate(self.norm1(x_BLD), shift1, scale1)))
        if self.attn_temporal is not None:
            x_BLD = gated_residual(x_BLD, gate1, self.attn_temporal(modulate(self.norm1(x_BLD), shift1, scale1)))
        h_BLD = modulate(self.norm2(x_BLD), shift2, scale2)
        h_BLD = self.moe(h_BLD, ctx) if self.moe is not None else self.mlp(h_BLD)
        return gated_residual(x_BLD, gate2, h_BLD)


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch_volume: int, channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_volume * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x_BLD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c_BD).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x_BLD), shift, scale))


class PatchEmbed(nn.Module):
    """pt×p×p patches of x_BCTHW -> tokens (B, T/pt · (H/p)², D) in (frame, row, column) order. pt = 1: one
    Conv2d applied to every frame (an image model's weight, facebookresearch/DiT's shape); pt > 1: a Conv3d."""

    def __init__(self, patch: int, channels: int, width: int, temporal_patch: int = 1):
        super().__init__()
        self.temporal_patch = temporal_patch
        if temporal_patch == 1:
            self.proj = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)
        else:
            size = (temporal_patch, patch, patch)
            self.proj = nn.Conv3d(channels, width, kernel_size=size, stride=size)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        if x_BCTHW.ndim == 4:  # an image: a clip of one frame
            x_BCTHW = x_BCTHW.unsqueeze(2)
        if self.temporal_patch > 1:
            return self.proj(x_BCTHW).flatten(2).transpose(1, 2)
        B, C, T, H, W = x_BCTHW.shape
        frames_NCHW = x_BCTHW.transpose(1, 2).reshape(B * T, C, H, W)  # a view when T = 1
        tokens_NSD = self.proj(frames_NCHW).flatten(2).transpose(1, 2)
        return tokens_NSD.reshape(B, T * tokens_NSD.shape[1], tokens_NSD.shape[2])


def sample_shape(cfg: ModelConfig) -> tuple[int, ...]:
    """One sample's shape for a model of `cfg`: (C, H, W) for images, (C, T, H, W) for video (frames > 1)."""
    c, size = cfg.in_channels, cfg.image_size
    return (c, size, size) if cfg.frames == 1 else (c, cfg.frames, size, size)


def moe_block_indices(cfg: ModelConfig) -> list[int]:
    if cfg.moe is None:
        return []
    if cfg.moe.placement == "interleaved":
        return [i for i in range(cfg.depth) if i % 2 == 1]
    return list(range(cfg.depth))


class DiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size != 0:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}")
        if cfg.frames % cfg.temporal_patch != 0:
            raise ValueError(f"frames {cfg.frames} is not divisible by temporal_patch {cfg.temporal_patch}")
        self.cfg = cfg
        D, p, C = cfg.width, cfg.patch_size, cfg.in_channels
        self.grid = cfg.image_size // p
        self.time_grid = cfg.frames // cfg.temporal_patch  # temporal tokens (1: an image model)
        self.x_embedder = PatchEmbed(p, C, D, cfg.temporal_patch)
        self.t_embedder = TimestepEmbedder(D, t_scale=cfg.t_scale, t_flip=cfg.t_flip)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout)
        columns_first = cfg.pos_embed == "sincos_wh"  # facebookresearch/DiT's channel order (embed.py)
        self.register_buffer("pos_embed", self._sincos_table(D, columns_first)[None], persistent=False)
        rope = None
        if cfg.pos_embed == "rope":
            head_dim, video = D // cfg.heads, self.time_grid > 1
            rope = Rope(head_dim, token_positions(self.time_grid, self.grid),
                        rope_axis_channels(head_dim, cfg.rope_time_fraction if video else None), pairing=cfg.rope_pairing)
        moe_at = set(moe_block_indices(cfg))
        self.blocks = nn.ModuleList(DiTBlock(cfg, i in moe_at, rope) for i in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.temporal_patch * p * p, self.out_channels)
        self.initialize_weights()
        self.last_context: RoutingContext | None = None  # the last forward's, for diagnostics

    def _sincos_table(self, width: int, columns_first: bool) -> torch.Tensor:
        """(T'·S, D): the spatial table for every frame, plus the temporal table where T' > 1."""
        spatial_SD = sincos_2d(width, self.grid, columns_first)
        if self.time_grid == 1:
            return spatial_SD
        temporal_TD = sincos_1d(width, self.time_grid)
        return (temporal_TD[:, None] + spatial_SD[None]).reshape(-1, width)

    @property
    def null_label(self) -> int:
        return self.y_embedder.null_label

    @property
    def out_channels(self) -> int:
        """Prediction channels: in_channels, or more (e.g. DiT's learned-sigma 2·C); objectives and
        samplers read the first in_channels of them."""
        return self.cfg.out_channels or self.cfg.in_channels

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x_BLP: torch.Tensor) -> torch.Tensor:
        """(B, L, pt·p²·C) tokens -> (B, C, T, H, W), or (B, C, H, W) for an image model; each token's values
        in (frame, row, column, channel) order inside its patch (images: facebookresearch/DiT's (row, column,
        channel))."""
        B, T, g, pt, p, C = x_BLP.shape[0], self.time_grid, self.grid, self.cfg.temporal_patch, self.cfg.patch_size, self.out_channels
        x = x_BLP.view(B, T, g, g, pt, p, p, C)
        out_BCTHW = torch.einsum("bthwopqc->bctohpwq", x).reshape(B, C, T * pt, g * p, g * p)
        return out_BCTHW.squeeze(2) if self.cfg.frames == 1 else out_BCTHW

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W), or (B, C, H, W) for an image model, -> (B, L, pt·p²·C) in the final layer's token
        layout; the inverse of unpatchify."""
        x_BCTHW = x.unsqueeze(2) if x.ndim == 4 else x
        B, T, g, pt, p, C = x.shape[0], self.time_grid, self.grid, self.cfg.temporal_patch, self.cfg.patch_size, self.cfg.in_channels
        x = x_BCTHW.reshape(B, C, T, pt, g, p, g, p)
        return torch.einsum("bctohpwq->bthwopqc", x).reshape(B, T * g * g, pt * p * p * C)

    def input_shape(self) -> tuple[int, ...]:
        """A sample's shape: (C, H, W) for an image model, (C, T, H, W) for video."""
        return sample_shape(self.cfg)

    def _as_clip(self, x: torch.Tensor) -> torch.Tensor:
        """x as (B, C, T, H, W), refusing a shape this model cannot read; an image model also takes a
        one-frame clip (B, C, 1, H, W)."""
        c, size, frames = self.cfg.in_channels, self.cfg.image_size, self.cfg.frames
        if x.ndim == 4 and frames == 1 and tuple(x.shape[1:]) == (c, size, size):
            return x.unsqueeze(2)
        if x.ndim == 5 and tuple(x.shape[1:]) == (c, frames, size, size):
            return x
        expected = ", ".join(map(str, self.input_shape()))
        raise ValueError(f"model expects {'images' if frames == 1 else 'clips'} of shape (B, {expected}), "
                         f"got {tuple(x.shape)}")

    @property
    def wants_target(self) -> bool:
        """True when a router has a per-layer regularisation head: the objective then passes
        `target=` (the training target) so that head gets its loss."""
        return any(layer.router.wants_target for layer in self.moe_layers())

    def forward(self, x: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor,
                target: torch.Tensor | None = None) -> torch.Tensor:
        """Prediction for x_t (B×C×H×W images, or B×C×T×H×W clips) at times t_B with labels y_B, shaped
        like x. `target` (training only, same shape as x) feeds the routers' per-layer regularisation; it
        never changes the prediction."""
        x_BCTHW = self._as_clip(x)
        y_B = self.y_embedder.drop(y_B)
        x_BLD = self.x_embedder(x_BCTHW)
        if self.cfg.pos_embed != "rope":  # sincos or sincos_wh: a fixed additive table
            x_BLD = x_BLD + self.pos_embed
        t_BD, y_BD = self.t_embedder(t_B), self.y_embedder(y_B)
        c_BD = t_BD + y_BD
        ctx = RoutingContext(batch=x_BLD.shape[0], seq_len=x_BLD.shape[1], cond_BSD=torch.stack([t_BD, y_BD], 1),
                             labels_B=y_B, null_label=self.null_label,
                             target_BLP=self.patchify(target) if target is not None else None, t_B=t_B,
                             frames=self.time_grid)
        self.last_context = ctx  # the routing monitor reads t and the labels after CFG dropout from it
        for block in self.blocks:
            x_BLD = block(x_BLD, c_BD, ctx)
        out = self.unpatchify(self.final_layer(x_BLD, c_BD))
        return out.unsqueeze(2) if x.ndim == 5 and out.ndim == 4 else out  # shaped like x

    # ---- MoE hooks used by the trainer and diagnostics

    def moe_layers(self) -> list[MoELayer]:
        return [block.moe for block in self.blocks if block.moe is not None]

    def aux_losses_by_layer(self) -> dict[str, dict[int, torch.Tensor]]:
        """Each auxiliary loss of the last forward by name, then by block index (unweighted)."""
        per_name: dict[str, dict[int, torch.Tensor]] = {}
        for index, block in enumerate(self.blocks):
            routing = block.moe.last_routing if block.moe is not None else None
            if routing is not None:
                for name, value in routing.aux.items():
                    per_name.setdefault(name, {})[index] = value
        return per_name

    def aux_losses(self, over_layers: str = "peers") -> dict[str, torch.Tensor]:
        """Each auxiliary loss of the last forward combined over MoE layers (unweighted), as
        `train.aux_over_layers` says (docs/ROUTING_MATH.md §5): `peers`, the papers' convention, sums
        every loss over the layers except those a router states are defined as a mean over layers
        (`Router.AUX_MEAN_OVER_LAYERS`: Race's per-layer regularisation); `mean` averages every loss
        (moedit before this convention, kept to continue runs trained with it)."""
        averaged = set()
        for layer in self.moe_layers():
            averaged |= layer.router.AUX_MEAN_OVER_LAYERS
        combined = {}
        for name, by_block in self.aux_losses_by_layer().items():
            values = torch.stack(list(by_block.values()))
            combined[name] = values.mean() if over_layers == "mean" or name in averaged else values.sum()
        return combined

    def after_optimizer_step(self, reduce_fn=None) -> None:
        for layer in self.moe_layers():
            layer.router.after_optimizer_step(reduce_fn)

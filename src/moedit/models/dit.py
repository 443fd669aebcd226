"""Diffusion Transformer backbone (Peebles & Xie, arXiv 2212.09748) with dense or MoE FFNs.

    x_BCHW ─patchify─► tokens + positions ─► blocks(adaLN-Zero, c = t_emb + y_emb) ─► final layer ─► out_BCHW

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
from moedit.models.embed import LabelEmbedder, Rope2D, TimestepEmbedder, sincos_2d
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


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool, rope: Rope2D | None):
        super().__init__()
        self.heads = heads
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
        out_BhLd = attention(q, k, v)
        return self.proj(out_BhLd.transpose(1, 2).reshape(B, L, D))


class DiTBlock(nn.Module):
    """adaLN-Zero block; exactly one of `mlp` (dense) and `moe` is set."""

    def __init__(self, cfg: ModelConfig, use_moe: bool, rope: Rope2D | None):
        super().__init__()
        D = cfg.width
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, cfg.heads, cfg.qk_norm, rope)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = None if use_moe else build_ffn(cfg.dense_ffn or cfg.ffn, D, int(round(cfg.mlp_ratio * D)))
        target_dim = cfg.patch_size ** 2 * cfg.in_channels  # race's per-layer target head predicts this
        self.moe = MoELayer(D, cfg.moe, cfg.ffn, target_dim) if use_moe else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x_BLD: torch.Tensor, c_BD: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c_BD).chunk(6, dim=-1)
        x_BLD = gated_residual(x_BLD, gate1, self.attn(modulate(self.norm1(x_BLD), shift1, scale1)))
        h_BLD = modulate(self.norm2(x_BLD), shift2, scale2)
        h_BLD = self.moe(h_BLD, ctx) if self.moe is not None else self.mlp(h_BLD)
        return gated_residual(x_BLD, gate2, h_BLD)


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch: int, channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch * patch * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x_BLD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c_BD).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x_BLD), shift, scale))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, channels: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)


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
        self.cfg = cfg
        D, p, C = cfg.width, cfg.patch_size, cfg.in_channels
        self.grid = cfg.image_size // p
        self.x_embedder = PatchEmbed(p, C, D)
        self.t_embedder = TimestepEmbedder(D, t_scale=cfg.t_scale, t_flip=cfg.t_flip)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout)
        columns_first = cfg.pos_embed == "sincos_wh"  # facebookresearch/DiT's channel order (embed.py)
        self.register_buffer("pos_embed", sincos_2d(D, self.grid, columns_first)[None], persistent=False)
        rope = Rope2D(D // cfg.heads, self.grid, pairing=cfg.rope_pairing) if cfg.pos_embed == "rope" else None
        moe_at = set(moe_block_indices(cfg))
        self.blocks = nn.ModuleList(DiTBlock(cfg, i in moe_at, rope) for i in range(cfg.depth))
        self.final_layer = FinalLayer(D, p, self.out_channels)
        self.initialize_weights()
        self.last_context: RoutingContext | None = None  # the last forward's, for diagnostics

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
        B, g, p, C = x_BLP.shape[0], self.grid, self.cfg.patch_size, self.out_channels
        x = x_BLP.view(B, g, g, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, g * p, g * p)

    def patchify(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p²·C) in the final layer's token layout; the inverse of unpatchify."""
        B, g, p, C = x_BCHW.shape[0], self.grid, self.cfg.patch_size, self.cfg.in_channels
        x = x_BCHW.reshape(B, C, g, p, g, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(B, g * g, p * p * C)

    @property
    def wants_target(self) -> bool:
        """True when a router has a per-layer regularisation head: the objective then passes
        `target=` (the training target) so that head gets its loss."""
        return any(layer.router.wants_target for layer in self.moe_layers())

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor,
                target: torch.Tensor | None = None) -> torch.Tensor:
        """Prediction for x_t at times t_B with labels y_B. `target` (training only, same shape as
        x) feeds the routers' per-layer regularisation; it never changes the prediction."""
        expected = (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)
        if tuple(x_BCHW.shape[1:]) != expected:
            raise ValueError(f"model expects images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {tuple(x_BCHW.shape)}")
        y_B = self.y_embedder.drop(y_B)
        x_BLD = self.x_embedder(x_BCHW)
        if self.cfg.pos_embed != "rope":  # sincos or sincos_wh: a fixed additive table
            x_BLD = x_BLD + self.pos_embed
        t_BD, y_BD = self.t_embedder(t_B), self.y_embedder(y_B)
        c_BD = t_BD + y_BD
        ctx = RoutingContext(batch=x_BLD.shape[0], seq_len=x_BLD.shape[1], cond_BSD=torch.stack([t_BD, y_BD], 1),
                             labels_B=y_B, null_label=self.null_label,
                             target_BLP=self.patchify(target) if target is not None else None, t_B=t_B)
        self.last_context = ctx  # the routing monitor reads t and the labels after CFG dropout from it
        for block in self.blocks:
            x_BLD = block(x_BLD, c_BD, ctx)
        return self.unpatchify(self.final_layer(x_BLD, c_BD))

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

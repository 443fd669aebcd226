"""facebookresearch/DiT's layout and forward, written out from its equations for the import tests (their
names and shapes, random weights; tests/ is on sys.path through the root conftest)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def dit_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """get_2d_sincos_pos_embed of facebookresearch/DiT models.py, transcribed."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        out = np.einsum("m,d->md", pos.reshape(-1), 1.0 / 10000 ** omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])  # w goes first
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def dit_timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def dit_state_dict(D=32, depth=2, C=4, p=2, grid=4, classes=5, learn_sigma=True, seed=0) -> dict:
    """A facebookresearch/DiT state dict by hand: their names and shapes, random weights."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.1

    out = 2 * C if learn_sigma else C
    sd = {"x_embedder.proj.weight": rand(D, C, p, p), "x_embedder.proj.bias": rand(D),
          "pos_embed": torch.from_numpy(dit_pos_embed(D, grid)).float()[None],
          "t_embedder.mlp.0.weight": rand(D, 256), "t_embedder.mlp.0.bias": rand(D),
          "t_embedder.mlp.2.weight": rand(D, D), "t_embedder.mlp.2.bias": rand(D),
          "y_embedder.embedding_table.weight": rand(classes + 1, D),
          "final_layer.linear.weight": rand(p * p * out, D), "final_layer.linear.bias": rand(p * p * out),
          "final_layer.adaLN_modulation.1.weight": rand(2 * D, D), "final_layer.adaLN_modulation.1.bias": rand(2 * D)}
    for i in range(depth):
        for name, shape in (("attn.qkv", (3 * D, D)), ("attn.proj", (D, D)), ("mlp.fc1", (4 * D, D)),
                            ("mlp.fc2", (D, 4 * D)), ("adaLN_modulation.1", (6 * D, D))):
            sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = rand(*shape), rand(shape[0])
    return sd


def dit_reference_forward(sd, x, t_int, y, heads, p, ffn=None, rope=None):
    """facebookresearch/DiT's DiT.forward (timm PatchEmbed, Attention, Mlp), transcribed for a state dict;
    `ffn(i, h)` replaces block i's MLP (DiT-MoE's MoE layer), `rope(q_BHNd)` rotates q and k (a state dict
    without pos_embed then), `t_int` is what their embedder is fed."""
    def lin(h, name):
        return F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def dit_mlp(i, h):
        return lin(F.gelu(lin(h, f"blocks.{i}.mlp.fc1"), approximate="tanh"), f"blocks.{i}.mlp.fc2")

    ffn = ffn or dit_mlp

    def modulate(h, shift, scale):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    if "pos_embed" in sd:
        h = h + sd["pos_embed"]
    c = lin(F.silu(lin(dit_timestep_embedding(t_int), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    B, N, D = h.shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        s1, sc1, g1, s2, sc2, g2 = lin(F.silu(c), f"blocks.{i}.adaLN_modulation.1").chunk(6, dim=1)
        q, k, v = lin(modulate(h, s1, sc1), f"blocks.{i}.attn.qkv").reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rope(q), rope(k)
        attn = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v
        h = h + g1[:, None] * lin(attn.transpose(1, 2).reshape(B, N, D), f"blocks.{i}.attn.proj")
        h = h + g2[:, None] * ffn(i, modulate(h, s2, sc2))
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(modulate(h, shift, scale), "final_layer.linear")
    g = int(N ** 0.5)
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(B, g, g, p, p, -1))
    return out.reshape(B, -1, g * p, g * p)

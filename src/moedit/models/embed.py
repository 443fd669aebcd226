"""Embeddings of the DiT backbone (arXiv 2212.09748 §3.2) and 2-D rotary positions.

- Timestep: sinusoidal features of 1000·t (DiT's integer-step scale, so t ∈ [0, 1] spans the same
  frequencies) followed by a two-layer SiLU MLP.
- Label: a table with one extra row, the null class (index = num_classes), used for classifier-free
  guidance; in training each label is replaced by the null class with probability `dropout`.
- Absolute positions: fixed 2-D sin-cos. `sincos`: the first half of the channels encodes the row,
  the second half the column. `sincos_wh`: the two halves swapped (column first), the table of
  facebookresearch/DiT's get_2d_sincos_pos_embed (np.meshgrid(grid_w, grid_h) puts w first), so
  checkpoints trained with it import exactly (docs/CONVERT.md). Each half is [sin, cos] of
  pos·10000^(−j/(D/4)), j < D/4, over tokens in row-major order.
- RoPE 2-D: the head dimension is split in two halves rotated by row (first half) and by column
  position (second half), applied to q and k, with frequencies θ^(−j/(d/4)), j < d/4, per axis (as in
  the EfficientMoE recipe, arXiv 2512.01252, and FiT/Lumina). `model.rope_pairing` says which channels
  rotate together inside each half of width d/2: `adjacent` (x_{2j}, x_{2j+1}), GPT-J style, moedit's
  default; `rotate_half` (x_j, x_{j+d/4}), GPT-NeoX style, the recipe's released code (DSMoE). The two
  are the same up to a fixed permutation of head channels: equally expressive, but a checkpoint's
  attention weights port only with its own pairing.
- Video (docs/VIDEO.md): tokens are in (frame, row, column) order. sin-cos adds a 1-D temporal table
  (`sincos_1d` of the frame index, all channels) to the spatial one, only when the model has more than
  one temporal token, so an image model is exactly the one-frame case. RoPE 3-D splits each head's
  channels into time, row and column segments (`rope_axis_channels`: time ≈ model.rope_time_fraction,
  ¼ by default as CogVideoX, rows and columns the rest equally); each segment rotates by its axis'
  position with frequencies θ^(−j/P), j < P pairs of that segment; `adjacent` pairs (2j, 2j+1) over the
  whole head, `rotate_half` pairs j with j + c/2 inside each segment of width c — in 2-D both reduce to
  the rules above.
"""

from __future__ import annotations

import math

import torch
from torch import nn

POS_EMBEDS = ("sincos", "sincos_wh", "rope")  # model.pos_embed: the position schemes of the module docstring
ROPE_PAIRINGS = ("adjacent", "rotate_half")  # model.rope_pairing


def timestep_features(t_B: torch.Tensor, dim: int, max_period: float = 10000.0, t_scale: float = 1000.0) -> torch.Tensor:
    """[cos, sin] of (t_scale·t)·freqs: t_scale 1000 is DiT's integer-step scale (model.t_scale)."""
    half = dim // 2
    freqs_F = torch.exp(-math.log(max_period) * torch.arange(half, device=t_B.device, dtype=torch.float32) / half)
    args_BF = (t_scale * t_B.float())[:, None] * freqs_F[None]
    return torch.cat([torch.cos(args_BF), torch.sin(args_BF)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256, t_scale: float = 1000.0, t_flip: bool = False):
        super().__init__()
        self.freq_dim, self.t_scale, self.t_flip = freq_dim, t_scale, t_flip
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        features = timestep_features(1 - t_B if self.t_flip else t_B, self.freq_dim, t_scale=self.t_scale)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, width: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.embedding_table = nn.Embedding(num_classes + 1, width)  # last row: the null class

    @property
    def null_label(self) -> int:
        return self.num_classes

    def drop(self, y_B: torch.Tensor) -> torch.Tensor:
        """Replace labels by the null class at random (training only) for classifier-free guidance."""
        if not self.training or self.dropout == 0.0:
            return y_B
        drop_B = torch.rand(y_B.shape, device=y_B.device) < self.dropout
        return torch.where(drop_B, torch.full_like(y_B, self.null_label), y_B)

    def forward(self, y_B: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y_B)


def sincos_2d(width: int, grid: int, columns_first: bool = False) -> torch.Tensor:
    """Fixed (grid², width) table: first half of the channels encodes rows, second half columns
    (`columns_first`: the other way round, as facebookresearch/DiT's table — `sincos_wh`)."""
    coords = torch.arange(grid, dtype=torch.float64)
    row_L, col_L = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos_L: torch.Tensor, dim: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        angles = pos_L.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    halves = [encode(row_L, width // 2), encode(col_L, width // 2)]
    return torch.cat(halves[::-1] if columns_first else halves, dim=1).float()


def sincos_1d(width: int, length: int) -> torch.Tensor:
    """Fixed (length, width) table [sin, cos] of pos·10000^(−j/(width/2)), j < width/2: the temporal
    positions of a video model, added to every token of a frame on top of the spatial table."""
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2.0))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def rope_axis_channels(head_dim: int, time_fraction: float | None) -> list[int]:
    """Head channels rotated by each position axis: (row, column) halves for images; for video
    (time_fraction given) time gets time_fraction·head_dim rounded to an even count and rows and columns
    share the rest equally (head 64, ¼: 16/24/24, CogVideoX's split). Raises ValueError when a share is
    odd (a rotation needs channel pairs)."""
    if time_fraction is None:
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}")
        return [head_dim // 2, head_dim // 2]
    time = 2 * round(time_fraction * head_dim / 2)
    if time < 2 or (head_dim - time) % 4:
        raise ValueError(f"3-D RoPE of a {head_dim}-channel head: time gets {time} channels, leaving "
                         f"{head_dim - time} that do not split into two even halves for rows and columns; choose "
                         "model.rope_time_fraction or model.heads so that they do (e.g. head width 32 or 64 with 0.25)")
    return [time, (head_dim - time) // 2, (head_dim - time) // 2]


def rope_pair_order(axis_channels: list[int], pairing: str) -> torch.Tensor | None:
    """Channel order that lists each rotated pair's two channels next to each other, axis by axis (e.g.
    row angles first, then column angles); None for `adjacent`, whose pairs are already (2j, 2j+1).
    `rotate_half` pairs channel j of an axis's segment of width c with channel j + c/2 of it."""
    if pairing == "adjacent":
        return None
    if pairing != "rotate_half":
        raise ValueError(f"model.rope_pairing={pairing!r} is unknown; choose one of: {', '.join(ROPE_PAIRINGS)}")
    firsts, start = [], 0
    for channels in axis_channels:
        firsts.append(start + torch.arange(channels // 2))
        start += channels
    first_P = torch.cat(firsts)
    second_P = torch.cat([f + c // 2 for f, c in zip(firsts, axis_channels)])
    return torch.stack([first_P, second_P], dim=1).reshape(-1)


def token_positions(frames: int, grid: int) -> list[torch.Tensor]:
    """(frame, row, column) of each token in moedit's token order (frame-major, then row-major), each of
    length frames·grid²; images (frames = 1): (row, column) only."""
    axes = torch.meshgrid(torch.arange(frames), torch.arange(grid), torch.arange(grid), indexing="ij")
    positions = [a.reshape(-1).double() for a in axes]
    return positions[1:] if frames == 1 else positions


class Rope(nn.Module):
    """Rotary embedding over the tokens' position axes (rows and columns; frames too for video):
    axis a rotates its own `axis_channels[a]` head channels, pair j by position·θ^(−j/P_a), P_a =
    axis_channels[a]/2 pairs; channels pair by `pairing` (module docstring)."""

    def __init__(self, head_dim: int, positions: list[torch.Tensor], axis_channels: list[int],
                 theta: float = 10000.0, pairing: str = "adjacent"):
        super().__init__()
        if sum(axis_channels) != head_dim or len(positions) != len(axis_channels):
            raise ValueError(f"RoPE axis channels {axis_channels} do not split a {head_dim}-channel head "
                             f"over {len(positions)} position axes")
        order = rope_pair_order(axis_channels, pairing)
        self.register_buffer("order_d", order, persistent=False)
        self.register_buffer("inverse_d", None if order is None else torch.argsort(order), persistent=False)
        angles = []
        for pos_L, channels in zip(positions, axis_channels):
            pairs = channels // 2
            freqs_Q = 1.0 / theta ** (torch.arange(pairs, dtype=torch.float64) / pairs)
            angles.append(pos_L.double()[:, None] * freqs_Q)
        angles_LP = torch.cat(angles, dim=1)  # P = head_dim/2
        self.register_buffer("cos_LP", torch.cos(angles_LP).float(), persistent=False)
        self.register_buffer("sin_LP", torch.sin(angles_LP).float(), persistent=False)

    def forward(self, x_BHLd: torch.Tensor) -> torch.Tensor:
        x = x_BHLd.float()
        if self.order_d is not None:
            x = x.index_select(-1, self.order_d)
        x_pairs = x.unflatten(-1, (-1, 2))
        a, b = x_pairs[..., 0], x_pairs[..., 1]
        cos, sin = self.cos_LP, self.sin_LP
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        if self.inverse_d is not None:
            rotated = rotated.index_select(-1, self.inverse_d)
        return rotated.to(x_BHLd.dtype)


def Rope2D(head_dim: int, grid: int, theta: float = 10000.0, pairing: str = "adjacent") -> Rope:  # noqa: N802
    """The image model's RoPE: a grid×grid token layout, rows and columns on the two halves of the head."""
    return Rope(head_dim, token_positions(1, grid), rope_axis_channels(head_dim, None), theta, pairing)

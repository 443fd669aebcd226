"""Image grids: `make_grid` (uint8 HWC array) and `save_grid` (PNG, written atomically).

Layout: images fill rows left to right, `nrow` per row (callers pass one row per class, so a
class-conditional sample grid reads as one class per row); cells are separated and framed by
`pad` pixels of `pad_value`. Input is float in [-1, 1] (the model's convention, mapped back with
the same rounding as `to_uint8`) or already uint8.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moedit.utils.files import atomic_write


def _as_uint8_BHWC(x_BCHW: torch.Tensor | np.ndarray) -> np.ndarray:
    x = torch.as_tensor(x_BCHW).detach().cpu()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, C, H, W) with C in (1, 3), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        # same mapping as moedit.data.to_uint8: [-1, 1] -> 0..255, clamped, rounded
        x = ((x.to(torch.float32) + 1.0) * 127.5).clamp(0.0, 255.0).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(x_BCHW: torch.Tensor | np.ndarray, nrow: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile B images into ceil(B / nrow) rows of nrow; returns uint8 (H, W, C), C = 1 or 3."""
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    imgs_BHWC = _as_uint8_BHWC(x_BCHW)
    b, h, w, c = imgs_BHWC.shape
    rows = max(1, math.ceil(b / nrow))
    grid_HWC = np.full((rows * h + (rows + 1) * pad, nrow * w + (nrow + 1) * pad, c), pad_value, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid_HWC[top : top + h, left : left + w] = imgs_BHWC[i]
    return grid_HWC


def save_grid(
    x_BCHW: torch.Tensor | np.ndarray, path: str | os.PathLike, nrow: int, pad: int = 2, pad_value: int = 255
) -> Path:
    """Write make_grid(...) as a PNG (grey or RGB); a reader never sees a half-written file."""
    grid_HWC = make_grid(x_BCHW, nrow, pad=pad, pad_value=pad_value)
    image = Image.fromarray(grid_HWC[:, :, 0] if grid_HWC.shape[2] == 1 else grid_HWC)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))

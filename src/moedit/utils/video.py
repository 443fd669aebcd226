"""Video samples a person can look at: a PNG contact sheet and an animated GIF, both written atomically.

- Contact sheet: one row per clip, its frames left to right (`make_contact_sheet`), framed like the image
  grids (utils/images.py), so a row shows a clip's motion at a glance and rows compare clips.
- GIF: every clip at once, laid out as the image grid is (`nrow` clips per row: one class per row for the
  trainer's samples), animated frame by frame and looping; Pillow writes it, no other dependency.

Input is (B, C, T, H, W) with C in (1, 3), float in [-1, 1] (mapped to uint8 with the pixel convention of
data/base.py) or uint8.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moedit.utils.files import atomic_write
from moedit.utils.images import make_grid


def _check_clips(x_BCTHW: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(x_BCTHW).detach().cpu()
    if x.ndim != 5 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected clips (B, C, T, H, W) with C in (1, 3), got shape {tuple(x.shape)}")
    return x


def _pil(grid_HWC: np.ndarray) -> Image.Image:
    return Image.fromarray(grid_HWC[:, :, 0] if grid_HWC.shape[2] == 1 else grid_HWC)


def make_contact_sheet(x_BCTHW: torch.Tensor | np.ndarray, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 (H, W, C): row b holds clip b's T frames in order."""
    x = _check_clips(x_BCTHW)
    B, C, T, H, W = x.shape
    frames_NCHW = x.transpose(1, 2).reshape(B * T, C, H, W)  # clip-major: row b = frames of clip b
    return make_grid(frames_NCHW, nrow=T, pad=pad, pad_value=pad_value)


def save_contact_sheet(x_BCTHW: torch.Tensor | np.ndarray, path: str | os.PathLike, pad: int = 2) -> Path:
    sheet = _pil(make_contact_sheet(x_BCTHW, pad=pad))
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


def gif_frames(x_BCTHW: torch.Tensor | np.ndarray, nrow: int, pad: int = 2) -> list[np.ndarray]:
    """The GIF's frames: frame t is the grid (nrow clips per row) of every clip's frame t."""
    x = _check_clips(x_BCTHW)
    return [make_grid(x[:, :, t], nrow=nrow, pad=pad) for t in range(x.shape[2])]


def save_gif(x_BCTHW: torch.Tensor | np.ndarray, path: str | os.PathLike, nrow: int, fps: float = 4.0,
             pad: int = 2) -> Path:
    """An animated, looping GIF of every clip at once (gif_frames); `fps` frames per second."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = [_pil(f) for f in gif_frames(x_BCTHW, nrow, pad)]
    duration_ms = max(20, round(1000 / fps))  # GIF delays are hundredths of a second; viewers clamp below 20 ms

    def write(tmp: str) -> None:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0,
                       optimize=False)

    return atomic_write(path, write)


def read_gif(path: str | os.PathLike) -> np.ndarray:
    """The frames of a GIF written by save_gif as uint8 (T, H, W) (grey) or (T, H, W, 3)."""
    with Image.open(path) as image:
        frames = []
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            frame = image.convert("L") if image.mode in ("L", "P") and _is_grey(image) else image.convert("RGB")
            frames.append(np.asarray(frame))
    return np.stack(frames)


def _is_grey(image: Image.Image) -> bool:
    if image.mode == "L":
        return True
    palette = image.getpalette() or []
    triples = [palette[i : i + 3] for i in range(0, len(palette), 3)]
    return all(r == g == b for r, g, b in triples)

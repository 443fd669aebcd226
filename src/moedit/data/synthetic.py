"""A deterministic toy dataset that a small model learns in seconds: for tests and smoke runs.

Class c is a bright square of side S/4 whose cell on a g x g grid (g = ceil(sqrt(k))) is c, drawn
on a dark background with faint stripes whose orientation alternates with c, so that neighbouring
classes differ in two independent ways. Each sample jitters the square by up to ±1 pixel and adds
Gaussian noise (std 8/255); with C = 3 channels each class also has its own colour. Everything
comes from one numpy Generator seeded by `seed`, so the same arguments give identical bytes.
"""

from __future__ import annotations

import math

import numpy as np

from moedit.data.base import DatasetError, ImageDataset, make_dataset

NOISE_STD = 8.0  # in uint8 units
BACKGROUND, STRIPE, FOREGROUND = 16.0, 48.0, 224.0


def _class_colour(c: int, k: int, channels: int) -> np.ndarray:
    if channels == 1:
        return np.ones(1)
    hue = 2.0 * math.pi * c / k  # evenly spread hues, each channel in [0.25, 1]
    return np.array([0.625 + 0.375 * math.cos(hue + 2.0 * math.pi * i / 3.0) for i in range(channels)])


def _template(c: int, k: int, size: int, channels: int, dy: int, dx: int) -> np.ndarray:
    g = math.ceil(math.sqrt(k))
    side = max(1, size // 4)
    cell = size / g
    row, col = divmod(c, g)
    y0 = int(np.clip(round((row + 0.5) * cell - side / 2) + dy, 0, size - side))
    x0 = int(np.clip(round((col + 0.5) * cell - side / 2) + dx, 0, size - side))
    img = np.full((size, size), BACKGROUND)
    coord = np.arange(size)
    stripes = (coord // 2) % 2 == 0
    if c % 2 == 0:
        img[stripes, :] = STRIPE  # horizontal stripes for even classes
    else:
        img[:, stripes] = STRIPE  # vertical for odd
    img[y0 : y0 + side, x0 : x0 + side] = FOREGROUND
    return img[None] * _class_colour(c, k, channels)[:, None, None]


def make_synthetic(
    num: int = 2048, image_size: int = 28, channels: int = 1, num_classes: int = 10, seed: int = 0
) -> ImageDataset:
    """`num` images (C x S x S uint8), classes balanced (label i % k) in a seeded random order."""
    if num < 1 or num_classes < 1 or channels not in (1, 3) or image_size < 4:
        raise DatasetError(
            f"synthetic dataset needs num >= 1, num_classes >= 1, channels in (1, 3) and image_size >= 4; "
            f"got num={num}, num_classes={num_classes}, channels={channels}, image_size={image_size}"
        )
    rng = np.random.default_rng(seed)
    labels_N = rng.permutation(np.arange(num) % num_classes)
    jitter_N2 = rng.integers(-1, 2, size=(num, 2))
    # one template per (class, dy, dx): k·9 small images instead of one per sample
    shifts = (-1, 0, 1)
    templates = np.array(
        [
            [[_template(c, num_classes, image_size, channels, dy, dx) for dx in shifts] for dy in shifts]
            for c in range(num_classes)
        ]
    )
    images = templates[labels_N, jitter_N2[:, 0] + 1, jitter_N2[:, 1] + 1]
    images = images + rng.normal(0.0, NOISE_STD, size=images.shape)
    images_NCHW = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    names = [str(c) for c in range(num_classes)]
    return make_dataset(images_NCHW, labels_N, names, name=f"synthetic(seed={seed})")

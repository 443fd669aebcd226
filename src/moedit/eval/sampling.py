"""Drawing the N images an evaluation scores: class-balanced, seeded per batch, resumable.

The protocol (docs/EVALUATION.md: the same number of samples per class):

    labels     yᵢ = i mod C                  for i = 0 .. N−1, so every batch of a multiple of C is balanced
    batch b    samples i ∈ [b·B, min((b+1)·B, N))
    noise      ε_b ~ N(0, I) from a CPU generator seeded by mix(seed, b)    (moedit.generate.generate)

Each batch owns its noise stream, so batch b is the same images whether the run reaches it straight
through or after an interruption: resuming replays nothing and shifts nothing. `mix` is numpy's
SeedSequence, whose hashing keeps the streams of nearby (seed, b) pairs unrelated, unlike seed + b
(seed 0 batch 1 would repeat seed 1 batch 0).

Samples depend on more than the seed: a router that ranks tokens across the batch (expert choice) sees
the batch, and kernels round differently per shape and device. So the batch size, device type and
compute precision are part of what made the images, recorded in `EvalSettings` beside the checkpoint
and sampler settings.

Cache: after every batch the finished prefix is written, atomically, to one .npz (`images` uint8
(n_done, C, H, W), or clips (n_done, C, T, H, W) for a video model, `labels` int64, `settings` the JSON
of the EvalSettings that made them). A cache made under other settings is refused, never mixed in or
overwritten.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moedit.config import SampleConfig
from moedit.data.base import to_uint8
from moedit.generate import generate
from moedit.utils.npz import NPZ_READ_ERRORS, save_npz

# bump when the label / noise / cache layout changes, so caches from before are refused, not misread
CACHE_FORMAT = 1


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message names the problem and the fix."""


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """Everything that decides which images an evaluation draws (and nothing that only scores them)."""

    n: int
    num_classes: int
    seed: int
    batch_size: int
    sampler: str
    steps: int
    cfg_scale: float
    cfg_interval: list[float] | None
    weights: str  # "ema" | "raw"
    checkpoint_step: int
    weights_sha256: str  # of the weights file read, so a re-trained checkpoint at the same step differs
    device_type: str  # "cpu" | "cuda" | ...: the same seed rounds differently per device
    precision: str  # "fp32" | "bf16" (autocast while sampling)
    cache_format: int = field(default=CACHE_FORMAT)
    cfg_channels: int | None = None  # guided channels (null = all); left out of as_dict when null
    codec: str | None = None  # the decoder's description for latent runs; null (pixel runs) left out of as_dict

    def as_dict(self) -> dict:
        """The settings as stored with a cache; `cfg_channels` only when set, so that caches written before
        the option existed (all channels guided) still match their settings."""
        d = asdict(self)
        for key in ("cfg_channels", "codec"):
            if d[key] is None:
                del d[key]
        return d

    def sample_config(self, seed: int) -> SampleConfig:
        interval = list(self.cfg_interval) if self.cfg_interval is not None else None
        return SampleConfig(sampler=self.sampler, steps=self.steps, cfg_scale=self.cfg_scale,
                            cfg_interval=interval, cfg_channels=self.cfg_channels, seed=seed)


def check_balanced(n: int, num_classes: int) -> None:
    if n < num_classes or n % num_classes:
        lower = max(num_classes, n // num_classes * num_classes)
        upper = max(num_classes, math.ceil(n / num_classes) * num_classes)
        raise EvalError(f"n={n} is not a positive multiple of the {num_classes} classes, so the labels cannot be "
                        f"class-balanced; use n={lower} or n={upper}")


def class_balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """y_N with yᵢ = i mod C: n / C samples per class, interleaved so each batch is balanced too."""
    check_balanced(n, num_classes)
    return torch.arange(n) % num_classes


def batch_seed(seed: int, batch_index: int) -> int:
    """A 64-bit seed for batch `batch_index`'s noise, hashed from (seed, batch_index) by SeedSequence."""
    lo, hi = np.random.SeedSequence([seed, batch_index]).generate_state(2, dtype=np.uint32)
    return int(lo) | (int(hi) << 32)


# ----------------------------------------------------------------------------- cache


def _settings_diff(stored: dict, wanted: dict) -> list[str]:
    keys = sorted(set(stored) | set(wanted))
    return [f"{k}: cached {stored.get(k)!r}, now {wanted.get(k)!r}" for k in keys if stored.get(k) != wanted.get(k)]


def read_cache(path: Path, settings: EvalSettings) -> tuple[np.ndarray, np.ndarray] | None:
    """(images, labels) finished so far, or None without a cache; refuses one made by other settings."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            stored = json.loads(str(f["settings"]))
            images, labels = f["images"], f["labels"]
    except NPZ_READ_ERRORS as exc:
        raise EvalError(f"sample cache {path} cannot be read ({exc}); delete it to sample again") from exc
    diffs = _settings_diff(stored, settings.as_dict())
    if diffs:
        raise EvalError(f"{path} holds samples made with other settings:\n  " + "\n  ".join(diffs)
                        + f"\nNothing was changed. Pass another output folder, or delete {path.parent} to start over.")
    expected = class_balanced_labels(settings.n, settings.num_classes)[: len(labels)].numpy()
    if len(images) != len(labels) or len(labels) > settings.n or not np.array_equal(labels, expected):
        raise EvalError(f"sample cache {path} is inconsistent ({len(images)} images, {len(labels)} labels); "
                        "delete it to sample again")
    return images, labels


def write_cache(path: Path, settings: EvalSettings, images: np.ndarray, labels: np.ndarray) -> None:
    save_npz(path, images=images, labels=labels, settings=np.array(json.dumps(settings.as_dict())))


# ----------------------------------------------------------------------------- sampling


def sample_for_eval(model: torch.nn.Module, objective, settings: EvalSettings, cache_path: Path,
                    device: torch.device, amp_dtype: torch.dtype | None = None, progress: bool = False,
                    on_batch: Callable[[int, int], None] | None = None,
                    log: Callable[[str], None] | None = None, codec=None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, C, H, W), labels int64 (N,)), continuing from `cache_path` if it holds a prefix; a
    video model (model.frames > 1) gives clips uint8 (N, C, T, H, W) the same way.

    `on_batch(done, total)` is called after each batch is safely in the cache (a hook for progress
    reporting, or for tests that interrupt a run)."""
    labels_N = class_balanced_labels(settings.n, settings.num_classes)
    m = model.cfg
    if getattr(m, "frames", 1) > 1:  # a video model: clips (C, T, H, W), in pixel space (video refuses codecs)
        shape = tuple(model.input_shape())
    else:
        channels, size = codec.pixel_shape(m.in_channels, m.image_size) if codec is not None else (m.in_channels, m.image_size)
        shape = (channels, size, size)
    images_N = np.zeros((settings.n, *shape), dtype=np.uint8)
    cached = read_cache(cache_path, settings)
    done = 0 if cached is None else len(cached[0])
    if cached is not None:
        images_N[:done] = cached[0]
        if log is not None:
            log(f"continuing from {done}/{settings.n} samples cached in {cache_path}")
    bs = settings.batch_size
    total = math.ceil(settings.n / bs)
    if done % bs and done != settings.n:  # only whole batches are ever written
        raise EvalError(f"sample cache {cache_path} ends mid-batch ({done} images, batch {bs}); delete it")
    with tqdm(total=settings.n, initial=done, desc="sampling", unit="img", disable=not progress) as bar:
        for b in range(done // bs, total):
            start, stop = b * bs, min((b + 1) * bs, settings.n)
            x_BCHW = generate(model, objective, settings.sample_config(batch_seed(settings.seed, b)),
                              labels_N[start:stop], device, amp_dtype, max_batch=bs, codec=codec)
            images_N[start:stop] = to_uint8(x_BCHW).numpy()
            write_cache(cache_path, settings, images_N[:stop], labels_N[:stop].numpy())
            bar.update(stop - start)
            if on_batch is not None:
                on_batch(b + 1, total)
    return images_N, labels_N.numpy()

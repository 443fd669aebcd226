"""Generation glue shared by the trainer and `moedit sample`: seeded noise, classifier-free guidance
around the model, the configured sampler, the codec's decoder (latents -> images), and a class-per-row
PNG grid (video: a contact sheet, one row per clip, and an animated GIF of the class-per-row grid)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from moedit.codecs import Codec
from moedit.config import SampleConfig
from moedit.samplers import build_sampler
from moedit.samplers.guidance import classifier_free_guidance
from moedit.utils.images import save_grid
from moedit.utils.video import save_contact_sheet, save_gif


def _model_fn(model: torch.nn.Module, amp_dtype: torch.dtype | None):
    def fn(x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(x_BCHW.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with ctx:
            # samplers integrate the first C channels (a learned-sigma model predicts 2·C)
            return model(x_BCHW, t_B, y_B)[:, : x_BCHW.shape[1]].float()

    return fn


@torch.no_grad()
def generate(model: torch.nn.Module, objective, cfg: SampleConfig, y_B: torch.Tensor, device: torch.device,
             amp_dtype: torch.dtype | None = None, max_batch: int = 256, progress: bool = False,
             codec: Codec | None = None) -> torch.Tensor:
    """Images in [-1, 1] (float32, on CPU) for labels y_B, decoded by `codec` (none: the model works in
    pixels); noise is drawn from `cfg.seed` on the CPU so the same seed gives the same samples on any device."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    noise_BCHW = torch.randn((len(y_B), *model.input_shape()), generator=gen)  # clips: B×C×T×H×W
    model_fn = _model_fn(model, amp_dtype)
    if cfg.cfg_scale != 1.0:
        interval = tuple(cfg.cfg_interval) if cfg.cfg_interval is not None else None
        model_fn = classifier_free_guidance(model_fn, cfg.cfg_scale, model.null_label, interval, cfg.cfg_channels)
    sampler = build_sampler(cfg.sampler, objective)
    out = []
    for start in range(0, len(y_B), max_batch):
        chunk = slice(start, start + max_batch)
        x_BCHW = sampler.sample(model_fn, noise_BCHW[chunk].to(device), y_B[chunk].to(device),
                                steps=cfg.steps, progress=progress)
        x_BCHW = codec.decode(x_BCHW.float()) if codec is not None else x_BCHW.float()
        out.append(x_BCHW.clamp(-1, 1).cpu())
    model.train(was_training)
    return torch.cat(out)


def class_labels(num_classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(per_class)


def save_class_grid(model: torch.nn.Module, objective, cfg: SampleConfig, num_classes: int, device: torch.device,
                    path: Path, amp_dtype: torch.dtype | None = None, progress: bool = False,
                    codec: Codec | None = None) -> torch.Tensor:
    """One row per class, `cfg.per_class` samples per row; clips: `path` is the contact sheet (one row per
    clip, classes in order) and `path` with .gif the animated grid (one class per row)."""
    x = generate(model, objective, cfg, class_labels(num_classes, cfg.per_class), device, amp_dtype,
                 progress=progress, codec=codec)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 5:
        save_contact_sheet(x, path)
        save_gif(x, Path(path).with_suffix(".gif"), nrow=cfg.per_class)
    else:
        save_grid(x, path, nrow=cfg.per_class)
    return x

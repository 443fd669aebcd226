"""AdamW with DiT-style parameter groups and a linear warm-up.

- No weight decay on biases, norm weights, embeddings' tables, RoPE/positions, router biases and
  any 1-D parameter: decaying them pulls scales and offsets to zero for no regularisation gain.
- Parameters are float32 by default (mixed precision is autocast only), so router and prototype
  updates are never truncated to bf16 — docs/ROUTING_MATH.md §7.4, the bf16 trap. With
  train.param_dtype=bf16 the AdamW runs in float32 on work copies and rounds back into bf16 storage
  (train/bf16.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moedit.config import TrainConfig
from moedit.train.bf16 import Bf16StorageOptimizer


_NO_DECAY_MODULES = (nn.LayerNorm, nn.RMSNorm, nn.Embedding)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters by their owning module: biases, norms, embedding tables, 1-D tensors and any
    name a module lists in `no_weight_decay` (e.g. stacked expert biases b1_EH) get no decay."""
    decay, no_decay = [], []
    for module in model.modules():
        exempt = set(getattr(module, "no_weight_decay", ()))
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            skip = param.ndim < 2 or name == "bias" or name in exempt or isinstance(module, _NO_DECAY_MODULES)
            (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device, seed: int = 0):
    """AdamW; wrapped in a `Bf16StorageOptimizer` when any parameter is stored in bfloat16
    (`seed` seeds its stochastic rounding)."""
    # one fused kernel for every parameter, on CUDA and on CPU (torch >= 2.4): on CPU it is ~3.5x faster than
    # the foreach path for the quickstart's 1.9M parameters (1.6 vs 5.7 ms) (docs/QUICKSTART.md, "The step")
    fused = device.type in ("cuda", "cpu")

    def adamw(groups: list[dict]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)

    groups = param_groups(model, cfg.weight_decay)
    if all(p.dtype != torch.bfloat16 for g in groups for p in g["params"]):
        return adamw(groups)
    return Bf16StorageOptimizer(groups, adamw, stochastic=cfg.stochastic_rounding, seed=seed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then constant (DiT) or a cosine from lr down to
    min_lr_ratio·lr at the last step; a pure function of the step, so resuming needs no state."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - 1 - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

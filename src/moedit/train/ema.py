"""Exponential moving average of the model's weights (and a copy of its buffers).

θ_ema ← d·θ_ema + (1 − d)·θ with d = min(decay, (1 + n) / (10 + n)) at update n: the ramp keeps the
first few hundred steps of a short run from being dominated by the random initialisation.
Buffers (e.g. a router's selection bias) are copied, not averaged: they are state, not weights.
The EMA weights are float32 whatever the model stores (train.param_dtype=bf16 included): an EMA step
moves θ_ema by (1 − d)·(θ − θ_ema), which in bf16 would fall below half an ulp and be lost (the bf16
trap, docs/PRECISION.md), freezing the EMA at its initial value.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        for param in self.model.parameters():
            param.data = param.data.float()  # float32 even for bf16-stored weights: see the docstring

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = dict(self.model.named_parameters())
        for name, param in model.named_parameters():
            ema_params[name].lerp_(param.detach().float(), 1.0 - d)
        ema_buffers = dict(self.model.named_buffers())
        for name, buf in model.named_buffers():
            ema_buffers[name].copy_(buf)
        self.updates += 1

"""Rectified flow / flow matching (Liu et al., arXiv 2209.03003; Lipman et al., arXiv 2210.02747).

    x_t = (1 − t)·x0 + t·ε,   ε ~ N(0, I),   t ∈ [0, 1] (t = 0 data, t = 1 noise)
    v*  = dx_t/dt = ε − x0                  (the regression target)
    L   = E_{t, x0, ε} ‖v_θ(x_t, t, y) − (ε − x0)‖²

t is drawn by `timesteps.sample_time` (uniform or logit-normal with shift). Sampling integrates
dx/dt = v_θ from t = 1 to t = 0 (samplers/euler.py, samplers/heun.py). Train and eval are the same.
"""

from __future__ import annotations

import torch

from moedit.config import ObjectiveConfig
from moedit.objectives.timesteps import sample_time


class RectifiedFlow:
    prediction_kind = "velocity"

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    @staticmethod
    def interpolate(x0_BCHW: torch.Tensor, eps_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        t = t_B.view(-1, *([1] * (x0_BCHW.ndim - 1)))
        return (1 - t) * x0_BCHW + t * eps_BCHW

    @staticmethod
    def target(x0_BCHW: torch.Tensor, eps_BCHW: torch.Tensor) -> torch.Tensor:
        return eps_BCHW - x0_BCHW

    def loss(self, model_fn, x0_BCHW: torch.Tensor, y_B: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        t_B = sample_time(self.cfg, x0_BCHW.shape[0], x0_BCHW.device, generator)
        eps_BCHW = torch.randn(x0_BCHW.shape, generator=generator, device=x0_BCHW.device)
        x_t = self.interpolate(x0_BCHW, eps_BCHW, t_B)
        v_BCHW = model_fn(x_t, t_B, y_B)
        loss = (v_BCHW.float() - self.target(x0_BCHW, eps_BCHW)).square().mean()
        return loss, {"t_B": t_B}

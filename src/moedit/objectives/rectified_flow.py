"""Rectified flow / flow matching (Liu et al., arXiv 2209.03003; Lipman et al., arXiv 2210.02747).

    x_t = (1 − t)·x0 + t·ε,   ε ~ N(0, I),   t ∈ [0, 1] (t = 0 data, t = 1 noise)
    v   = dx_t/dt = ε − x0                  (the regression target; constant along each path)
    L   = E_{t, x0, ε} ‖v_θ(x_t, t, y) − v‖²   (mean over every element)

t is drawn by `timesteps.sample_time` (uniform or logit-normal, then the SD3 shift). Sampling
integrates dx/dt = v_θ from t = 1 to t = 0 (samplers/euler.py, samplers/heun.py). There is no
train/eval difference.
"""

from __future__ import annotations

import torch

from moedit.config import ObjectiveConfig
from moedit.objectives.base import Objective
from moedit.objectives.timesteps import sample_time, standard_normal


def _per_sample(t_B: torch.Tensor, like_BCHW: torch.Tensor) -> torch.Tensor:
    return t_B.view(-1, *([1] * (like_BCHW.ndim - 1)))


class RectifiedFlow(Objective):
    prediction_kind = "velocity"

    def __init__(self, cfg: ObjectiveConfig | None = None):
        self.cfg = cfg if cfg is not None else ObjectiveConfig(name="rectified_flow")

    @staticmethod
    def interpolate(x0_BCHW: torch.Tensor, eps_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """x_t = (1 − t)·x0 + t·ε."""
        t = _per_sample(t_B, x0_BCHW)
        return (1 - t) * x0_BCHW + t * eps_BCHW

    @staticmethod
    def target(x0_BCHW: torch.Tensor, eps_BCHW: torch.Tensor, t_B: torch.Tensor | None = None) -> torch.Tensor:
        """v = ε − x0; t_B is accepted for a common objective signature, the straight path ignores it."""
        return eps_BCHW - x0_BCHW

    def training_target(self, x0_BCHW: torch.Tensor, generator: torch.Generator | None = None):
        """One draw of (x_t, t, v) for a batch of data, as `loss` uses it."""
        t_B = sample_time(self.cfg, x0_BCHW.shape[0], x0_BCHW.device, generator)
        eps_BCHW = standard_normal(x0_BCHW.shape, x0_BCHW.device, generator)
        return self.interpolate(x0_BCHW, eps_BCHW, t_B), t_B, self.target(x0_BCHW, eps_BCHW, t_B)

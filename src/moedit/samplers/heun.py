"""Heun sampler (explicit trapezoid rule, 2nd order) for flow objectives, t = 1 → 0:

    v1 = v_θ(x_i, t_i),   x̃ = x_i + h·v1,   v2 = v_θ(x̃, t_{i+1}),   x_{i+1} = x_i + h·(v1 + v2)/2

on the uniform grid of euler.py, h = t_{i+1} − t_i = −1/S. Unlike EDM's Heun (Karras et al., arXiv
2206.00364 Alg. 1), whose last step is Euler because its σ-parameterised ODE is singular at σ = 0, the
correction is applied on every step, the last included: a flow's velocity is defined at t = 0. So the
method is 2nd order throughout, the global error falls as 1/S² for 2·S model calls. State in float32
(see euler.py).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from moedit.samplers.euler import time_grid


class HeunSampler:
    def __init__(self, objective=None):
        self.objective = objective  # unused: the flow ODE needs nothing from the objective

    @torch.no_grad()
    def sample(self, model_fn, noise_BCHW: torch.Tensor, y_B: torch.Tensor, steps: int,
               progress: bool = False) -> torch.Tensor:
        x_BCHW = noise_BCHW.float()  # float32 state, see euler.py
        ts = time_grid(steps, x_BCHW.device)
        B = x_BCHW.shape[0]
        for i in tqdm(range(steps), desc="heun", disable=not progress, leave=False):
            h = ts[i + 1] - ts[i]
            v1_BCHW = model_fn(x_BCHW, ts[i].expand(B), y_B).float()
            v2_BCHW = model_fn(x_BCHW + h * v1_BCHW, ts[i + 1].expand(B), y_B).float()
            x_BCHW = x_BCHW + h * 0.5 * (v1_BCHW + v2_BCHW)
        return x_BCHW

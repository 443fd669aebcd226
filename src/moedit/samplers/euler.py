"""Euler sampler for flow objectives: integrate dx/dt = v_θ(x, t, y) from t = 1 (noise) to t = 0.

    t_i = 1 − i/S (i = 0..S),   x_{i+1} = x_i + h·v_θ(x_i, t_i, y),   h = t_{i+1} − t_i = −1/S

First order: the global error falls as 1/S for S model calls. The state is integrated in float32
whatever the model's precision: a bf16 state would add a rounding error of ~4e-3 per step, larger
than the step's own truncation error at useful step counts.
"""

from __future__ import annotations

import torch
from tqdm import tqdm


def time_grid(steps: int, device: torch.device | str) -> torch.Tensor:
    """S + 1 uniformly spaced times from 1 down to 0 (float32)."""
    if steps < 1:
        raise ValueError(f"sample.steps must be at least 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float32)


class EulerSampler:
    def __init__(self, objective=None):
        self.objective = objective  # unused: the flow ODE needs nothing from the objective

    @torch.no_grad()
    def sample(self, model_fn, noise_BCHW: torch.Tensor, y_B: torch.Tensor, steps: int,
               progress: bool = False) -> torch.Tensor:
        x_BCHW = noise_BCHW.float()  # float32 state, see the module docstring
        ts = time_grid(steps, x_BCHW.device)
        B = x_BCHW.shape[0]
        for i in tqdm(range(steps), desc="euler", disable=not progress, leave=False):
            h = ts[i + 1] - ts[i]
            x_BCHW = x_BCHW + h * model_fn(x_BCHW, ts[i].expand(B), y_B).float()
        return x_BCHW

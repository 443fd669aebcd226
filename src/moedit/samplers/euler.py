"""Euler sampler for flow objectives: integrate dx/dt = v_θ(x, t, y) from t = 1 (noise) to t = 0.

    t_i = 1 − i/S (i = 0..S),   x_{i+1} = x_i + (t_{i+1} − t_i)·v_θ(x_i, t_i)

First order: the global error falls as 1/S. The state is integrated in float32 whatever the model's
precision: a bf16 state would add a rounding error of ~4e-3 per step, larger than the step's own error.
"""

from __future__ import annotations

import torch
from tqdm import tqdm


def time_grid(steps: int, device: torch.device) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"sample.steps must be at least 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float32)


class EulerSampler:
    def __init__(self, objective=None):
        self.objective = objective

    @torch.no_grad()
    def sample(self, model_fn, noise_BCHW: torch.Tensor, y_B: torch.Tensor, steps: int,
               progress: bool = False) -> torch.Tensor:
        x = noise_BCHW.float()
        ts = time_grid(steps, x.device)
        for i in tqdm(range(steps), desc="euler", disable=not progress, leave=False):
            t_B = ts[i].expand(x.shape[0])
            x = x + (ts[i + 1] - ts[i]) * model_fn(x, t_B, y_B).float()
        return x

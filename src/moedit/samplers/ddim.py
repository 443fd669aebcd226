"""DDIM sampler (Song et al., arXiv 2010.02502 eq. 12 and 16) on S evenly spaced indices of the DDPM chain.

Same respaced chain as samplers/ddpm.py (ᾱ = ᾱ_{n_j}, ᾱ_prev = ᾱ_{n_{j−1}}, = 1 after the last index):

    x̂0 = (x − √(1−ᾱ)·ε_θ(x, t_n, y)) / √ᾱ
    σ  = η·√((1−ᾱ_prev)/(1−ᾱ))·√(1 − ᾱ/ᾱ_prev)
    x  ← √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ²)·ε_θ + σ·z

η = 0 (default) is the deterministic DDIM ODE sampler; η = 1 has DDPM's posterior variance β̃. On the
last step ᾱ_prev = 1, so σ = 0 and x = x̂0. The model sees t_n = (n + 1)/T. Float32 state, float64
coefficients (see ddpm.py).
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from moedit.objectives.timesteps import standard_normal
from moedit.samplers.ddpm import predict_x0, reverse_chain


class DDIMSampler:
    def __init__(self, objective, eta: float = 0.0):
        if eta < 0:
            raise ValueError(f"DDIM eta must be >= 0 (0 = deterministic, 1 = DDPM variance), got {eta}")
        self.objective, self.eta = objective, eta

    @torch.no_grad()
    def sample(self, model_fn, noise_BCHW: torch.Tensor, y_B: torch.Tensor, steps: int,
               progress: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        x_BCHW = noise_BCHW.float()  # float32 state, see ddpm.py
        B = x_BCHW.shape[0]
        for n, a, a_prev in tqdm(reverse_chain(self.objective, steps), desc="ddim", disable=not progress, leave=False):
            t_B = self.objective.time_of(torch.full((B,), n, device=x_BCHW.device))
            eps_BCHW = model_fn(x_BCHW, t_B, y_B).float()
            x0_BCHW = predict_x0(x_BCHW, eps_BCHW, a)
            sigma = self.eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
            # max(·, 0): with η > 1 the requested σ² can exceed 1 − ᾱ_prev
            x_BCHW = math.sqrt(a_prev) * x0_BCHW + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps_BCHW
            if sigma > 0:
                x_BCHW = x_BCHW + sigma * standard_normal(x_BCHW.shape, x_BCHW.device, generator)
        return x_BCHW

"""DDIM sampler (Song et al., arXiv 2010.02502 eq. 12) on S evenly spaced indices of the DDPM chain.

    x̂0 = (x − √(1−ᾱ)·ε_θ) / √ᾱ
    σ  = η·√((1−ᾱ_prev)/(1−ᾱ))·√(1 − ᾱ/ᾱ_prev)
    x  ← √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ²)·ε_θ + σ·z      (ᾱ_prev = 1 after the last index)

η = 0 (default) is deterministic; η = 1 matches DDPM's posterior variance. Float32 state.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from moedit.samplers.ddpm import respaced_indices


class DDIMSampler:
    def __init__(self, objective, eta: float = 0.0):
        self.objective, self.eta = objective, eta

    @torch.no_grad()
    def sample(self, model_fn, noise_BCHW: torch.Tensor, y_B: torch.Tensor, steps: int,
               progress: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        obj = self.objective
        idx = respaced_indices(obj.T, steps)[::-1]
        abar = obj.alphas_cumprod.to(noise_BCHW.device)
        x = noise_BCHW.float()
        B = x.shape[0]
        for j, n in enumerate(tqdm(idx, desc="ddim", disable=not progress, leave=False)):
            a, a_prev = abar[n], (abar[idx[j + 1]] if j + 1 < len(idx) else abar.new_tensor(1.0))
            eps = model_fn(x, obj.time_of(torch.full((B,), n, device=x.device)), y_B).float()
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            sigma = self.eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
            if self.eta > 0 and j + 1 < len(idx):
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        return x

"""DDPM ancestral sampler (Ho et al., arXiv 2006.11239 Alg. 2) on a respaced chain.

With S ≤ T steps the chain visits indices n_S > … > n_1 evenly spaced in {0..T−1} and uses the
respaced β'_j = 1 − ᾱ_{n_j}/ᾱ_{n_{j−1}} (Nichol & Dhariwal, arXiv 2102.09672 §4), so S = T is exactly
the original sampler. Each step:

    x̂0 = (x − √(1−ᾱ)·ε_θ) / √ᾱ
    μ  = √ᾱ_prev·β'/(1−ᾱ)·x̂0 + √(1−β')·(1−ᾱ_prev)/(1−ᾱ)·x,   σ² = β̃ = β'·(1−ᾱ_prev)/(1−ᾱ)
    x  ← μ + σ·z  (no noise on the last step)

The model sees t = (n + 1)/T (objectives/ddpm.py). Float32 state.
"""

from __future__ import annotations

import torch
from tqdm import tqdm


def respaced_indices(T: int, steps: int) -> list[int]:
    if not 1 <= steps <= T:
        raise ValueError(f"sample.steps must be between 1 and the objective's {T} steps, got {steps}")
    return sorted({round(i * (T - 1) / max(steps - 1, 1)) for i in range(steps)}) if steps > 1 else [T - 1]


class DDPMSampler:
    def __init__(self, objective):
        self.objective = objective

    @torch.no_grad()
    def sample(self, model_fn, noise_BCHW: torch.Tensor, y_B: torch.Tensor, steps: int,
               progress: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        obj = self.objective
        idx = respaced_indices(obj.T, steps)[::-1]
        abar = obj.alphas_cumprod.to(noise_BCHW.device)
        x = noise_BCHW.float()
        B = x.shape[0]
        for j, n in enumerate(tqdm(idx, desc="ddpm", disable=not progress, leave=False)):
            a, a_prev = abar[n], (abar[idx[j + 1]] if j + 1 < len(idx) else abar.new_tensor(1.0))
            beta = 1 - a / a_prev
            eps = model_fn(x, obj.time_of(torch.full((B,), n, device=x.device)), y_B).float()
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            mean = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * x) / (1 - a)
            if j + 1 < len(idx):
                var = beta * (1 - a_prev) / (1 - a)
                z = torch.randn(x.shape, generator=generator, device=x.device)
                x = mean + var.sqrt() * z
            else:
                x = mean
        return x

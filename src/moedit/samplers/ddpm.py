"""DDPM ancestral sampler (Ho et al., arXiv 2006.11239 Alg. 2) on a respaced chain.

With S ≤ T steps the chain visits indices n_S > … > n_1 evenly spaced in {0..T−1}, always starting at
the noisiest n = T − 1 and ending at n = 0, and uses the respaced β'_j = 1 − ᾱ_{n_j}/ᾱ_{n_{j−1}}
(Nichol & Dhariwal, arXiv 2102.09672 §4), so S = T is exactly Ho's sampler. Each step, writing
ᾱ = ᾱ_{n_j}, ᾱ_prev = ᾱ_{n_{j−1}} (= 1 after the last index):

    x̂0 = (x − √(1−ᾱ)·ε_θ(x, t_n, y)) / √ᾱ
    μ̃  = √ᾱ_prev·β'/(1−ᾱ)·x̂0 + √(1−β')·(1−ᾱ_prev)/(1−ᾱ)·x        (Ho eq. 7)
    β̃  = β'·(1−ᾱ_prev)/(1−ᾱ),   x ← μ̃ + √β̃·z       (β̃ = 0 on the last step: x = x̂0)

The model sees t_n = (n + 1)/T (objectives/ddpm.py `time_of`). x̂0 is not clipped: the sampler does
not know the data range. The state is float32; the per-step coefficients are Python floats (float64)
computed from the stored float32 ᾱ, so 1 − ᾱ/ᾱ_prev does not lose digits a second time.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from moedit.objectives.timesteps import standard_normal


def respaced_indices(T: int, steps: int) -> list[int]:
    """S increasing indices of {0..T−1}, evenly spaced (rounded half up), first 0 and last T − 1."""
    if not 1 <= steps <= T:
        raise ValueError(f"sample.steps must be between 1 and the objective's ddpm_steps={T}, got {steps}")
    if steps == 1:
        return [T - 1]
    # integer rounding: spacing (T−1)/(S−1) ≥ 1 then gives S distinct indices
    return [(2 * i * (T - 1) + steps - 1) // (2 * (steps - 1)) for i in range(steps)]


def reverse_chain(objective, steps: int) -> list[tuple[int, float, float]]:
    """(n, ᾱ_n, ᾱ_prev) from the noisiest index down to 0; ᾱ_prev = 1 after the last index."""
    idx = respaced_indices(objective.T, steps)[::-1]
    abar = objective.alphas_cumprod.double().tolist()
    prev = [abar[n] for n in idx[1:]] + [1.0]
    return [(n, abar[n], a_prev) for n, a_prev in zip(idx, prev)]


def predict_x0(x_BCHW: torch.Tensor, eps_BCHW: torch.Tensor, a: float) -> torch.Tensor:
    """x̂0 = (x − √(1−ᾱ)·ε) / √ᾱ."""
    return (x_BCHW - math.sqrt(1 - a) * eps_BCHW) / math.sqrt(a)


class DDPMSampler:
    def __init__(self, objective):
        self.objective = objective

    @torch.no_grad()
    def sample(self, model_fn, noise_BCHW: torch.Tensor, y_B: torch.Tensor, steps: int,
               progress: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        x_BCHW = noise_BCHW.float()  # float32 state, see the module docstring
        B = x_BCHW.shape[0]
        for n, a, a_prev in tqdm(reverse_chain(self.objective, steps), desc="ddpm", disable=not progress, leave=False):
            t_B = self.objective.time_of(torch.full((B,), n, device=x_BCHW.device))
            eps_BCHW = model_fn(x_BCHW, t_B, y_B).float()
            beta = 1 - a / a_prev
            x0_BCHW = predict_x0(x_BCHW, eps_BCHW, a)
            mean_BCHW = (math.sqrt(a_prev) * beta / (1 - a)) * x0_BCHW \
                + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)) * x_BCHW
            var = beta * (1 - a_prev) / (1 - a)
            if var > 0:
                mean_BCHW = mean_BCHW + math.sqrt(var) * standard_normal(x_BCHW.shape, x_BCHW.device, generator)
            x_BCHW = mean_BCHW
        return x_BCHW

"""DDPM with ε-prediction (Ho et al., arXiv 2006.11239), the objective of DiT and DiT-MoE.

    β_n: linear from β_start = 1e-4 to β_end = 0.02 over T = 1000 steps (Ho et al. §4), or cosine
         (Nichol & Dhariwal, arXiv 2102.09672 eq. 17, β clipped at 0.999)
    ᾱ_n = Π_{m ≤ n} (1 − β_m),   x_n = √ᾱ_n·x0 + √(1 − ᾱ_n)·ε,   n ∈ {0, …, T − 1}
    L   = E ‖ε_θ(x_n, t_n, y) − ε‖²

Time convention: the model is fed t_n = (n + 1) / T ∈ (0, 1], so t → 0 is clean data and t = 1 the
noisiest step, matching rectified flow's t. Training and both DDPM samplers use this one mapping.
"""

from __future__ import annotations

import math

import torch

from moedit.config import ObjectiveConfig


def make_betas(cfg: ObjectiveConfig) -> torch.Tensor:
    T = cfg.ddpm_steps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    if cfg.beta_schedule == "cosine":
        s = 0.008
        f = lambda n: math.cos((n / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f(n + 1) / f(n), 0.999) for n in range(T)], dtype=torch.float64)
    raise ValueError(f"objective.beta_schedule={cfg.beta_schedule!r} is unknown; choose linear or cosine")


class DDPM:
    prediction_kind = "epsilon"

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self.T = cfg.ddpm_steps
        betas = make_betas(cfg)
        # products in float64: ᾱ at n = 999 is ~4e-5 and float32 cumprod drifts visibly there
        self.betas = betas.float()
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()

    def time_of(self, n_B: torch.Tensor) -> torch.Tensor:
        """Discrete index n ∈ {0..T−1} → model time t = (n + 1) / T."""
        return (n_B.float() + 1) / self.T

    def alpha_bar(self, n_B: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(n_B.device)[n_B]

    def noise_to(self, x0_BCHW: torch.Tensor, eps_BCHW: torch.Tensor, n_B: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(n_B).view(-1, *([1] * (x0_BCHW.ndim - 1)))
        return a.sqrt() * x0_BCHW + (1 - a).sqrt() * eps_BCHW

    def loss(self, model_fn, x0_BCHW: torch.Tensor, y_B: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        B, device = x0_BCHW.shape[0], x0_BCHW.device
        n_B = torch.randint(0, self.T, (B,), generator=generator, device=device)
        eps_BCHW = torch.randn(x0_BCHW.shape, generator=generator, device=device)
        x_n = self.noise_to(x0_BCHW, eps_BCHW, n_B)
        t_B = self.time_of(n_B)
        eps_pred = model_fn(x_n, t_B, y_B)
        return (eps_pred.float() - eps_BCHW).square().mean(), {"t_B": t_B}

"""DDPM with ε-prediction (Ho et al., arXiv 2006.11239), the objective of DiT and DiT-MoE.

    β_n : linear from β_start = 1e-4 to β_end = 0.02 over T = 1000 steps (Ho et al. §4), or cosine
          (Nichol & Dhariwal, arXiv 2102.09672 eq. 17): ᾱ(τ) = f(τ)/f(0), f(τ) = cos²((τ/T + s)/(1 + s)·π/2),
          s = 0.008, β = 1 − ᾱ(τ)/ᾱ(τ − 1) clipped at 0.999
    ᾱ_n = Π_{m ≤ n} (1 − β_m),   x_n = √ᾱ_n·x0 + √(1 − ᾱ_n)·ε,   n ∈ {0, …, T − 1}, n uniform
    L   = E ‖ε_θ(x_n, t_n, y) − ε‖²   (mean over every element)

Index n here is Ho's step τ = n + 1 (Ho counts 1..T, x_0 being the data). Time convention: the model
is fed t_n = (n + 1)/T = τ/T ∈ (0, 1], so t = 0 would be the clean data, t = 1 the noisiest step and
1000·t (the model's timestep embedding scale) is Ho's integer step. Training and both DDPM samplers
use this one mapping, `time_of`. ᾱ is accumulated in float64 (at n = 999 the linear ᾱ is ~4e-5 and a
float32 product drifts there) and stored in float32.
"""

from __future__ import annotations

import math

import torch

from moedit.config import ObjectiveConfig
from moedit.objectives.base import Objective
from moedit.objectives.timesteps import random_index, standard_normal

BETA_SCHEDULES = ("linear", "cosine")


def linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"objective.beta_start={beta_start} and beta_end={beta_end} must satisfy "
                         "0 < beta_start <= beta_end < 1 (DDPM uses 1e-4 and 0.02)")
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    # the clip keeps β_T < 1: unclipped, ᾱ(T) = 0 and the last step would carry no signal at all
    def f(tau: float) -> float:
        return math.cos((tau / T + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor([min(1 - f(tau) / f(tau - 1), max_beta) for tau in range(1, T + 1)], dtype=torch.float64)


def make_betas(cfg: ObjectiveConfig) -> torch.Tensor:
    """β_n for n = 0..T−1 in float64."""
    if cfg.ddpm_steps < 1:
        raise ValueError(f"objective.ddpm_steps must be at least 1, got {cfg.ddpm_steps}")
    if cfg.beta_schedule == "linear":
        return linear_betas(cfg.ddpm_steps, cfg.beta_start, cfg.beta_end)
    if cfg.beta_schedule == "cosine":
        return cosine_betas(cfg.ddpm_steps)
    raise ValueError(f"objective.beta_schedule={cfg.beta_schedule!r} is unknown; "
                     f"choose one of: {', '.join(BETA_SCHEDULES)}")


class DDPM(Objective):
    prediction_kind = "epsilon"

    def __init__(self, cfg: ObjectiveConfig | None = None):
        self.cfg = cfg if cfg is not None else ObjectiveConfig(name="ddpm")
        self.T = self.cfg.ddpm_steps
        betas = make_betas(self.cfg)
        self.betas = betas.float()
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()

    def time_of(self, n_B: torch.Tensor) -> torch.Tensor:
        """Discrete index n ∈ {0..T−1} → model time t = (n + 1)/T (float32)."""
        return (n_B.float() + 1) / self.T

    def alpha_bar(self, n_B: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(n_B.device)[n_B]

    def interpolate(self, x0_BCHW: torch.Tensor, eps_BCHW: torch.Tensor, n_B: torch.Tensor) -> torch.Tensor:
        """x_n = √ᾱ_n·x0 + √(1 − ᾱ_n)·ε."""
        a = self.alpha_bar(n_B).view(-1, *([1] * (x0_BCHW.ndim - 1)))
        return a.sqrt() * x0_BCHW + (1 - a).sqrt() * eps_BCHW

    @staticmethod
    def target(x0_BCHW: torch.Tensor, eps_BCHW: torch.Tensor, n_B: torch.Tensor | None = None) -> torch.Tensor:
        """The ε-prediction target is the noise itself."""
        return eps_BCHW

    def training_target(self, x0_BCHW: torch.Tensor, generator: torch.Generator | None = None):
        """One draw of (x_n, t_n, ε) for a batch of data, as `loss` uses it."""
        n_B = random_index(self.T, x0_BCHW.shape[0], x0_BCHW.device, generator)
        eps_BCHW = standard_normal(x0_BCHW.shape, x0_BCHW.device, generator)
        return self.interpolate(x0_BCHW, eps_BCHW, n_B), self.time_of(n_B), self.target(x0_BCHW, eps_BCHW, n_B)

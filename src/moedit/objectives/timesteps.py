"""Training-time distributions of the diffusion time t ∈ (0, 1) (t = 0 data, t = 1 noise).

- uniform      : t ~ U(0, 1)
- logit_normal : t = sigmoid(m + s·n), n ~ N(0, 1) — SD3 (Esser et al., arXiv 2403.03206 §3.1),
                 which puts more steps at intermediate noise levels where the velocity is hardest.
- shift        : t' = shift·t / (1 + (shift − 1)·t) (SD3 §5.3.2); shift > 1 moves mass toward noise,
                 shift = 1 is the identity.
"""

from __future__ import annotations

import torch

from moedit.config import ObjectiveConfig


def shift_time(t_B: torch.Tensor, shift: float) -> torch.Tensor:
    if shift == 1.0:
        return t_B
    return shift * t_B / (1 + (shift - 1) * t_B)


def sample_time(cfg: ObjectiveConfig, batch: int, device: torch.device | str,
                generator: torch.Generator | None = None) -> torch.Tensor:
    if cfg.t_sampling == "uniform":
        t_B = torch.rand(batch, generator=generator, device=device)
    elif cfg.t_sampling == "logit_normal":
        n_B = torch.randn(batch, generator=generator, device=device)
        t_B = torch.sigmoid(cfg.logit_mean + cfg.logit_std * n_B)
    else:
        raise ValueError(f"objective.t_sampling={cfg.t_sampling!r} is unknown; choose uniform or logit_normal")
    return shift_time(t_B, cfg.t_shift)

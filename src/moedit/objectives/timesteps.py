"""Training-time distributions of the diffusion time t (t = 0 data, t = 1 noise), and seeded draws.

- uniform      : t ~ U[0, 1) (torch.rand; an exact t = 0 is harmless, the flow target is defined there)
- logit_normal : t = sigmoid(m + s·n), n ~ N(0, 1) — SD3 (Esser et al., arXiv 2403.03206 §3.1),
                 which puts more samples at intermediate noise levels, where the velocity is hardest.
- shift        : t' = shift·t / (1 + (shift − 1)·t) (SD3 §5.3.2), applied after either of the above;
                 shift > 1 moves mass toward noise, shift = 1 is the identity. It is monotone and
                 maps 0 → 0 and 1 → 1, so it reshapes the distribution without leaving [0, 1].

Random draws take an optional torch.Generator. They are made on the generator's device and then
moved, so one CPU generator seeded once gives the same numbers whether the run is on CPU or GPU.
"""

from __future__ import annotations

import torch

from moedit.config import ObjectiveConfig

T_SAMPLERS = ("uniform", "logit_normal")


def _draw_device(device: torch.device | str, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device(device)


def standard_normal(shape: tuple[int, ...] | torch.Size, device: torch.device | str,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """ε ~ N(0, I) in float32 on `device` (drawn on the generator's device when one is given)."""
    eps = torch.randn(tuple(shape), generator=generator, device=_draw_device(device, generator))
    return eps.to(device)


def random_index(T: int, batch: int, device: torch.device | str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """n_B uniform on {0, …, T − 1} (int64), the DDPM training index."""
    n_B = torch.randint(0, T, (batch,), generator=generator, device=_draw_device(device, generator))
    return n_B.to(device)


def uniform_time(batch: int, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    t_B = torch.rand(batch, generator=generator, device=_draw_device(device, generator))
    return t_B.to(device)


def logit_normal_time(batch: int, device: torch.device | str, mean: float = 0.0, std: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    n_B = torch.randn(batch, generator=generator, device=_draw_device(device, generator))
    return torch.sigmoid(mean + std * n_B).to(device)


def shift_time(t_B: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = shift·t / (1 + (shift − 1)·t); shift = 1 returns t_B itself."""
    if shift <= 0:
        raise ValueError(f"objective.t_shift must be positive (1 = no shift), got {shift}")
    if shift == 1.0:
        return t_B
    return shift * t_B / (1 + (shift - 1) * t_B)


def sample_time(cfg: ObjectiveConfig, batch: int, device: torch.device | str,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """t_B (float32) from cfg.t_sampling, then cfg.t_shift."""
    if cfg.t_sampling == "uniform":
        t_B = uniform_time(batch, device, generator)
    elif cfg.t_sampling == "logit_normal":
        t_B = logit_normal_time(batch, device, cfg.logit_mean, cfg.logit_std, generator)
    else:
        raise ValueError(f"objective.t_sampling={cfg.t_sampling!r} is unknown; choose one of: {', '.join(T_SAMPLERS)}")
    return shift_time(t_B, cfg.t_shift)

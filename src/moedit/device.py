"""Where a command runs and in which precision: `train.device` and `train.precision` resolved the same way
by every command (train, sample, eval, bench, the zoo), and the check that the chosen MoE backend can
run there. Low in the layers: it reads the config and torch, nothing else of moedit's but the fused
backend's own availability test."""

from __future__ import annotations

import torch

from moedit.config import Config, ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` = the GPU when there is one; a named CUDA device must exist on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available; use train.device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; pick one of them or use train.device=cuda")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for `bf16`, and for `auto` on CUDA; None = float32 compute."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def check_backend_runs(cfg: Config, device: torch.device) -> None:
    """The fused MoE backend needs Triton and CUDA: say so before anything is loaded or written."""
    moe = cfg.model.moe
    if moe is not None and moe.backend == "fused":
        from moedit.moe.glue_triton import unavailable_reason

        if (reason := unavailable_reason(device)) is not None:
            raise ConfigError(f"model.moe.backend=fused: {reason}")

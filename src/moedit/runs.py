"""Opening a run directory that `moedit train` (or `moedit convert`) wrote, the one way every command does it.

    run = open_run("runs/quickstart", overrides=["sample.steps=20"], allowed=SAMPLE_OVERRIDES)
    model = run.load_model("ema", device)       # the run's model with the checkpoint's EMA weights

`open_run` reads RUN/config.yaml, applies only the overrides the command allows (a run's model and
training settings are what its checkpoints were made with), picks the latest checkpoint unless one is
named, validates its state.json and files against the model config, and hands back the run. Every
problem is a ConfigError (the run directory or an override) or a CheckpointError (the checkpoint), with
one line that names it and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from moedit.config import Config, ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from moedit.train import checkpoint as ckpt

# what the reading commands may change: how to sample, and where (never the model or its training)
# codec.path: where the run's autoencoder folder is now (the weights must be the same ones)
SAMPLE_OVERRIDES = ("sample.", "train.device=", "codec.path=")
EVAL_OVERRIDES = ("sample.", "train.device=", "train.threads=", "codec.path=")
WEIGHTS = {"ema": "ema.safetensors", "raw": "model.safetensors"}


@dataclass
class Run:
    """A run directory opened at one checkpoint."""

    run_dir: Path
    cfg: Config  # config.yaml with the overrides applied
    trained_cfg: Config  # config.yaml as the run was trained
    path: Path  # the checkpoint directory
    state: dict  # its validated state.json

    @property
    def step(self) -> int:
        return int(self.state.get("step", self.path.name.removeprefix("step_")))

    def weights_file(self, weights: str = "ema") -> Path:
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {sorted(WEIGHTS)}, got {weights!r}")
        return self.path / WEIGHTS[weights]

    def load_model(self, weights: str = "ema", device: torch.device | str = "cpu") -> torch.nn.Module:
        """The run's model on `device` with the checkpoint's `weights` ("ema" | "raw") loaded and checked."""
        from moedit.models import build_model

        model = build_model(self.cfg.model).to(device)
        ckpt.load_weights(model, self.path, self.weights_file(weights).name)
        return model


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.yaml").is_file()


def latest_checkpoint(run_dir: Path) -> Path:
    found = ckpt.list_checkpoints(Path(run_dir) / "checkpoints")
    if not found:
        raise ConfigError(f"{run_dir} has no checkpoints yet; train it first (moedit train ...)")
    return found[-1]


def check_overrides(overrides: Sequence[str], allowed: Sequence[str], command: str) -> None:
    wrong = [s for s in overrides if not s.startswith(tuple(allowed))]
    if wrong:
        names = ", ".join(a.rstrip("=.") + ("*" if a.endswith(".") else "") for a in allowed)
        raise ConfigError(f"{command} only takes {names} overrides (a run's model and training are fixed by its "
                          f"checkpoints); got {wrong}")


def run_configs(run_dir: str | Path, overrides: Sequence[str] = (), allowed: Sequence[str] = EVAL_OVERRIDES,
                command: str = "this command") -> tuple[Config, Config]:
    """(config with `overrides` applied, config as trained) of the run in `run_dir`; each override must start
    with one of `allowed`."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir} is not a moedit run directory (no config.yaml); pass the train.out_dir of a run")
    check_overrides(overrides, allowed, command)
    raw = load_yaml(run_dir / "config.yaml")
    trained_cfg = from_dict(raw)
    return (from_dict(apply_overrides(raw, list(overrides))) if overrides else trained_cfg), trained_cfg


def open_run(run_dir: str | Path, checkpoint: str | Path | None = None, overrides: Sequence[str] = (),
             allowed: Sequence[str] = EVAL_OVERRIDES, command: str = "this command") -> Run:
    """The run in `run_dir` at `checkpoint` (default: its latest), with `overrides` applied to its config
    (`run_configs`). See the module docstring."""
    cfg, trained_cfg = run_configs(run_dir, overrides, allowed, command)
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(Path(run_dir))
    state = ckpt.read_state(path)
    ckpt.check_model_config(path, state, to_dict(cfg.model))
    return Run(Path(run_dir), cfg, trained_cfg, path, state)


def open_checkpoint(path: str | Path) -> tuple[Path, Path | None, dict]:
    """A checkpoint named by its run directory (the latest) or by its own `step_*` directory: returns
    (checkpoint directory, run directory or None when it has no config.yaml, validated state)."""
    path = Path(path)
    if (path / "state.json").is_file():
        ckpt_dir, run_dir = path, path.parent.parent
    elif is_run_dir(path):
        ckpt_dir, run_dir = latest_checkpoint(path), path
    else:
        raise ConfigError(f"{path} is not a moedit run directory (no config.yaml) or checkpoint directory "
                          "(no state.json)")
    return ckpt_dir, run_dir if is_run_dir(run_dir) else None, ckpt.read_state(ckpt_dir)

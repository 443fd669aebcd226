"""Checkpoints: safetensors weights plus a small JSON state, written atomically.

Layout of one checkpoint, `RUN/checkpoints/step_00001000/`:
    model.safetensors     raw weights and persistent buffers
    ema.safetensors       EMA weights (what sampling uses by default)
    trainer.safetensors   optimizer tensors and RNG states (exact resume)
    state.json            step, model config, optimizer hyper-parameters, file sizes

The directory is written under a temporary name and renamed into place, so a `step_*` directory is
always complete; older ones beyond `keep_last` are removed only after the new one exists. Loading
checks the model config and every file, and explains how to recover when something is wrong.

A *weights-only* checkpoint (state.json has `"weights_only": true`; written by `save_weights_checkpoint`,
e.g. by `moedit convert`) has no trainer.safetensors: resuming from it starts a fresh optimizer and
takes the RNG from the run's seed, at the checkpoint's step; sampling reads it like any other.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FILES = ("model.safetensors", "ema.safetensors", "trainer.safetensors", "state.json")
WEIGHTS_ONLY_FILES = ("model.safetensors", "ema.safetensors", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step_{step:08d}"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def _state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).contiguous().cpu()
    return tensors, {"param_groups": sd["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def save_checkpoint(ckpt_root: Path, step: int, model, ema_model, optimizer, model_config: dict,
                    extra: dict | None = None, keep_last: int = 3) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = step_dir(ckpt_root, step)
    tmp = ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_state_tensors(model), str(tmp / "model.safetensors"))
    save_file(_state_tensors(ema_model), str(tmp / "ema.safetensors"))
    optim_tensors, optim_meta = _optimizer_tensors(optimizer)
    save_file({**optim_tensors, **_rng_tensors()}, str(tmp / "trainer.safetensors"))
    sizes = {name: (tmp / name).stat().st_size for name in FILES[:3]}
    state = {"step": step, "model_config": model_config, "optimizer": optim_meta, "file_sizes": sizes,
             **(extra or {})}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():  # same step saved again: keep the old one until the new one is in place
        old = ckpt_root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights_checkpoint(ckpt_root: Path, step: int, model_tensors: dict[str, torch.Tensor],
                            ema_tensors: dict[str, torch.Tensor], model_config: dict,
                            extra: dict | None = None) -> Path:
    """A weights-only checkpoint (no trainer.safetensors; see the module docstring), e.g. a converted
    model. Refuses to replace an existing step directory."""
    final = step_dir(ckpt_root, step)
    if final.exists():
        raise CheckpointError(f"{final} already exists; choose another directory, nothing was changed")
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, tensors in (("model.safetensors", model_tensors), ("ema.safetensors", ema_tensors)):
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))
    sizes = {name: (tmp / name).stat().st_size for name in WEIGHTS_ONLY_FILES[:2]}
    state = {"step": step, "model_config": model_config, "weights_only": True, "file_sizes": sizes,
             "ema_updates": 0, **(extra or {})}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    os.replace(tmp, final)
    return final


def _config_diff(a: dict, b: dict, prefix: str = "model") -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _config_diff(va, vb, f"{prefix}.{key}")
        elif va != vb:
            diffs.append(f"{prefix}.{key}: checkpoint {va!r} vs config {vb!r}")
    return diffs


def read_state(path: Path) -> dict:
    path = Path(path)
    state = {}
    if (path / "state.json").is_file():
        try:
            state = json.loads((path / "state.json").read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"checkpoint {path}/state.json is corrupt ({exc}); use an earlier checkpoint") from exc
    needed = WEIGHTS_ONLY_FILES if state.get("weights_only") else FILES
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); "
                              f"use an earlier checkpoint from {path.parent}")
    for name, size in state.get("file_sizes", {}).items():
        actual = (path / name).stat().st_size
        if actual != size:
            raise CheckpointError(
                f"checkpoint file {path / name} is truncated or corrupt ({actual} bytes, expected {size}); "
                f"delete {path} to fall back to the previous checkpoint in {path.parent}"
            )
    return state


def check_model_config(path: Path, state: dict, model_config: dict) -> None:
    diffs = _config_diff(state["model_config"], model_config)
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was made by a different model config:\n  " + "\n  ".join(diffs)
            + "\nUse the run's own config (its config.yaml) or change these keys back."
        )


def load_tensors(path: Path, name: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(Path(path) / name), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint file {Path(path) / name} cannot be read ({exc}); it is corrupt or truncated: "
            f"delete {path} to fall back to the previous checkpoint"
        ) from exc


def load_weights(module: torch.nn.Module, path: Path, name: str) -> None:
    tensors = load_tensors(path, name, next(module.parameters()).device)
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {Path(path) / name} does not fit this model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); it was made by another model config"
        )


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if state.get("weights_only"):  # converted / imported weights: keep the fresh optimizer and seeded RNG
        return
    tensors = load_tensors(path, "trainer.safetensors")
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])

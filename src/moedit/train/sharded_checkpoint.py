"""Sharded checkpoints of parallel.data=fsdp runs, with torch.distributed.checkpoint (DCP).

Layout of `RUN/checkpoints/step_00001000/` (train/checkpoint.py has the plain one):
    sharded/             DCP: `.metadata` and one `__<rank>_0.distcp` per rank, holding the model, the EMA
                         and the optimizer state as DTensors with their global shapes
    rng.safetensors      every rank's RNG states (exact resume at the same world size)
    state.json           step, model config, optimizer hyper-parameters, world size, `"format": "sharded"`,
                         the parallel layout, the sizes of every file (shards included) and sha256s of the rest
    model.safetensors,   single-file weights, as a plain checkpoint has them: written for the run's final
    ema.safetensors      checkpoint, and by `moedit export` for any other

Because DCP stores global shapes and offsets, a checkpoint loads into any layout: another world size,
another `parallel.ep`, DDP, or one process (`load_sharded` reads what the model it is given holds).

A save is atomic like a plain one: every rank writes into the same `.tmp-step_*` directory; rank 0
writes the rest and renames it into place only after every rank's shards are complete (DCP's save ends
with a gather of their results). A rank killed mid-save leaves only the temporary directory, which the
next start sweeps away; the previous checkpoint is untouched.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict, set_state_dict)

from moedit.distributed import setup as dist_setup
from moedit.train import checkpoint as ckpt
from moedit.utils.files import atomic_write_text, file_sha256

WEIGHT_FILES = {"model": "model.safetensors", "ema": "ema.safetensors"}


def _dcp_state(model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    if optimizer is None:
        return {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema_model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "ema": get_model_state_dict(ema_model), "optim": optim_sd}


def full_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole state dict on CPU on rank 0 ({} elsewhere): a collective every rank joins."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module, options=options)
    return {k: v.detach().contiguous() for k, v in state.items()} if dist_setup.is_main_rank() else {}


def _shard_files(tmp: Path) -> tuple[str, ...]:
    shards = tmp / ckpt.SHARDED_DIR
    return tuple(sorted(f"{ckpt.SHARDED_DIR}/{p.name}" for p in shards.iterdir() if p.is_file()))


def save_sharded(ckpt_root: Path, step: int, model: nn.Module, ema_model: nn.Module,
                 optimizer: torch.optim.Optimizer, model_config: dict, extra: dict, keep_last: int,
                 rng_by_rank: list[dict[str, torch.Tensor]], with_weights: bool) -> Path:
    """Every rank calls this. `with_weights`: also gather and write the single-file weights (the final
    checkpoint). Raises OSError on every rank when rank 0 could not publish (a full disk)."""
    final = ckpt.step_dir(ckpt_root, step)
    tmp = ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    tmp = Path(dist_setup.broadcast_object(str(tmp)))  # rank 0's name, for every rank
    if dist_setup.is_main_rank():
        tmp.mkdir(parents=True, exist_ok=False)
    dist_setup.barrier()
    dcp.save(_dcp_state(model, ema_model, optimizer), checkpoint_id=str(tmp / ckpt.SHARDED_DIR))
    weights = {WEIGHT_FILES[k]: full_weights(m) for k, m in (("model", model), ("ema", ema_model))} if with_weights else {}
    error: BaseException | None = None
    if dist_setup.is_main_rank():
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state = {"step": step, "model_config": model_config, "format": "sharded", "world_size": len(rng_by_rank),
                 "optimizer": {"param_groups": groups}, **extra}
        files = {"rng.safetensors": ckpt.rng_tensors(rng_by_rank), **weights}
        try:
            ckpt.publish(tmp, final, files, state, present=_shard_files(tmp))
            ckpt.prune(ckpt_root, keep_last)
        except BaseException as exc:  # noqa: BLE001 - every rank must learn of it, then it is raised
            error = exc
    if not dist_setup.all_ranks_agree(error is None, torch.device("cpu")):
        if error is not None:
            raise error
        raise OSError(f"rank 0 could not write checkpoint {final.name}; its message says why")
    return final


def load_sharded(path: Path, model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Model, EMA and (if given) optimizer state from a sharded checkpoint, into whatever layout these
    modules have (sharded or not)."""
    state = _dcp_state(model, ema_model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(Path(path) / ckpt.SHARDED_DIR))
    except Exception as exc:  # DCP wraps every rank's failure in one CheckpointException
        raise ckpt.CheckpointError(f"checkpoint {path}/{ckpt.SHARDED_DIR} cannot be read ({str(exc)[:400]}): "
                                   + ckpt.recovery_advice(path)) from exc
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    set_model_state_dict(ema_model, state["ema"])


def load_plain_into_sharded(path: Path, model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict) -> None:
    """A plain (or weights-only) checkpoint into sharded modules: every rank reads the files and keeps its
    shards. The optimizer tensors are stored by parameter index; they are named here by the order the
    optimizer holds the parameters in (the same model config builds the same order)."""
    full = StateDictOptions(full_state_dict=True)
    for module, name in ((model, "model.safetensors"), (ema_model, "ema.safetensors")):
        set_model_state_dict(module, ckpt.load_tensors(path, name), options=full)
    if state.get("weights_only"):
        return
    tensors = ckpt.load_tensors(path, "trainer.safetensors")
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    per_param: dict[str, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, field = key.split(".", 2)
            per_param.setdefault(order[int(index)], {})[field] = value
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["optimizer"]["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": per_param, "param_groups": groups}, options=full)


def restore_rng(path: Path, state: dict, rank: int, world: int) -> str | None:
    """This rank's RNG states; None when exact, else the note train/checkpoint.py gives for another world size."""
    return ckpt.restore_rng(ckpt.load_tensors(path, "rng.safetensors"), state.get("world_size", 1), rank, world)


def export_weights(path: Path) -> list[Path]:
    """Write a sharded checkpoint's model.safetensors and ema.safetensors (one process, no process group),
    each atomically, and record them in state.json. Returns the files written ([] when both exist)."""
    from moedit.config import from_dict
    from moedit.models import build_model

    path = Path(path)
    state = ckpt.read_state(path)
    if not ckpt.is_sharded(state):
        raise ckpt.CheckpointError(f"checkpoint {path} is not sharded: its model.safetensors and ema.safetensors "
                                   "are the single-file weights already")
    todo = {k: f for k, f in WEIGHT_FILES.items() if not (path / f).is_file()}
    if not todo:
        return []
    model_cfg = from_dict({"model": state["model_config"]}).model
    model, ema_model = build_model(model_cfg), build_model(model_cfg)
    with warnings.catch_warnings():  # "torch.distributed is uninitialized, assuming a single process": yes
        warnings.filterwarnings("ignore", message=r"torch.distributed is disabled")
        load_sharded(path, model, ema_model, None)
    written = []
    for key, name in todo.items():
        module = model if key == "model" else ema_model
        tmp = path / f".tmp-{name}-{os.getpid()}"
        ckpt.write_tensors(path, tmp.name, {k: v.detach().contiguous() for k, v in module.state_dict().items()})
        os.replace(tmp, path / name)
        state.setdefault("file_sizes", {})[name] = (path / name).stat().st_size
        state.setdefault("checksums", {})[name] = file_sha256(path / name)
        written.append(path / name)
    atomic_write_text(path / "state.json", json.dumps(state, indent=1))
    return written

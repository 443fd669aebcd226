"""Checkpoints: safetensors weights plus a small JSON state, written atomically and checked on load.

Layout of one checkpoint, `RUN/checkpoints/step_00001000/`:
    model.safetensors     raw weights and persistent buffers
    ema.safetensors       EMA weights (what sampling uses by default)
    trainer.safetensors   optimizer tensors and every data-parallel rank's RNG states (exact resume)
    state.json            step, model config, optimizer hyper-parameters, world size, file sizes and sha256s

The directory is written under a temporary name (`.tmp-step_*`) and renamed into place, so a `step_*`
directory is always complete; a failed write (full disk, an error) removes its temporary directory, and
`sweep_partial` clears those a kill left behind (the trainer calls it under the run's lock). Older
checkpoints beyond `keep_last` are removed only after the new one exists. Nothing non-finite is
written. Loading validates state.json field by field, checks every file's size and sha256 against it
(same-size damage too), refuses non-finite weights and tensors of another shape, and says how to recover.

A *sharded* checkpoint (state.json has `"format": "sharded"`; written by parallel.data=fsdp runs,
train/sharded_checkpoint.py) holds its model, EMA and optimizer in `sharded/` (torch.distributed.checkpoint,
one file per rank, global shapes) and every rank's RNG in `rng.safetensors`; its model.safetensors and
ema.safetensors exist once exported (`moedit export`, and always for a run's final checkpoint), and until
then the commands that read weights say how to export them.

A *weights-only* checkpoint (state.json has `"weights_only": true`; written by `save_weights_checkpoint`,
e.g. by `moedit convert`) has no trainer.safetensors: resuming from it starts a fresh optimizer and
takes the RNG from the run's seed, at the checkpoint's step; sampling reads it like any other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moedit.utils.files import file_sha256

FILES = ("model.safetensors", "ema.safetensors", "trainer.safetensors", "state.json")
WEIGHTS_ONLY_FILES = ("model.safetensors", "ema.safetensors", "state.json")
SHARDED_DIR = "sharded"
SHARDED_FILES = ("rng.safetensors", "state.json", f"{SHARDED_DIR}/.metadata")


def is_sharded(state: dict) -> bool:
    return state.get("format") == "sharded"


def needed_files(state: dict) -> tuple[str, ...]:
    if is_sharded(state):
        return SHARDED_FILES
    return WEIGHTS_ONLY_FILES if state.get("weights_only") else FILES


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


def recovery_advice(path: Path) -> str:
    """What a user can do about a damaged checkpoint: each command's own way to an earlier one."""
    path = Path(path)
    return (f"move {path} out of {path.parent} so that `moedit train --resume` continues from the checkpoint "
            f"before it, or pass an earlier one with --checkpoint to sample/eval")


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


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random-number states: the CPU generator and, once CUDA is in use, the device's."""
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return tensors


def rng_tensors(rng_by_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"rng.{kind}.rank{rank}": value for rank, states in enumerate(rng_by_rank) for kind, value in states.items()}


def _first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def write_tensors(tmp: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    bad = _first_non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"refusing to write {name}: tensor {bad} holds NaN or inf (training diverged); "
                              "the checkpoints already written are kept")
    try:
        save_file(tensors, str(tmp / name))
    except SafetensorError as exc:  # the Rust writer reports I/O failures as "... (os error N)"
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(tmp / name)) from exc


def publish(tmp: Path, final: Path, files: dict[str, dict[str, torch.Tensor]], state: dict,
             present: tuple[str, ...] = ()) -> None:
    """Write `files` and state.json (with their sizes and sha256s) into `tmp`, then rename it to `final`.
    `present`: files other processes already wrote into `tmp` (a sharded save's shards), recorded by size.
    On any failure (full disk, non-finite tensor, interrupt) `tmp` is removed and `final` is untouched."""
    try:
        tmp.mkdir(exist_ok=bool(present))
        for name, tensors in files.items():
            write_tensors(tmp, name, tensors)
        state["file_sizes"] = {name: (tmp / name).stat().st_size for name in (*files, *present)}
        state["checksums"] = {name: file_sha256(tmp / name) for name in files}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        _fsync_dir_files(tmp)
        if final.exists():  # same step saved again: keep the old one until the new one is in place
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir_files(folder: Path) -> None:
    """Data on disk before the rename that publishes it: a power cut must not leave a complete-looking
    step directory of empty files."""
    for path in folder.iterdir():
        if path.is_dir():
            _fsync_dir_files(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(ckpt_root: Path, step: int, model, ema_model, optimizer, model_config: dict,
                    extra: dict | None = None, keep_last: int = 3,
                    rng_by_rank: list[dict[str, torch.Tensor]] | None = None) -> Path:
    """`rng_by_rank`: every data-parallel rank's `rng_state()`, in rank order (default: this process's)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = step_dir(ckpt_root, step)
    rng_by_rank = rng_by_rank if rng_by_rank is not None else [rng_state()]
    optim_tensors, optim_meta = _optimizer_tensors(optimizer)
    files = {"model.safetensors": _state_tensors(model), "ema.safetensors": _state_tensors(ema_model),
             "trainer.safetensors": {**optim_tensors, **rng_tensors(rng_by_rank)}}
    state = {"step": step, "model_config": model_config, "optimizer": optim_meta, "world_size": len(rng_by_rank),
             **(extra or {})}
    publish(ckpt_root / f".tmp-{final.name}-{os.getpid()}", final, files, state)
    prune(ckpt_root, keep_last)
    return final


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` checkpoints (after a new one is in place)."""
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        _remove(old)


def _remove(path: Path) -> None:
    """Delete a checkpoint directory so that a kill mid-way never leaves a `step_*` directory with some of
    its files gone (it would pass for a checkpoint): renamed out of the `step_*` names first, in one step,
    then deleted; `sweep_partial` finishes what a kill interrupted."""
    doomed = path.with_name(f".del-{path.name.lstrip('.')}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_weights_checkpoint(ckpt_root: Path, step: int, model_tensors: dict[str, torch.Tensor],
                            ema_tensors: dict[str, torch.Tensor], model_config: dict,
                            extra: dict | None = None) -> Path:
    """A weights-only checkpoint (no trainer.safetensors; see the module docstring), e.g. a converted
    model. Refuses to replace an existing step directory."""
    final = step_dir(ckpt_root, step)
    if final.exists():
        raise CheckpointError(f"{final} already exists; choose another directory, nothing was changed")
    ckpt_root.mkdir(parents=True, exist_ok=True)
    files = {name: {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
             for name, tensors in (("model.safetensors", model_tensors), ("ema.safetensors", ema_tensors))}
    state = {"step": step, "model_config": model_config, "weights_only": True, "ema_updates": 0, **(extra or {})}
    publish(ckpt_root / f".tmp-{final.name}-{os.getpid()}", final, files, state)
    return final


def sweep_partial(ckpt_root: Path) -> list[str]:
    """Clear what a killed or failed save left in `ckpt_root`; call it only while holding the run's lock
    (another live writer's temporary directory would look the same). A `.tmp-step_*` directory is an
    unpublished write, a `.del-*` one a checkpoint whose deletion was interrupted: both removed. A
    `.old-step_*` directory is the previous copy of a step saved twice: if the kill fell between its two
    renames, it is the only copy and is put back; otherwise it is removed.
    Returns one line per action."""
    actions = []
    if not ckpt_root.is_dir():
        return actions
    for path in sorted(ckpt_root.iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith(".tmp-step_"):
            shutil.rmtree(path, ignore_errors=True)
            actions.append(f"removed the unfinished checkpoint {path.name}")
        elif path.name.startswith(".del-"):
            shutil.rmtree(path, ignore_errors=True)
            actions.append(f"finished deleting the old checkpoint {path.name}")
        elif path.name.startswith(".old-step_"):
            final = ckpt_root / path.name[len(".old-"):].rsplit("-", 1)[0]
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
                actions.append(f"removed {path.name}, superseded by {final.name}")
            else:
                os.replace(path, final)
                actions.append(f"restored {final.name} from {path.name} (a save of the same step was interrupted)")
    return actions


def _config_diff(a: dict, b: dict, prefix: str = "model") -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _config_diff(va, vb, f"{prefix}.{key}")
        elif va != vb:
            diffs.append(f"{prefix}.{key}: checkpoint {va!r} vs config {vb!r}")
    return diffs


# state.json's fields: name -> (accepted types, needed). `optimizer` is needed unless weights_only.
_STATE_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "step": ((int,), True), "model_config": ((dict,), True), "optimizer": ((dict,), False),
    "file_sizes": ((dict,), False), "checksums": ((dict,), False), "weights_only": ((bool,), False),
    "ema_updates": ((int,), False), "world_size": ((int,), False), "format": ((str,), False),
}


def _type_ok(value, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def validate_state(path: Path, state) -> dict:
    """state.json read back: a mapping whose fields have the right types, or CheckpointError naming the field."""
    where = f"checkpoint {path}/state.json"
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} holds a {type(state).__name__}, not a mapping of fields; it is damaged: "
                              + recovery_advice(path))
    for name, (types, needed) in _STATE_FIELDS.items():
        if name not in state:
            if needed or (name == "optimizer" and not state.get("weights_only") and not is_sharded(state)):
                raise CheckpointError(f"{where} has no field {name!r}; it is damaged: " + recovery_advice(path))
            continue
        if not _type_ok(state[name], types):
            raise CheckpointError(f"{where}: field {name!r} is {state[name]!r}, expected "
                                  f"{' or '.join(t.__name__ for t in types)}; it is damaged: " + recovery_advice(path))
    if state["step"] < 0 or state.get("ema_updates", 0) < 0 or state.get("world_size", 1) < 1:
        raise CheckpointError(f"{where}: step, ema_updates or world_size out of range; it is damaged: "
                              + recovery_advice(path))
    groups = state.get("optimizer", {}).get("param_groups", [])
    if "optimizer" in state and not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)):
        raise CheckpointError(f"{where}: field 'optimizer.param_groups' is not a list of mappings; it is damaged: "
                              + recovery_advice(path))
    for name in ("file_sizes", "checksums"):
        kind = int if name == "file_sizes" else str
        bad = [k for k, v in state.get(name, {}).items() if not _type_ok(v, (kind,))]
        if bad:
            raise CheckpointError(f"{where}: field {name!r} has a bad entry for {bad[0]}; it is damaged: "
                                  + recovery_advice(path))
    return state


def read_state(path: Path) -> dict:
    """The checkpoint's validated state.json, after checking that its files are there at their sizes
    (their sha256 is checked when each is loaded: `load_tensors`)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder; pass a checkpoints/step_* folder")
    state = {}
    if (path / "state.json").is_file():
        try:
            state = validate_state(path, json.loads((path / "state.json").read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"checkpoint {path}/state.json is corrupt ({exc}): " + recovery_advice(path)) from exc
    missing = [name for name in needed_files(state) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}): " + recovery_advice(path))
    for name, size in state.get("file_sizes", {}).items():
        actual = (path / name).stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint file {path / name} is truncated or corrupt ({actual} bytes, expected "
                                  f"{size}): " + recovery_advice(path))
    return state


def check_model_config(path: Path, state: dict, model_config: dict) -> None:
    diffs = _config_diff(state["model_config"], model_config)
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was made by a different model config:\n  " + "\n  ".join(diffs)
            + "\nUse the run's own config (its config.yaml) or change these keys back."
        )


def _recorded_checksum(path: Path, name: str) -> str | None:
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return None  # no or unreadable state.json: read_state reports it where it matters
    checksums = state.get("checksums") if isinstance(state, dict) else None
    return checksums.get(name) if isinstance(checksums, dict) else None


def load_tensors(path: Path, name: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One file of a checkpoint, checked: its sha256 against state.json (checkpoints written before
    checksums were recorded are checked by size only), readable, and every float tensor finite."""
    path = Path(path)
    if not (path / name).is_file() and (path / SHARDED_DIR).is_dir():
        raise CheckpointError(f"checkpoint {path} is sharded (written by parallel.data=fsdp) and its single-file "
                              f"weights are not exported yet; run `moedit export {path}` to write {name}")
    expected = _recorded_checksum(path, name)
    if expected is not None and (path / name).is_file() and file_sha256(path / name) != expected:
        raise CheckpointError(f"checkpoint file {path / name} is damaged (its sha256 differs from the one recorded "
                              "when it was written): " + recovery_advice(path))
    try:
        tensors = load_file(str(path / name), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {path / name} cannot be read ({exc}); it is corrupt or truncated: "
                              + recovery_advice(path)) from exc
    bad = _first_non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"checkpoint file {path / name}: tensor {bad} holds NaN or inf, so these weights "
                              "cannot be used: " + recovery_advice(path))
    return tensors


def load_weights(module: torch.nn.Module, path: Path, name: str) -> None:
    tensors = load_tensors(path, name, next(module.parameters()).device)
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {Path(path) / name} does not fit this model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); it was made by another model config"
        )
    misshapen = [k for k in own if tuple(own[k].shape) != tuple(tensors[k].shape)]
    if misshapen:
        k = misshapen[0]
        raise CheckpointError(
            f"checkpoint {Path(path) / name} does not fit this model: {k} is {tuple(tensors[k].shape)} there but "
            f"{tuple(own[k].shape)} here ({len(misshapen)} tensor(s) differ); it was made by another model "
            "config: use the run's own config.yaml")
    module.load_state_dict(tensors)


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer, state: dict, rank: int = 0,
                       world: int = 1) -> str | None:
    """Optimizer state and this rank's RNG states. Returns None when the resume is exact, else a note
    saying what a resume at another world size (or from an old rank-0-only checkpoint) cannot reproduce."""
    if state.get("weights_only"):  # converted / imported weights: keep the fresh optimizer and seeded RNG
        return None
    tensors = load_tensors(path, "trainer.safetensors")
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}/trainer.safetensors does not fit this model's optimizer ({exc}); "
                              "it was made by another model or optimizer config: use the run's own config.yaml") from exc
    return restore_rng(tensors, state.get("world_size", 1), rank, world)


def restore_rng(tensors: dict[str, torch.Tensor], saved_world: int, rank: int, world: int) -> str | None:
    own = f"rng.cpu.rank{rank}"
    if saved_world == world and own in tensors:
        torch.set_rng_state(tensors[own])
        if f"rng.cuda.rank{rank}" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"])
        return None
    if world == 1 and "rng.cpu" in tensors:  # written before per-rank states, by one process: still exact
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        return None
    written = f"{saved_world} process(es)" if any(k.endswith(".rank0") for k in tensors) else "an older moedit"
    return (f"the checkpoint was written by {written} and resumes on {world}: the weights, EMA, optimizer state and "
            f"step are restored exactly, but each rank's noise and timesteps are drawn from a fresh seed and the "
            f"batch order follows the new world size, so the steps from here on differ from an uninterrupted run")

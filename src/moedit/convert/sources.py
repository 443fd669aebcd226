"""Dense sources for conversion: a moedit run or checkpoint directory, or a facebookresearch/DiT file.

- moedit: `RUN/` (its latest checkpoint) or `RUN/checkpoints/step_N/`; EMA weights unless `raw`; the
  dense ModelConfig is the checkpoint's own (state.json), the other run settings come from RUN/config.yaml.
- facebookresearch/DiT (arXiv 2212.09748, github.com/facebookresearch/DiT models.py): a .pt/.pth or
  .safetensors state dict — or their training checkpoint {"model", "ema", "opt", "args"} (EMA unless
  `raw`). The config is read off the shapes:
      width D, in_channels C, patch p   x_embedder.proj.weight (D, C, p, p)
      depth                             number of blocks.N
      num_classes                       embedding_table rows − 1 (the last row is the null class)
      mlp_ratio                         blocks.0.mlp.fc1.weight rows / D
      image size                        √L · p from pos_embed (1, L, D)
      out channels                      final_layer.linear rows / p² (2·C with learned sigma)
  Heads cannot be read off the weights: `heads` or the DiT preset of that width (S 6, B 12, L 16, XL 16).
  Their pos_embed (get_2d_sincos_pos_embed) puts the column coordinate in the first half of the
  channels: moedit's `sincos_wh`; it is checked against the table (error if it fits neither layout).
  Their timestep embedding is moedit's with t_DiT = 1000·t; their DDPM (linear β, 1000 steps, ε) is
  moedit's `ddpm` objective, whose model time for step n is (n + 1)/1000 — one step off DiT's n.
"""

from __future__ import annotations

import argparse
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from moedit.config import ConfigError, ModelConfig, from_dict, load_yaml
from moedit.models.embed import sincos_2d
from moedit.models.presets import MODEL_PRESETS
from moedit.convert.keys import ConversionError
from moedit.runs import open_checkpoint
from moedit.train import checkpoint as ckpt

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
LEARN_SIGMA = ("keep", "drop")
# facebookresearch/DiT's training defaults that the weights do not record
DIT_RUN_DEFAULTS = {"objective": {"name": "ddpm", "beta_schedule": "linear", "ddpm_steps": 1000},
                    "sample": {"sampler": "ddpm", "steps": 250}, "data": {"name": "npz"}}


@dataclass
class DenseSource:
    state: dict[str, torch.Tensor]
    model: ModelConfig
    run_config: dict = field(default_factory=dict)  # the other sections of the output run config
    description: str = ""


def dit_heads_by_width() -> dict[int, int]:
    return {p["width"]: p["heads"] for name, p in MODEL_PRESETS.items() if name.startswith("DiT-")}


def load_source(path: str | Path, raw: bool = False, heads: int | None = None) -> DenseSource:
    path = Path(path)
    if path.is_dir():
        return _moedit_source(path, raw)
    if path.is_file() and (path.suffix in TORCH_SUFFIXES or path.suffix == ".safetensors"):
        state, what = read_state_file(path, raw)
        return DenseSource(state, dit_model_config(state, heads), DIT_RUN_DEFAULTS, f"facebookresearch/DiT {what} {path}")
    raise ConfigError(f"{path} is neither a moedit run/checkpoint directory nor a .pt/.pth/.safetensors file")


def _moedit_source(path: Path, raw: bool) -> DenseSource:
    ckpt_dir, run_dir, state = open_checkpoint(path)
    model = from_dict({"model": state["model_config"]}).model
    name = "model.safetensors" if raw else "ema.safetensors"
    run_config = load_yaml(run_dir / "config.yaml") if run_dir is not None else {}
    description = f"moedit checkpoint {ckpt_dir} ({'raw' if raw else 'EMA'} weights)"
    return DenseSource(ckpt.load_tensors(ckpt_dir, name), model, run_config, description)


def read_state_file(path: Path, raw: bool) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, what it was): a plain state dict, or one set of weights of a training checkpoint."""
    if path.suffix == ".safetensors":
        return _read_safetensors(path), "state dict"
    try:  # weights_only: a pickle is code; DiT's training checkpoints also hold an argparse Namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # unreadable file: the CLI names the path and the reason
    except pickle.UnpicklingError as exc:  # a pickle holding more than tensors, or bytes that are no pickle
        raise ConversionError(f"{path} cannot be read as a tensor-only checkpoint ({_torch_reason(exc)}): it is "
                              "damaged, not a torch.save file, or holds objects besides tensors; re-save its state "
                              "dict alone, e.g. torch.save(ckpt['ema'], 'ema.pt')") from exc
    except Exception as exc:  # noqa: BLE001 (torch.load on foreign bytes raises KeyError, EOFError, RuntimeError...)
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({_torch_reason(exc)}): it is damaged "
                              "or not a torch.save file; download or save it again") from exc
    what = "state dict"
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict) and isinstance(obj.get("model"), dict):
        obj, what = obj["model" if raw else "ema"], f"training checkpoint ({'raw' if raw else 'EMA'} weights)"
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path} does not hold a state dict (name -> tensor) but {_what_instead(obj)}; pass a "
                              "facebookresearch/DiT checkpoint or state dict, or a moedit run directory")
    return obj, what


def _what_instead(obj: object) -> str:
    if isinstance(obj, dict):
        key, value = next((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor))
        return f"a dict whose {key!r} is a {type(value).__name__}, not a tensor"
    return f"a {type(obj).__name__}"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except SafetensorError as exc:  # random bytes, a text file renamed, a truncated download
        raise ConversionError(f"{path} is not a readable .safetensors file ({exc}): it is damaged or not a "
                              "safetensors file; download it again, or pass the .pt checkpoint") from exc


def _torch_reason(exc: Exception) -> str:
    """torch.load's reason in one line: its weights-only message spans many lines of advice that does not
    apply here (moedit never loads pickled code); the line after "WeightsUnpickler error:" is the point."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1].split(". ")[0]  # "Unsupported global: GLOBAL x.y was not an allowed global by default"
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _require(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"the checkpoint has no {key}: it is not a facebookresearch/DiT state dict "
                              "(for a moedit model pass its run directory)")
    return state[key]


def dit_model_config(state: dict[str, torch.Tensor], heads: int | None = None) -> ModelConfig:
    """The dense ModelConfig of a facebookresearch/DiT state dict (module docstring)."""
    model = dit_backbone_config(state, heads)
    hidden = _require(state, "blocks.0.mlp.fc1.weight").shape[0]
    return from_dict({"model": {**model, "ffn": "mlp", "mlp_ratio": hidden / model["width"]}}).model


def dit_backbone_config(state: dict[str, torch.Tensor], heads: int | None = None, rope_grid: int | None = None) -> dict:
    """The `model` keys every DiT-layout checkpoint's backbone shows (sizes, classes, positions, outputs);
    the FFN is the caller's (DiT's MLP here, DiT-MoE's experts in convert/peers.py). A checkpoint without
    a pos_embed table uses RoPE: its token grid cannot be read off the weights (`rope_grid`)."""
    width, channels, patch, _ = _require(state, "x_embedder.proj.weight").shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if rope_grid is not None and "pos_embed" not in state:
        grid, positions = rope_grid, "rope"
    else:
        pos = _require(state, "pos_embed")
        grid = math.isqrt(pos.shape[-2])
        if grid * grid != pos.shape[-2]:
            raise ConversionError(f"pos_embed has {pos.shape[-2]} positions, not a square grid")
        positions = _pos_layout(pos, width, grid)
    out = _require(state, "final_layer.linear.weight").shape[0] // (patch * patch)
    if heads is None:
        heads = dit_heads_by_width().get(width)
        if heads is None:
            raise ConfigError(f"width {width} is not a DiT preset width ({sorted(dit_heads_by_width())}); "
                              "attention heads cannot be read off the weights: pass --heads")
    return dict(image_size=grid * patch, in_channels=channels, patch_size=patch, width=width, depth=depth,
                heads=heads, num_classes=_require(state, "y_embedder.embedding_table.weight").shape[0] - 1,
                class_dropout=0.1, pos_embed=positions, out_channels=out if out != channels else None)


def _pos_layout(pos: torch.Tensor, width: int, grid: int, tolerance: float = 1e-4) -> str:
    """sincos_wh (DiT's get_2d_sincos_pos_embed) or sincos, whichever table the checkpoint holds."""
    errors = {}
    for name in ("sincos_wh", "sincos"):
        table = sincos_2d(width, grid, columns_first=name == "sincos_wh")
        errors[name] = (pos.reshape(table.shape).float() - table).abs().max().item()
        if errors[name] <= tolerance:
            return name
    raise ConversionError(f"pos_embed is not a fixed 2-D sin-cos table (max deviation {errors}); "
                          "a learned or other table has no moedit equivalent")


def output_channels(dense: ModelConfig, learn_sigma: str) -> int | None:
    """model.out_channels of the converted model: the dense one's (`keep`) or in_channels (`drop`)."""
    if learn_sigma not in LEARN_SIGMA:
        raise ConfigError(f"learn_sigma={learn_sigma!r} is unknown; choose one of: {', '.join(LEARN_SIGMA)}")
    return dense.out_channels if learn_sigma == "keep" else None

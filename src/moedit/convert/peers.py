"""Importing a peer's released MoE-DiT checkpoint into a moedit run, weight for weight.

Only the DiT-MoE layout so far (Fei et al., arXiv 2407.11633; feizc/DiT-MoE `models.py`); docs/CONVERT.md
lists what each layout holds and how it maps. A layout is recognised by its key names, its
configuration read off the shapes, and every key goes through an explicit table that refuses unmapped,
missing or misshapen keys. The imported model computes the peer model's output: same (x_t, t, y) →
same prediction within float32 rounding, with the time convention stated per objective.

DiT-MoE = facebookresearch/DiT with every block's MLP replaced by `moe` (names as in its code):

    blocks.{i}.moe.gate.weight                         (E, D)   softmax gate, no bias
    blocks.{i}.moe.experts.{e}.{gate,up,down}_proj.weight       SwiGLU expert e, width H, no biases
    blocks.{i}.moe.shared_experts.{gate,up,down}_proj.weight    one always-on SwiGLU expert, width H_s

routed by softmax top-k without renormalisation (its `norm_topk_prob = False`), every block MoE, DiT's
columns-first sin-cos positions. top_k is not in the weights (DiT-MoE's default: 2, `--top-k`).
Time: trained with DiT's DDPM (`--objective ddpm`, integer step n fed to the embedder: moedit's
t = n/1000, t_scale 1000, the one-step DDPM offset of docs/CONVERT.md applies) or with its rectified flow
(`--objective rectified_flow`: x_t = (1 − t)·x + t·ε, v = ε − x, t ∈ [0, 1] fed as is: t_scale 1).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from moedit.config import Config, ConfigError, from_dict
from moedit.convert.keys import ConversionError
from moedit.convert.sources import TORCH_SUFFIXES, LEARN_SIGMA, dit_backbone_config, read_state_file
from moedit.convert.workflow import check_out, write_run
from moedit.models import build_model

LAYOUTS = ("dit_moe",)
OBJECTIVES = {  # the peer's training objective -> moedit's run settings for it
    "ddpm": {"model": {"t_scale": 1000.0},
             "objective": {"name": "ddpm", "beta_schedule": "linear", "ddpm_steps": 1000},
             "sample": {"sampler": "ddpm", "steps": 250}},
    "rectified_flow": {"model": {"t_scale": 1.0},
                       "objective": {"name": "rectified_flow", "t_sampling": "logit_normal"},
                       "sample": {"sampler": "euler", "steps": 50}},
}
_EXPERT = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_SHARED = re.compile(r"^blocks\.(\d+)\.moe\.shared_experts\.(gate|up|down)_proj\.weight$")
_GATE = re.compile(r"^blocks\.(\d+)\.moe\.gate\.weight$")
_STACKED = {"gate": "w1_EDH", "up": "wu_EDH", "down": "w2_EHD"}  # moedit's SwiGLU expert matrices (moe/experts.py)
# DiT's own keys, the same in both models (pos_embed is checked, final_layer.linear may drop σ channels)
_BACKBONE = re.compile(r"^(x_embedder\.proj|t_embedder\.mlp\.[02]|y_embedder\.embedding_table|final_layer\."
                       r"adaLN_modulation\.1|blocks\.\d+\.(attn\.(qkv|proj)|adaLN_modulation\.1))\.(weight|bias)$")


def detect_layout(state: dict[str, torch.Tensor]) -> str | None:
    if "blocks.0.moe.gate.weight" in state and "blocks.0.moe.experts.0.gate_proj.weight" in state:
        return "dit_moe"
    return None


def dit_moe_config(state: dict[str, torch.Tensor], heads: int | None, top_k: int, learn_sigma: str) -> dict:
    """The moedit `model` section of a DiT-MoE state dict (module docstring)."""
    model = dit_backbone_config(state, heads)
    E, D = state["blocks.0.moe.gate.weight"].shape
    hidden = state["blocks.0.moe.experts.0.gate_proj.weight"].shape[0]
    shared = state.get("blocks.0.moe.shared_experts.gate_proj.weight")
    if not 1 <= top_k <= E:
        raise ConfigError(f"--top-k {top_k} must be between 1 and the checkpoint's {E} experts")
    moe = dict(num_experts=E, expert_ratio=hidden / D, num_shared=0 if shared is None else 1,
               shared_ratio=None if shared is None else shared.shape[0] / D, placement="all",
               router=dict(name="topk", gate="linear", score="softmax", top_k=top_k, normalize=False))
    out = model.pop("out_channels")
    return {**model, "ffn": "swiglu", "out_channels": out if learn_sigma == "keep" else None, "moe": moe}


def map_dit_moe(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                patch: int) -> dict[str, torch.Tensor]:
    """moedit tensors for every key of the target model; raises listing every unmapped, missing or
    misshapen key."""
    mapped: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    unmapped, mismatched = [], []
    for key, tensor in state.items():
        name, value = _target(key, tensor, patch, target)
        if name is None:
            unmapped.append(key)
        elif isinstance(name, tuple):  # one expert's matrix of a stacked tensor
            experts.setdefault(name[0], {})[name[1]] = value
        else:
            mapped[name] = value
    for name, by_expert in experts.items():
        E = target[name].shape[0] if name in target else 0
        if sorted(by_expert) != list(range(E)):
            mismatched.append(f"{name}: experts {sorted(by_expert)} in the checkpoint, the model has {E}")
            continue
        mapped[name] = torch.stack([by_expert[e] for e in range(E)])
    for name, value in list(mapped.items()):
        if name == "__pos_embed__":  # checked by the caller against the model's fixed table
            continue
        if name not in target:
            unmapped.append(f"(-> {name}, which the model does not have)")
            del mapped[name]
        elif value.shape != target[name].shape:
            mismatched.append(f"{name}: {tuple(value.shape)} from the checkpoint, the model has {tuple(target[name].shape)}")
    missing = [k for k in target if k not in mapped]
    _refuse(unmapped, mismatched, missing)
    return {k: v.to(target[k].dtype) if k in target else v for k, v in mapped.items()}


def _target(key: str, tensor: torch.Tensor, patch: int, target: dict):
    """(target name or (stacked name, expert index), tensor) for one DiT-MoE key; (None, None) if unmapped."""
    if key == "pos_embed":
        return "__pos_embed__", tensor
    if _BACKBONE.match(key):
        return key, tensor
    if key.startswith("final_layer.linear."):
        return key, _first_channels(tensor, patch, target.get(key))
    if m := _GATE.match(key):
        return f"blocks.{m.group(1)}.moe.router.gate.net.head.weight", tensor
    if m := _EXPERT.match(key):
        return (f"blocks.{m.group(1)}.moe.experts.{_STACKED[m.group(3)]}", int(m.group(2))), tensor.T
    if m := _SHARED.match(key):
        return f"blocks.{m.group(1)}.moe.shared.{_STACKED[m.group(2)]}", tensor.T[None]
    return None, None


def _first_channels(w: torch.Tensor, patch: int, target: torch.Tensor | None) -> torch.Tensor:
    """final_layer.linear rows in DiT's (p, q, c) order, cut to the model's channels (learned σ dropped)."""
    pp = patch * patch
    if target is None or w.shape[0] == target.shape[0] or w.shape[0] % pp or target.shape[0] % pp:
        return w
    return w.reshape(pp, w.shape[0] // pp, *w.shape[1:])[:, : target.shape[0] // pp].reshape(target.shape[0], *w.shape[1:])


def _refuse(unmapped: list[str], mismatched: list[str], missing: list[str]) -> None:
    problems = [(unmapped, "checkpoint keys the DiT-MoE map does not cover"), (mismatched, "shape mismatches"),
                (missing, "model keys the checkpoint does not provide")]
    lines = [f"{what} ({len(keys)}):\n    " + "\n    ".join(keys[:20]) + ("\n    …" if len(keys) > 20 else "")
             for keys, what in problems if keys]
    if lines:
        raise ConversionError("the checkpoint does not fit the DiT-MoE key map (convert/peers.py):\n  "
                              + "\n  ".join(lines) + "\nCheck that it is a feizc/DiT-MoE checkpoint, and --heads.")


def import_run(source: str | Path, out: str | Path, layout: str = "auto", objective: str = "ddpm",
               heads: int | None = None, top_k: int = 2, learn_sigma: str = "keep", raw: bool = False,
               overrides: list[str] | None = None, log=print) -> tuple[Path, Config]:
    """A new moedit run directory at `out` holding the peer checkpoint `source` (module docstring)."""
    from moedit.config import apply_overrides
    from moedit.models.embed import sincos_2d

    out = check_out(Path(out))
    source = Path(source)
    if not (source.is_file() and (source.suffix in TORCH_SUFFIXES or source.suffix == ".safetensors")):
        raise ConfigError(f"{source} is not a .pt/.pth/.bin/.ckpt/.safetensors checkpoint file")
    if objective not in OBJECTIVES or learn_sigma not in LEARN_SIGMA:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)} and learn_sigma one of {', '.join(LEARN_SIGMA)}")
    state, what = read_state_file(source, raw)
    found = detect_layout(state)
    if layout == "auto":
        layout = found
    if layout not in LAYOUTS or found != layout:
        raise ConversionError(f"{source} is not a {layout or 'known'} checkpoint (its keys look like "
                              f"{found or 'none of ' + ', '.join(LAYOUTS)}); moedit imports: {', '.join(LAYOUTS)}")
    model = dit_moe_config(state, heads, top_k, learn_sigma)
    data = {**OBJECTIVES[objective], "model": {**model, **OBJECTIVES[objective]["model"]},
            "data": {"name": "npz"}, "train": {"out_dir": str(out)}}
    cfg = from_dict(apply_overrides(data, overrides or []))
    net = build_model(cfg.model)
    target = net.state_dict()
    tensors = map_dit_moe(state, target, cfg.model.patch_size)
    pos = tensors.pop("__pos_embed__", None)
    if pos is not None:
        grid = cfg.model.image_size // cfg.model.patch_size
        table = sincos_2d(cfg.model.width, grid, columns_first=cfg.model.pos_embed == "sincos_wh")
        if (pos.reshape(table.shape).float() - table).abs().max() > 1e-4:
            raise ConversionError("pos_embed is not the fixed sin-cos table of the model's pos_embed setting")
    net.load_state_dict(tensors)
    log(f"source: DiT-MoE {what} {source}: {cfg.model.depth} blocks × {cfg.model.width}, {cfg.model.moe.num_experts} "
        f"experts top-{top_k}, {cfg.model.moe.num_shared} shared; objective {objective} (t_scale {cfg.model.t_scale:g})")
    write_run(out, cfg, net.state_dict(), {"source": str(source), "layout": layout, "objective": objective,
                                           "weights": what, "learn_sigma": learn_sigma})
    log(f"wrote {out}: config.yaml, checkpoints/step_00000000 (weights only), conversion.json")
    return out, cfg


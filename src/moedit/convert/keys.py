"""The dense→MoE key map: an explicit table of (source pattern, target pattern, transform) rows.

Sources are dense moedit state dicts and facebookresearch/DiT state dicts; both use DiT's parameter
names (models/dit.py keeps them). `{i}` is a block index. A row marked `block="moe"` applies to the
blocks that become MoE, `block="dense"` to the dense blocks left by interleaved placement; `target`
None means the key is checked, not stored (DiT's fixed `pos_embed`, a buffer moedit rebuilds).

Transforms (H dense hidden, S = H / H_e slices, E routed experts incl. ProMoE's unconditional one;
expert e holds slice e mod S, scaled by S so that S slices of weight 1/S add up to the dense FFN,
convert/exact.py):

    copy           same tensor, same shape
    experts_in     fc1/gate/up weight (H, D)  -> (E, D, H_e)   transposed, sliced, replicated
    experts_in_b   fc1 bias (H,)              -> (E, H_e)
    experts_out    fc2/down weight (D, H)     -> (E, H_e, D)   transposed, sliced, ×S, replicated
    experts_out_b  fc2 bias (D,)              -> (E, D)        replicated (Σ_s w_s · b2 = b2)
    out_channels   final_layer.linear rows (p²·C_src, …) in DiT's (p, q, c) order -> the first
                   C_dst channels of every patch position (dropping learned-sigma channels)
    pos_table      checked against the target model's fixed table (error if they differ)

Every source key must match a row, every target key must be produced (except the router's and shared
experts' parameters, initialised by conversion), and every shape must fit: anything else is an error
that lists the keys. Names are matched against the patterns, never rewritten by string replacement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from moedit.config import ConfigError


class ConversionError(ConfigError):
    """A source that cannot be converted as asked; the message lists the keys and says what to do."""


@dataclass(frozen=True)
class KeyRow:
    source: str
    target: str | None
    transform: str = "copy"
    block: str = "any"  # any | moe | dense


def _copy_rows(*names: str) -> list[KeyRow]:
    return [KeyRow(n, n) for n in names]


_FFN_ROWS = [  # (dense FFN parameter, expert parameter, expert transform)
    ("fc1.weight", "w1_EDH", "experts_in"), ("fc1.bias", "b1_EH", "experts_in_b"),
    ("fc2.weight", "w2_EHD", "experts_out"), ("fc2.bias", "b2_ED", "experts_out_b"),
    ("gate.weight", "w1_EDH", "experts_in"), ("up.weight", "wu_EDH", "experts_in"),
    ("down.weight", "w2_EHD", "experts_out"),
]

KEY_MAP: tuple[KeyRow, ...] = (
    *_copy_rows("x_embedder.proj.weight", "x_embedder.proj.bias",
                "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
                "y_embedder.embedding_table.weight",
                "blocks.{i}.attn.qkv.weight", "blocks.{i}.attn.qkv.bias",
                "blocks.{i}.attn.proj.weight", "blocks.{i}.attn.proj.bias",
                "blocks.{i}.attn.q_norm.weight", "blocks.{i}.attn.k_norm.weight",
                "blocks.{i}.adaLN_modulation.1.weight", "blocks.{i}.adaLN_modulation.1.bias",
                "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"),
    KeyRow("pos_embed", None, "pos_table"),
    KeyRow("final_layer.linear.weight", "final_layer.linear.weight", "out_channels"),
    KeyRow("final_layer.linear.bias", "final_layer.linear.bias", "out_channels"),
    *(KeyRow(f"blocks.{{i}}.mlp.{src}", f"blocks.{{i}}.mlp.{src}", "copy", "dense") for src, _, _ in _FFN_ROWS),
    *(KeyRow(f"blocks.{{i}}.mlp.{src}", f"blocks.{{i}}.moe.experts.{dst}", tr, "moe") for src, dst, tr in _FFN_ROWS),
)

# target keys conversion initialises itself (Law 3: only routers start random; shared experts: zero/noise)
INITIALISED = (re.compile(r"^blocks\.\d+\.moe\.router\."), re.compile(r"^blocks\.\d+\.moe\.shared\."))


@dataclass(frozen=True)
class MapContext:
    moe_blocks: frozenset[int]
    num_routed: int  # E, incl. router-added experts
    slices: int  # S = H_dense / H_e
    patch_size: int
    pos_table_1LD: torch.Tensor | None  # the target model's fixed table; None with RoPE
    pos_tolerance: float = 1e-4


def _regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_COMPILED = [(row, _regex(row.source)) for row in KEY_MAP]


def match_row(key: str, ctx: MapContext) -> tuple[KeyRow, str | None] | None:
    """The row a source key falls under and its target key (None: checked only), or None if unmapped."""
    for row, regex in _COMPILED:
        m = regex.match(key)
        if m is None:
            continue
        block = int(m.group("i")) if "i" in regex.groupindex else None
        if block is not None and row.block != "any" and (block in ctx.moe_blocks) != (row.block == "moe"):
            continue
        target = row.target.format(i=block) if row.target is not None else None
        return row, target
    return None


def _experts_in(w_HD: torch.Tensor, ctx: MapContext) -> torch.Tensor:
    H, D = w_HD.shape
    w_SDh = w_HD.T.reshape(D, ctx.slices, H // ctx.slices).permute(1, 0, 2)
    return _replicate(w_SDh, ctx)


def _experts_in_b(b_H: torch.Tensor, ctx: MapContext) -> torch.Tensor:
    return _replicate(b_H.reshape(ctx.slices, -1), ctx)


def _experts_out(w_DH: torch.Tensor, ctx: MapContext) -> torch.Tensor:
    D, H = w_DH.shape
    return _replicate(w_DH.T.reshape(ctx.slices, H // ctx.slices, D) * ctx.slices, ctx)


def _experts_out_b(b_D: torch.Tensor, ctx: MapContext) -> torch.Tensor:
    return b_D[None].expand(ctx.num_routed, -1).clone()


def _replicate(slices_S: torch.Tensor, ctx: MapContext) -> torch.Tensor:
    """Expert e = slice e mod S."""
    return slices_S[torch.arange(ctx.num_routed) % ctx.slices].clone()


def _out_channels(w: torch.Tensor, ctx: MapContext, target_shape: torch.Size) -> torch.Tensor:
    pp = ctx.patch_size ** 2
    c_src, c_dst = w.shape[0] // pp, target_shape[0] // pp
    if c_dst > c_src or w.shape[0] % pp:
        return w  # the shape check reports it
    return w.reshape(pp, c_src, *w.shape[1:])[:, :c_dst].reshape(pp * c_dst, *w.shape[1:])


def _check_pos_table(key: str, pos: torch.Tensor, ctx: MapContext) -> None:
    if ctx.pos_table_1LD is None:
        raise ConversionError(f"source has {key} but the target model uses RoPE (model.pos_embed=rope); "
                              "convert to pos_embed sincos or sincos_wh")
    expected = ctx.pos_table_1LD.to(pos.dtype)
    if pos.reshape(-1).shape != expected.reshape(-1).shape:
        raise ConversionError(f"{key} has shape {tuple(pos.shape)} but the model's table is {tuple(expected.shape)}")
    err = (pos.reshape(expected.shape).float() - expected.float()).abs().max().item()
    if err > ctx.pos_tolerance:
        raise ConversionError(f"{key} differs from the model's fixed sin-cos table by up to {err:.3g}: the "
                              "checkpoint's positions were not made by get_2d_sincos_pos_embed (or were trained)")


_TRANSFORMS = {"experts_in": _experts_in, "experts_in_b": _experts_in_b,
               "experts_out": _experts_out, "experts_out_b": _experts_out_b}


def _apply(row: KeyRow, tensor: torch.Tensor, ctx: MapContext, target_shape: torch.Size) -> torch.Tensor:
    if row.transform == "copy":
        return tensor
    if row.transform == "out_channels":
        return _out_channels(tensor, ctx, target_shape)
    try:
        return _TRANSFORMS[row.transform](tensor, ctx)
    except (RuntimeError, ValueError):  # e.g. a hidden width the slices do not divide: the shape check reports it
        return tensor


def map_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                   ctx: MapContext) -> dict[str, torch.Tensor]:
    """Target tensors for every mapped key, in the target's dtype; raises listing every problem."""
    mapped, unmapped, unexpected, mismatched = {}, [], [], []
    for key, tensor in source.items():
        found = match_row(key, ctx)
        if found is None:
            unmapped.append(key)
            continue
        row, target_key = found
        if target_key is None:
            _check_pos_table(key, tensor, ctx)
        elif target_key not in target:
            unexpected.append(f"{key} -> {target_key}")
        else:
            out = _apply(row, tensor, ctx, target[target_key].shape)
            if out.shape != target[target_key].shape:
                mismatched.append(f"{key} {tuple(tensor.shape)} -> {target_key} {tuple(out.shape)}, "
                                  f"model has {tuple(target[target_key].shape)}")
            else:
                mapped[target_key] = out.to(target[target_key].dtype)
    missing = [k for k in target if k not in mapped and not any(p.match(k) for p in INITIALISED)]
    _raise_if_problems(unmapped, unexpected, mismatched, missing)
    return mapped


def _raise_if_problems(unmapped: list[str], unexpected: list[str], mismatched: list[str], missing: list[str]) -> None:
    problems = [(unmapped, "source keys no row of the key map covers"),
                (unexpected, "source keys whose target the MoE model does not have"),
                (mismatched, "shape mismatches"),
                (missing, "model keys the source does not provide")]
    lines = [f"{what} ({len(keys)}):\n    " + "\n    ".join(keys[:20]) + ("\n    …" if len(keys) > 20 else "")
             for keys, what in problems if keys]
    if lines:
        raise ConversionError("the checkpoint does not fit the key map (convert/keys.py):\n  " + "\n  ".join(lines)
                              + "\nCheck that the source is a dense DiT (moedit or facebookresearch/DiT layout) and "
                                "that model settings such as depth, width, heads and ffn match it.")

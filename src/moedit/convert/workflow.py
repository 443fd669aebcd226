"""Dense → MoE conversion as a workflow: read the source, build the output run config, convert, verify,
and write a new run directory atomically (docs/CONVERT.md). `moedit convert` only parses arguments into a
`ConvertRequest` and calls `convert_run`.

The output is a run directory like `moedit train` writes: config.yaml (the source run's settings, or
DiT's DDPM defaults, with model.moe set and train.out_dir = OUT), checkpoints/step_00000000/ with the
converted weights in both model.safetensors and ema.safetensors (a weights-only checkpoint: resuming
starts a fresh optimizer), and conversion.json (what was done, exactness, verification).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from moedit.config import Config, ConfigError, apply_overrides, deep_merge, from_dict, load_yaml, save_yaml, to_dict
from moedit.convert.dense import (build_dense, convert_dense, dense_hidden, expected_exactness, expert_split,
                                  verify_conversion, with_zero_shared)
from moedit.convert.keys import ConversionError
from moedit.convert.sources import DenseSource, load_source, output_channels
from moedit.moe.layer import expert_hidden
from moedit.moe.routers import router_class
from moedit.train import checkpoint as ckpt
from moedit.utils.files import ensure_writable_dir


@dataclass(kw_only=True)
class ConvertRequest:
    """What to convert and how; the fields are `moedit convert`'s options (its --help says each)."""

    source: str
    out: Path
    moe_file: str | None = None  # YAML with model.moe (other sections override the output run config)
    overrides: list[str] = field(default_factory=list)
    raw: bool = False
    shared_init: str = "noise"  # noise | zero
    noise_std: float = 1e-4
    zero_gates: bool = False
    seed: int = 0
    learn_sigma: str = "keep"  # keep | drop
    heads: int | None = None
    verify: bool = False
    verify_batch: int = 8
    tolerance: float = 1e-4


def output_config(source: DenseSource, req: ConvertRequest) -> Config:
    """The source's run settings with model.moe from the MoE file / overrides; out_dir = the output."""
    data = deep_merge(source.run_config, {"model": {**to_dict(source.model), "moe": None}})
    if req.moe_file:
        data = deep_merge(data, load_yaml(req.moe_file))
    data = apply_overrides(data, req.overrides)
    moe = data["model"].get("moe")
    if not moe:
        raise ConfigError("no MoE settings: pass --moe FILE.yaml (with model.moe) or --set model.moe.num_experts=8 ...")
    moe.setdefault("expert_ratio", source.model.mlp_ratio)  # default: every expert a full copy of the FFN
    data["model"]["out_channels"] = output_channels(source.model, req.learn_sigma)
    data.setdefault("train", {})["out_dir"] = str(req.out)
    return from_dict(data)


def convert_run(req: ConvertRequest, log=print) -> Path:
    """Convert `req.source` into the new run directory `req.out` (never overwritten); returns it."""
    out = check_out(Path(req.out))
    source = load_source(req.source, req.raw, req.heads)
    cfg = output_config(source, req)
    log(f"source: {source.description}")
    dense = build_dense(source.state, source.model)
    model, _ = convert_dense(source.state, source.model, cfg.model, req.shared_init, req.noise_std, req.seed,
                             "zero" if req.zero_gates else "random")
    log(f"converted: {summary(source.model, cfg.model)}")
    exact, reason = expected_exactness(source.model, with_zero_shared(model))
    log(f"exact: {'yes' if exact else 'NO'} ({reason})")
    info = {"source": str(req.source), "description": source.description, "raw": req.raw,
            "shared_init": req.shared_init, "noise_std": req.noise_std, "seed": req.seed,
            "zero_gates": req.zero_gates, "learn_sigma": req.learn_sigma,
            "exact_expected": exact, "reason": reason, "exactness_with_shared_experts": "zero"}
    if req.verify:
        info["verification"] = _verify(dense, model, cfg, req, exact, log)
    write_run(out, cfg, model.state_dict(), info)
    log(f"wrote {out}: config.yaml, checkpoints/step_00000000 (weights only), conversion.json")
    if cfg.model.in_channels in (1, 3):
        log(f"next: moedit sample --run {out}   |   moedit train -c {out / 'config.yaml'} --resume")
    else:  # e.g. DiT's 4-channel SD-VAE latents
        log(f"note: {cfg.model.in_channels}-channel (latent) images: moedit's PNG grids and data loaders take 1 or 3 "
            "channels; sample with moedit.generate.generate and decode with your VAE (docs/CONVERT.md)")
    return out


def _verify(dense, model, cfg: Config, req: ConvertRequest, exact: bool, log) -> dict:
    report = verify_conversion(dense, with_zero_shared(model), req.verify_batch, req.seed, req.tolerance)
    log(verification_line(report))
    if cfg.model.moe.num_shared and req.shared_init == "noise":
        log(f"        (shared experts zeroed for verification; the written model has noise std {req.noise_std:g})")
    if exact and not report["within_tolerance"]:
        raise ConversionError(f"verification failed: max |Δ| {report['max_abs']:.3g} > {report['tolerance']:.3g} "
                              "although this configuration must be exact; nothing was written")
    return report


def check_out(out: Path) -> Path:
    """The output is a new folder, built beside where it goes (write_run): its parent must take files,
    checked before the source is read and converted."""
    if out.exists():
        raise ConfigError(f"{out} already exists; conversion never overwrites: choose a new --out. Nothing was changed.")
    ensure_writable_dir(out.parent, f"--out {out}: its parent folder")
    return out


def summary(dense, moe_cfg) -> str:
    m, r = moe_cfg.moe, moe_cfg.moe.router
    S = expert_split(dense, moe_cfg)
    experts = "full copies" if S == 1 else f"{S} hidden slices of the dense FFN, each scaled by {S}"
    return (f"{dense.depth} blocks ({m.placement}), dense FFN hidden {dense_hidden(dense)} → {m.num_experts} experts "
            f"of hidden {expert_hidden(dense.width, m.expert_ratio)} ({experts}), {m.num_shared} shared; router "
            f"{r.name} {router_class(r.name).describe(r)}")


def verification_line(report: dict) -> str:
    verdict = "within" if report["within_tolerance"] else "above"
    return (f"verify: max |Δ| {report['max_abs']:.3g}, mean |Δ| {report['mean_abs']:.3g} over {report['samples']} "
            f"samples ({report['null_label_samples']} null-label: max |Δ| {report['max_abs_null_label']:.3g}); "
            f"dense output max |y| {report['output_max_abs']:.3g}; {verdict} tolerance {report['tolerance']:.3g}")


def write_run(out: Path, cfg: Config, tensors: dict, info: dict) -> Path:
    """The run directory, built under a temporary name and renamed into place."""
    tmp = out.parent / f".{out.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_yaml(cfg, tmp / "config.yaml")
        ckpt.save_weights_checkpoint(tmp / "checkpoints", 0, tensors, tensors, to_dict(cfg.model),
                                     {"converted_from": info["source"]})
        (tmp / "conversion.json").write_text(json.dumps(info, indent=1, default=str))
        if out.exists():
            raise ConfigError(f"{out} appeared while converting; nothing was overwritten (the result is discarded)")
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

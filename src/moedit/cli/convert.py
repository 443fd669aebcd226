"""`moedit convert`: a dense DiT (moedit run or facebookresearch/DiT checkpoint) → a MoE run directory.

    moedit convert runs/dense --out runs/moe --set model.moe.num_experts=8 model.moe.router.normalize=true --verify

The output is a run directory like `moedit train` writes: config.yaml (the source run's settings, or
DiT's DDPM defaults, with model.moe set and train.out_dir = OUT), checkpoints/step_00000000/ with the
converted weights in both model.safetensors and ema.safetensors (a weights-only checkpoint: resuming
starts a fresh optimizer), and conversion.json (what was done, exactness, verification). docs/CONVERT.md.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from moedit.config import Config, ConfigError, apply_overrides, deep_merge, from_dict, load_yaml, save_yaml, to_dict

HELP = "convert a dense DiT (moedit run or facebookresearch/DiT checkpoint) into a MoE run directory"


def add_arguments(p) -> None:
    p.add_argument("source", help="dense moedit run dir, its checkpoints/step_N dir, or a facebookresearch/DiT "
                                  ".pt/.pth/.safetensors file")
    p.add_argument("--out", required=True, help="new run directory to write (never overwritten)")
    p.add_argument("--moe", metavar="FILE", help="YAML with the MoE settings under model.moe (other sections, e.g. "
                                                 "train or sample, override the output run config)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the output config, e.g. model.moe.num_experts=8 model.moe.router.top_k=1")
    p.add_argument("--raw", action="store_true", help="convert the raw weights instead of the EMA weights")
    p.add_argument("--shared-init", choices=("noise", "zero"), default="noise",
                   help="shared experts: tiny noise for training (default) or exactly zero")
    p.add_argument("--noise-std", type=float, default=1e-4, help="std of the shared experts' noise (default 1e-4)")
    p.add_argument("--zero-gates", action="store_true",
                   help="zero the gates' last layer (uniform scores): what an exact fine-grained split needs")
    p.add_argument("--seed", type=int, default=0, help="seed of the routers' random initialisation")
    p.add_argument("--learn-sigma", choices=("keep", "drop"), default="keep",
                   help="DiT checkpoints with 2·C outputs: keep the learned-sigma channels or drop them")
    p.add_argument("--heads", type=int, help="attention heads of a facebookresearch/DiT checkpoint "
                                             "(default: the DiT preset of its width)")
    p.add_argument("--verify", action="store_true", help="compare dense and MoE outputs (shared experts zeroed)")
    p.add_argument("--verify-batch", type=int, default=8, help="samples for --verify (half with the null label)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="--verify fails above tolerance·max(1, max|dense output|) when exactness is expected")


def output_config(source, args) -> Config:
    """The source's run settings with model.moe from --moe / --set; out_dir = --out."""
    from moedit.moe.convert_sources import output_channels

    data = deep_merge(source.run_config, {"model": {**to_dict(source.model), "moe": None}})
    if args.moe:
        data = deep_merge(data, load_yaml(args.moe))
    data = apply_overrides(data, args.set)
    moe = data["model"].get("moe")
    if not moe:
        raise ConfigError("no MoE settings: pass --moe FILE.yaml (with model.moe) or --set model.moe.num_experts=8 ...")
    moe.setdefault("expert_ratio", source.model.mlp_ratio)  # default: every expert a full copy of the FFN
    data["model"]["out_channels"] = output_channels(source.model, args.learn_sigma)
    data.setdefault("train", {})["out_dir"] = str(args.out)
    return from_dict(data)


def run(args) -> int:
    from moedit.moe.convert import build_dense, convert_dense, expected_exactness, verify_conversion, with_zero_shared
    from moedit.moe.convert_keys import ConversionError
    from moedit.moe.convert_sources import load_source

    out = _check_out(Path(args.out))
    source = load_source(args.source, args.raw, args.heads)
    cfg = output_config(source, args)
    print(f"source: {source.description}")
    dense = build_dense(source.state, source.model)
    model, _ = convert_dense(source.state, source.model, cfg.model, args.shared_init, args.noise_std, args.seed,
                             "zero" if args.zero_gates else "random")
    print(f"converted: {_summary(source.model, cfg.model)}")
    exact, reason = expected_exactness(source.model, with_zero_shared(model))
    print(f"exact: {'yes' if exact else 'NO'} ({reason})")
    info = {"source": str(args.source), "description": source.description, "raw": args.raw,
            "shared_init": args.shared_init, "noise_std": args.noise_std, "seed": args.seed,
            "zero_gates": args.zero_gates, "learn_sigma": args.learn_sigma,
            "exact_expected": exact, "reason": reason, "exactness_with_shared_experts": "zero"}
    if args.verify:
        report = verify_conversion(dense, with_zero_shared(model), args.verify_batch, args.seed, args.tolerance)
        info["verification"] = report
        print(_verification_line(report))
        if cfg.model.moe.num_shared and args.shared_init == "noise":
            print(f"        (shared experts zeroed for verification; the written model has noise std {args.noise_std:g})")
        if exact and not report["within_tolerance"]:
            raise ConversionError(f"verification failed: max |Δ| {report['max_abs']:.3g} > {report['tolerance']:.3g} "
                                  "although this configuration must be exact; nothing was written")
    write_run(out, cfg, model.state_dict(), info)
    print(f"wrote {out}: config.yaml, checkpoints/step_00000000 (weights only), conversion.json")
    if cfg.model.in_channels in (1, 3):
        print(f"next: moedit sample --run {out}   |   moedit train -c {out / 'config.yaml'} --resume")
    else:  # e.g. DiT's 4-channel SD-VAE latents
        print(f"note: {cfg.model.in_channels}-channel (latent) images: moedit's PNG grids and data loaders take 1 or 3 "
              "channels; sample with moedit.generate.generate and decode with your VAE (docs/CONVERT.md)")
    return 0


def _check_out(out: Path) -> Path:
    """--out is a new folder, built beside where it goes (write_run): its parent must take files, checked
    before the source is read and converted."""
    from moedit.utils.files import ensure_writable_dir

    if out.exists():
        raise ConfigError(f"{out} already exists; conversion never overwrites: choose a new --out. Nothing was changed.")
    ensure_writable_dir(out.parent, f"--out {out}: its parent folder")
    return out


def _summary(dense, moe_cfg) -> str:
    from moedit.moe.convert import dense_hidden, expert_split
    from moedit.moe.layer import expert_hidden

    m, r = moe_cfg.moe, moe_cfg.moe.router
    S = expert_split(dense, moe_cfg)
    experts = "full copies" if S == 1 else f"{S} hidden slices of the dense FFN, each scaled by {S}"
    normalize = f" normalize={r.normalize}" if r.name == "topk" else ""
    return (f"{dense.depth} blocks ({m.placement}), dense FFN hidden {dense_hidden(dense)} → {m.num_experts} experts "
            f"of hidden {expert_hidden(dense.width, m.expert_ratio)} ({experts}), {m.num_shared} shared; router "
            f"{r.name} top_k={r.top_k} score={r.score}{normalize}")


def _verification_line(report: dict) -> str:
    verdict = "within" if report["within_tolerance"] else "above"
    return (f"verify: max |Δ| {report['max_abs']:.3g}, mean |Δ| {report['mean_abs']:.3g} over {report['samples']} "
            f"samples ({report['null_label_samples']} null-label: max |Δ| {report['max_abs_null_label']:.3g}); "
            f"dense output max |y| {report['output_max_abs']:.3g}; {verdict} tolerance {report['tolerance']:.3g}")


def write_run(out: Path, cfg: Config, tensors: dict, info: dict) -> Path:
    """The run directory, built under a temporary name and renamed into place."""
    from moedit.train import checkpoint as ckpt

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

"""Whole-model training steps and sampling (images/s): a dense DiT against MoE DiTs of equal activated
parameters, for each router, and the same token-choice MoE through the per-expert loop backend.

Each variant is a real `Trainer` (so the timed step is moedit's own: autocast, loss and weighted
auxiliary losses, backward, clipping, AdamW, routing monitor, EMA) on synthetic class-conditional
images, timed by `bench.timing.time_call` around `Trainer.train_step`. Equal activated parameters:
the dense FFN has hidden 4D; the MoE blocks route 2 of E experts of width 2D (ProMoE: 1 of width 4D).

    gpu preset: DiT-XL/2 on 32×32 inputs (256 tokens, as 256-px latents), batch 64, bf16 autocast
    cpu preset: the quickstart's `tiny` model on 28×28 (49 tokens), batch 64, float32
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

from moedit.bench.timing import describe_device, time_call
from moedit.config import from_dict
from moedit.train.trainer import Trainer


WARM_STEPS = 20  # training steps before timing sampling: EMA thresholds leave their initial values


@dataclass(frozen=True)
class ModelVariant:
    name: str
    moe: dict | None  # model.moe section; None = dense


# Each registered router is benchmarked at 2 experts per token (capacity routers: capacity 2; fields a router
# does not use are ignored), except where its paper's setting differs: ProMoE routes top-1. Expert width is
# chosen so that a token's routed experts hold the dense FFN's 4D hidden units (equal activation).
ROUTER_SETTINGS = {"promoe": {"top_k": 1}}


def router_variant(name: str, num_experts: int) -> ModelVariant:
    from moedit.config import RouterConfig
    from moedit.moe.routers import router_class

    router = {"name": name, "top_k": 2, "capacity": 2.0, **ROUTER_SETTINGS.get(name, {})}
    k = router_class(name).experts_per_token(RouterConfig(**router))
    ratio = 4.0 / k
    width = "" if ratio == 2.0 else f" {ratio:g}D"
    return ModelVariant(f"{name} E{num_experts} top-{k:g}{width} (grouped)",
                        {"num_experts": num_experts, "expert_ratio": ratio, "router": router})


def variants(num_experts: int = 8, fused: bool = False) -> list[ModelVariant]:
    """Dense, every registered router on the grouped backend, token choice on the loop backend and with
    column-major experts; with `fused` (where its Triton kernels run) token choice and race on the fused backend."""
    from moedit.moe.routers import ROUTERS

    coarse = {"num_experts": num_experts, "expert_ratio": 2.0}
    out = [ModelVariant("dense (FFN 4D)", None)]
    out += [router_variant(name, num_experts) for name in ROUTERS]
    out.append(ModelVariant(f"topk E{num_experts} top-2 (loop)", {**coarse, "backend": "loop", "router": {"name": "topk"}}))
    out.append(ModelVariant(f"topk E{num_experts} top-2 (grouped, col)",
                            {**coarse, "expert_layout": "col", "router": {"name": "topk"}}))
    if fused:
        for router in ("topk", "race"):
            out.append(ModelVariant(f"{router} E{num_experts} top-2 (fused)",
                                    {**coarse, "backend": "fused", "router": {"name": router, "top_k": 2}}))
    return out


def _fused_runs(device: str) -> bool:
    from moedit.moe.glue_triton import unavailable_reason
    from moedit.device import resolve_device

    return unavailable_reason(resolve_device(device)) is None


def preset(name: str) -> dict:
    if name == "gpu":
        return {"model": {"preset": "DiT-XL/2", "image_size": 32, "in_channels": 1}, "batch": 64, "precision": "bf16"}
    if name == "cpu":
        return {"model": {"preset": "tiny", "image_size": 28, "in_channels": 1}, "batch": 64, "precision": "fp32"}
    raise ValueError(f"unknown model benchmark preset {name!r}; choose gpu or cpu")


def build_trainer(variant: ModelVariant, spec: dict, device: str, out_dir: str) -> Trainer:
    moe = dict(variant.moe) if variant.moe else None
    if moe is not None:
        moe.setdefault("backend", "grouped")  # named, not auto: the label says which path ran, CPU included
    cfg = from_dict({
        "model": {**spec["model"], "num_classes": 10, "moe": moe},
        "data": {"name": "synthetic", "image_size": spec["model"]["image_size"]},
        "train": {"out_dir": out_dir, "batch_size": spec["batch"], "device": device, "precision": spec["precision"],
                  "steps": 10**6, "ckpt_every": 0, "log_every": 10**6},
    })
    return Trainer(cfg, progress=False)


def _run_variants(spec: dict, device: str, names: list[str] | None, measure, label: str, log) -> tuple[list[dict], dict]:
    """One row per variant: `measure(trainer)` gives its Timing. A variant that fails (out of memory, a
    kernel that does not build) gets a row saying why and the others still run."""
    from moedit.device import resolve_device

    rows, meta = [], describe_device(resolve_device(device))
    for variant in variants(fused=_fused_runs(device)):
        if names and not any(n in variant.name for n in names):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                trainer = build_trainer(variant, spec, device, tmp)
                t = measure(trainer)
                params = sum(p.numel() for p in trainer.model.parameters())
            except Exception as exc:
                rows.append({"variant": variant.name, "ms": None, "img_per_s": None, "peak_mib": None, "params": None,
                             "failed": f"{type(exc).__name__}: {exc}"[:400]})
                log(f"{variant.name:36s} failed: {rows[-1]['failed']}")
                continue
            finally:
                trainer = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            rows.append({"variant": variant.name, "ms": t.median_ms, "img_per_s": spec["batch"] / (t.median_ms * 1e-3),
                         "peak_mib": t.peak_mib, "params": params})
            log(f"{variant.name:36s} {t.median_ms:9.1f} ms {rows[-1]['img_per_s']:9.1f} img/s{label}")
    dense = next((r["img_per_s"] for r in rows if r["variant"].startswith("dense")), None)
    for r in rows:
        r["ratio_to_dense"] = r["img_per_s"] / dense if dense and r["img_per_s"] else None
    return rows, meta


def run_model_bench(preset_name: str, device: str, repeats: int = 20, names: list[str] | None = None,
                    log=print) -> dict:
    spec = preset(preset_name)
    rows, meta = _run_variants(spec, device, names, lambda trainer: time_call(trainer.train_step, trainer.device, repeats),
                               "", log)
    return {"meta": {**meta, "preset": preset_name, "batch": spec["batch"], "repeats": repeats}, "rows": rows}


def run_sample_bench(preset_name: str, device: str, repeats: int = 5, sampler_steps: int = 10,
                     cfg_scale: float = 1.5, names: list[str] | None = None, log=print) -> dict:
    """Images/s of `generate` (EMA weights, Euler, classifier-free guidance: 2 forwards per step) per
    variant, after `WARM_STEPS` training steps so that inference thresholds (race, DiffMoE) hold values
    learned from data; at inference every router routes each sample on its own (batch-invariant)."""
    from moedit.config import SampleConfig
    from moedit.generate import generate

    spec = preset(preset_name)
    sample = SampleConfig(sampler="euler", steps=sampler_steps, cfg_scale=cfg_scale)
    labels_B = torch.arange(spec["batch"]) % 10

    def measure(trainer):
        for step in range(WARM_STEPS):
            trainer.train_step(step)
        return time_call(lambda i: generate(trainer.ema.model, trainer.objective, sample, labels_B, trainer.device,
                                            amp_dtype=trainer.amp_dtype), trainer.device, repeats, warmup=1)

    rows, meta = _run_variants(spec, device, names, measure, " (sampling)", log)
    return {"meta": {**meta, "preset": preset_name, "batch": spec["batch"], "repeats": repeats,
                     "sampler": f"euler {sampler_steps} steps, guidance {cfg_scale}"}, "rows": rows}

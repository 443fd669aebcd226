"""Interleaved A/B timing of the quickstart's training step (docs/QUICKSTART.md, "The step").

    PYTHONPATH=src python studies/quickstart_ab.py [--rounds 8] [--steps 10] [--threads 2]

This machine's step time drifts by ±10% over minutes, more than the differences measured here, so the
variants are not timed one after the other: one Trainer for configs/quickstart.yaml is built, and each
round runs `--steps` steps of every variant in turn (order rotated by round); the figure per variant is
the median over rounds of its mean step time. Variants switch in place (same weights, optimizer, data):
- the MoE dispatch backend: loop vs grouped (model.moe.backend);
- attention on CPU: explicit matmul-softmax vs SDPA's flash kernel (models/dit.py);
- glibc malloc: default vs no mmap / no trim (`mallopt` through ctypes: freed blocks stay in the heap
  instead of being unmapped and page-faulted in again next step).
Writes studies/results/quickstart_ab.json when `--json` is given.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart_profile import PhaseClock, timed_step  # noqa: E402

import moedit.models.dit as dit  # noqa: E402
from moedit.config import load_config  # noqa: E402
from moedit.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_TOP_PAD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024,
             _M_MMAP_MAX: 65536}
_KEPT = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_TOP_PAD: 64 * 1024 * 1024, _M_MMAP_MAX: 0}


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.mallopt  # absent from musl
    except (OSError, AttributeError):
        return None


def _apply(settings: dict[int, int]) -> bool:
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return all(mallopt(key, value) == 1 for key, value in settings.items())


def keep_freed_memory() -> bool:
    """Serve allocations from the heap and never trim it; True if glibc took the settings."""
    return _apply(_KEPT)


def restore_defaults() -> bool:
    """glibc's default values (the dynamic mmap threshold stays off once a value is set)."""
    return _apply(_DEFAULTS)


def set_variant(trainer: Trainer, backend: str, attention: str, heap: str) -> None:
    for layer in trainer.model.moe_layers():
        layer.cfg.backend = backend
    dit.CPU_EXPLICIT_ATTENTION_MAX_TOKENS = 128 if attention == "explicit" else 0
    keep_freed_memory() if heap == "kept" else restore_defaults()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = list(itertools.product(("loop", "grouped"), ("explicit", "sdpa"), ("kept", "default")))
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                          [*args.overrides, f"train.out_dir={scratch}/run", "train.log_every=100000"])
        trainer = Trainer(cfg, progress=False)
        trainer.model.train()
        step = 0
        for r in range(args.rounds + 1):  # round 0 warms every variant up and is not counted
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                set_variant(trainer, *v)
                timed_step(trainer, step, PhaseClock())  # first step after a switch: not timed
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    timed_step(trainer, step, PhaseClock())
                    step += 1
                if r:
                    times[v].append((time.perf_counter() - t0) / args.steps)
        trainer.close()
    print(f"{args.threads} threads, {args.rounds} rounds x {args.steps} steps, overrides {args.overrides or 'none'}")
    rows = []
    for v in sorted(variants, key=lambda v: sorted(times[v])[len(times[v]) // 2]):
        ts = sorted(times[v])
        rows.append({"backend": v[0], "attention": v[1], "heap": v[2], "median_ms": 1e3 * ts[len(ts) // 2],
                     "min_ms": 1e3 * ts[0], "max_ms": 1e3 * ts[-1]})
        print(f"  backend {v[0]:<8} attention {v[1]:<9} heap {v[2]:<8} median {rows[-1]['median_ms']:6.1f} ms  "
              f"(min {rows[-1]['min_ms']:.1f}, max {rows[-1]['max_ms']:.1f})")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "steps": args.steps,
                                         "overrides": args.overrides, "torch": torch.__version__,
                                         "variants": rows}, indent=1))


if __name__ == "__main__":
    main()

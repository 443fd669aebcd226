"""The quickstart step's pieces timed alone (docs/QUICKSTART.md, "The step"): the figures behind its
choices of attention path and optimizer kernel, and what torch.compile would cost.

    PYTHONPATH=src python studies/quickstart_kernels.py [--threads 2] [--compile] [--json PATH]

- matrix products of the quickstart's shapes (3,136 tokens × width 128): GFLOP/s in float32 and bf16;
- attention forward + backward, SDPA's kernel vs moedit's explicit CPU path (models/dit.attention), at
  16, 49, 196 and 256 tokens (4 heads of 32, batch 64 / 64 / 16 / 8);
- AdamW step on the quickstart's parameters, foreach vs fused;
- with --compile: seconds to the first compiled training step of the quickstart model, and the steady
  step after it.
Each figure is the best of 3 timed repetitions (this machine drifts ±10% over minutes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import moedit.models.dit as dit
from moedit.config import load_config
from moedit.models import build_model
from moedit.objectives import build_objective
from moedit.train.optim import param_groups

ROOT = Path(__file__).resolve().parents[1]


def best_ms(fn, n: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e3)
    return min(times)


def matmuls() -> list[dict]:
    rows = []
    for M, K, N in ((3136, 128, 384), (3136, 128, 128), (3136, 384, 128)):
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(M, K, dtype=dtype), torch.randn(K, N, dtype=dtype)
            ms = best_ms(lambda: a @ b, 30)
            rows.append({"shape": [M, K, N], "dtype": str(dtype), "ms": ms, "gflops": 2 * M * K * N / ms / 1e6})
    return rows


def attention() -> list[dict]:
    rows = []
    for batch, tokens in ((64, 16), (64, 49), (16, 196), (8, 256)):
        q, k, v = (torch.randn(batch, 4, tokens, 32, requires_grad=True) for _ in range(3))
        grad = torch.randn(batch, 4, tokens, 32)
        explicit = lambda: ((q * 32 ** -0.5) @ k.transpose(-1, -2)).softmax(-1).matmul(v).backward(grad)  # noqa: E731
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v).backward(grad)  # noqa: E731
        rows.append({"batch": batch, "tokens": tokens, "sdpa_ms": best_ms(sdpa, 10), "explicit_ms": best_ms(explicit, 10),
                     "moedit_uses": "explicit" if tokens <= dit.CPU_EXPLICIT_ATTENTION_MAX_TOKENS else "sdpa"})
    return rows


def quickstart_model():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    return cfg, build_model(cfg.model)


def adamw() -> dict:
    _, model = quickstart_model()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    out = {"parameters": sum(p.numel() for p in model.parameters())}
    for name, kw in (("foreach", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4, **kw)
        out[f"{name}_ms"] = best_ms(opt.step, 20)
    return out


def compiled_step() -> dict:
    cfg, model = quickstart_model()
    objective = build_objective(cfg.objective)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    compiled = torch.compile(model)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def step() -> None:
        loss, _ = objective.loss(lambda *a, **k: compiled(*a, **k), x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    return {"first_step_s": first, "steady_step_ms": best_ms(step, 10, warmup=2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "torch": torch.__version__, "matmul": matmuls(), "attention": attention(),
              "adamw": adamw()}
    if args.compile:
        result["compile"] = compiled_step()
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

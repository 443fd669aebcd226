"""Loop vs grouped MoE dispatch, forward+backward, on whatever device runs it (CPU by default).

Decides what `backend: auto` picks on CPU (moe/dispatch.py). Prints a table and writes JSON:

    python benchmarks/dispatch_cpu.py [--device cpu] [--repeats 20] [--out benchmarks/results/dispatch_cpu.json]

Shapes: the quickstart's MoE layer width (D 128) with coarse experts (H = 2D, top-2) and fine-grained
ones (H = D/2 E32 top-8, H = D/4 E64 top-8), under random and skewed routing (max/mean ≈ 3), at three
token counts: a training batch (64 images × 49 tokens), a small batch (8 × 49) and one guided sample
(2 × 49). Three paths on the same assignments:

- loop            : backend loop (per-expert matmuls on the expert-sorted rows, index_add_ combine);
- grouped_perm    : backend grouped with `per_token` set, as token choice routes (permutation path);
- grouped_scatter : backend grouped without it, as race / expert choice / DiffMoE route (general path).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from moedit.moe.dispatch import dispatch
from moedit.moe.experts import StackedExperts
from moedit.moe.routing import Routing

CASES = [  # name, E, H/D, k
    ("coarse E8 top-2 H=2D", 8, 2.0, 2),
    ("coarse E16 top-2 H=2D", 16, 2.0, 2),
    ("fine E32 top-8 H=D/2", 32, 0.5, 8),
    ("fine E64 top-8 H=D/4", 64, 0.25, 8),
]
IMAGES = (64, 8, 2)  # × 49 tokens
PATHS = ("loop", "grouped_perm", "grouped_scatter")


def make_routing(N: int, E: int, k: int, skewed: bool, gen: torch.Generator, device: str) -> Routing:
    logits_NE = torch.randn(N, E, generator=gen)
    if skewed:  # a few experts favoured so that max/mean load is about 3
        logits_NE[:, : max(1, E // 8)] += 1.6
    expert_NK = logits_NE.topk(k, dim=-1).indices
    weight_M = torch.rand(N * k, generator=gen).to(device).requires_grad_(True)
    return Routing(torch.arange(N, device=device).repeat_interleave(k), expert_NK.reshape(-1).to(device), weight_M,
                   N, E, per_token=k)


def path_call(path: str, x_ND: torch.Tensor, routing: Routing, experts: StackedExperts):
    if path == "loop":
        return lambda: dispatch(x_ND, routing, experts, "loop")
    if path == "grouped_perm":
        return lambda: dispatch(x_ND, routing, experts, "grouped")
    general = replace(routing, per_token=None)
    return lambda: dispatch(x_ND, general, experts, "grouped")


def time_path(call, repeats: int) -> float:
    def step():
        y_ND = call()
        y_ND.backward(torch.ones_like(y_ND))

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/dispatch_cpu.json")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    D = args.width
    rows = []
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, D {D}")
    print(f"{'case':24s} {'N':>5s} {'routing':8s} " + " ".join(f"{p + ' ms':>18s}" for p in PATHS) + f" {'max/mean':>9s}")
    for name, E, ratio, k in CASES:
        experts = StackedExperts(E, D, int(ratio * D)).to(args.device)
        for images in IMAGES:
            N = images * 49
            for skewed in (False, True):
                routing = make_routing(N, E, k, skewed, gen, args.device)
                x_ND = torch.randn(N, D, device=args.device, requires_grad=True)
                calls = {p: path_call(p, x_ND, routing, experts) for p in PATHS}
                reference = calls["loop"]()
                for p in PATHS[1:]:  # same answer before timing
                    torch.testing.assert_close(calls[p](), reference, rtol=1e-4, atol=1e-4)
                ms = {p: time_path(calls[p], args.repeats) * 1e3 for p in PATHS}
                load_E = routing.load_E().float()
                imbalance = (load_E.max() / load_E.mean()).item()
                label = "skewed" if skewed else "random"
                print(f"{name:24s} {N:5d} {label:8s} " + " ".join(f"{ms[p]:18.2f}" for p in PATHS) + f" {imbalance:9.2f}")
                rows.append(dict(case=name, tokens=N, routing=label, E=E, H=int(ratio * D), k=k,
                                 **{f"{p}_ms": ms[p] for p in PATHS}, max_over_mean=imbalance))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=args.device, torch=torch.__version__, threads=torch.get_num_threads(), D=D,
                machine=platform.machine(), processor=platform.processor())
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Loop vs grouped MoE dispatch, forward+backward, on whatever device runs it (CPU by default).

Decides what `backend: auto` picks per device. Prints a table and writes JSON:

    python benchmarks/dispatch_cpu.py [--device cpu] [--repeats 20] [--out benchmarks/results/dispatch_cpu.json]

Shapes: the quickstart's MoE layer (D 128, N = 64 images x 49 tokens) with coarse experts (H = 2D,
top-2) and fine-grained ones (H = D/2, E 32, top-8), under random and skewed routing (max/mean ≈ 3).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
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


def make_routing(N: int, E: int, k: int, skewed: bool, gen: torch.Generator) -> Routing:
    logits_NE = torch.randn(N, E, generator=gen)
    if skewed:  # a few experts favoured so that max/mean load is about 3
        logits_NE[:, : max(1, E // 8)] += 1.6
    expert_NK = logits_NE.topk(k, dim=-1).indices
    weight_M = torch.rand(N * k, generator=gen, requires_grad=True)
    return Routing(torch.arange(N).repeat_interleave(k), expert_NK.reshape(-1), weight_M, N, E)


def time_backend(backend: str, x_ND, routing, experts, repeats: int) -> float:
    def step():
        y_ND = dispatch(x_ND, routing, experts, backend)
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
    parser.add_argument("--tokens", type=int, default=64 * 49)
    parser.add_argument("--out", default="benchmarks/results/dispatch_cpu.json")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    D, N = args.width, args.tokens
    rows = []
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, D {D}, N {N}")
    print(f"{'case':28s} {'routing':8s} {'loop ms':>9s} {'grouped ms':>11s} {'max/mean':>9s}")
    for name, E, ratio, k in CASES:
        experts = StackedExperts(E, D, int(ratio * D)).to(args.device)
        for skewed in (False, True):
            routing = make_routing(N, E, k, skewed, gen)
            routing.token_M, routing.expert_M = routing.token_M.to(args.device), routing.expert_M.to(args.device)
            x_ND = torch.randn(N, D, device=args.device, requires_grad=True)
            y_loop = dispatch(x_ND, routing, experts, "loop")
            y_grouped = dispatch(x_ND, routing, experts, "grouped")
            torch.testing.assert_close(y_loop, y_grouped, rtol=1e-4, atol=1e-4)  # same answer before timing
            load_E = routing.load_E().float()
            loop_s = time_backend("loop", x_ND, routing, experts, args.repeats)
            grouped_s = time_backend("grouped", x_ND, routing, experts, args.repeats)
            label = "skewed" if skewed else "random"
            imbalance = (load_E.max() / load_E.mean()).item()
            print(f"{name:28s} {label:8s} {loop_s * 1e3:9.2f} {grouped_s * 1e3:11.2f} {imbalance:9.2f}")
            rows.append(dict(case=name, routing=label, E=E, H=int(ratio * D), k=k, loop_ms=loop_s * 1e3,
                             grouped_ms=grouped_s * 1e3, max_over_mean=imbalance))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=args.device, torch=torch.__version__, threads=torch.get_num_threads(), D=D, N=N,
                machine=platform.machine(), processor=platform.processor())
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Step time, peak RSS and per-rank training state of each parallel layout on CPU, against `moedit plan`.

    PYTHONPATH=src python studies/scaling_cpu.py [--steps 20] [--worlds 2 4] [--layouts ddp fsdp fsdp_ep2 fsdp_ep4]
                                                 [--config configs/quickstart.yaml] [--set KEY=VALUE ...]
                                                 [--timeout 900] [--out studies/results/scaling_cpu.json]

For every world size W (2 and 4) and layout (ddp, fsdp, fsdp+ep 2, and fsdp+ep 4 where 4 divides W)
the launcher starts `torchrun --standalone --nproc_per_node=W` of this file in worker mode, one run at a
time, with OMP_NUM_THREADS=1 (each worker also calls torch.set_num_threads(1)). Each worker builds the
model of the config (the quickstart's 1.9M-parameter MoE-DiT), lays it out with train/layout.py's
Layout as the trainer does (prepare, apply, wrap; after_backward, clip_grad_norm 1.0, the router's
after_optimizer_step hook reduced over ranks) with no activation checkpointing, and trains 3 warm-up
plus `--steps` timed optimizer steps of the RectifiedFlow objective (the config's t-sampling), AdamW
with foreach=True (the trainer itself uses fused=True on CPU) and the trainer's weight-decay groups, each
rank on its own random MNIST-shaped batch (train.batch_size × 1×28×28, labels 0-9, made before the
timer starts; the model's class dropout stays on). No EMA is kept and there is no data loader, codec,
metrics or checkpointing: this is the layout's step, not the trainer's. Per rank it records:

- median and p90 step time (time.perf_counter around one whole optimizer step, forward to router hook);
- RSS before the model is built (the baseline), after it is built and sharded, and the peak RSS after the
  steps (resource.getrusage(RUSAGE_SELF).ru_maxrss, KiB on Linux): the whole process,
  torch and Python included, so mostly a constant, not the layout's state;
- the bytes of training state it holds locally, counted after the last optimizer step and before its
  zero_grad: parameters and gradients (local numel × element size, DTensors by .to_local()) and every
  tensor of optimizer.state (AdamW's exp_avg and exp_avg_sq, and its per-tensor float32 `step` scalar);
  and its local parameter elements.

Beside each row, the planner's figures for the same config, layout and --gpus W (planner.plan, the
checkpointing-none row): parameters per rank and state bytes per rank. The planner's state is 20 B per
parameter (fp32 weights 4 + grads 4 + AdamW 8 + the EMA copy 4; ddp adds DDP's gradient buckets, 4 B,
24 B in all). The worker keeps no EMA and cannot see DDP's buckets through p.grad, so the like-for-like
comparison is params + grads + AdamW moments = 16 B × the planner's parameters per rank, against the
measured bytes without the AdamW `step` scalars (which the planner does not count; their bytes are listed
apart). The planner's figures are those of the fullest rank, so they are compared with the largest rank.
Rank 0 of each run gathers every rank's figures (all_gather_object) into a JSON; the launcher combines
them into `--out` and prints a markdown table (also written beside it as .md).

The machine's cores are shared by the W processes: with fewer cores than W the step times measure
oversubscription, not the layout (the JSON records os.cpu_count()).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
WARMUP = 3
LAYOUTS = {"ddp": ("ddp", 1), "fsdp": ("fsdp", 1), "fsdp_ep2": ("fsdp", 2), "fsdp_ep4": ("fsdp", 4)}


def layout_overrides(name: str) -> list[str]:
    data, ep = LAYOUTS[name]
    return [f"parallel.data={data}", f"parallel.ep={ep}", "parallel.activation_checkpointing=none"]


def runs_for(worlds: list[int], layouts: list[str]) -> list[tuple[int, str]]:
    """(world, layout) pairs: fsdp+ep P only where P divides the world size."""
    return [(w, name) for w in worlds for name in layouts if w % LAYOUTS[name][1] == 0]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, int(-(-len(ordered) * q // 100)) - 1)]


# ----------------------------------------------------------------------------- worker (under torchrun)


def local_numel(t: torch.Tensor) -> int:
    return (t.to_local() if hasattr(t, "to_local") else t).numel()


def local_bytes(t: torch.Tensor) -> int:
    return local_numel(t) * t.element_size()


def held_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    params = list(model.parameters())
    moments = steps = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if not torch.is_tensor(value):
                continue
            if key == "step":
                steps += local_bytes(value)
            else:
                moments += local_bytes(value)
    param_bytes = sum(local_bytes(p) for p in params)
    grad_bytes = sum(local_bytes(p.grad) for p in params if p.grad is not None)
    return {"param_elements": sum(local_numel(p) for p in params), "param_bytes": param_bytes,
            "grad_bytes": grad_bytes, "adam_moment_bytes": moments, "adam_step_bytes": steps,
            "held_bytes": param_bytes + grad_bytes + moments + steps,
            "held_bytes_16B_comparable": param_bytes + grad_bytes + moments,
            "param_tensors": len(params), "params_without_grad": sum(p.grad is None for p in params)}


def current_rss_kib() -> int:
    """This process's resident set now (VmRSS of /proc/self/status, KiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status (this study reads Linux's /proc)")


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from moedit.config import load_config
    from moedit.distributed.setup import DistInfo, all_reduce_sum
    from moedit.models import build_model
    from moedit.objectives.rectified_flow import RectifiedFlow
    from moedit.train.layout import Layout
    from moedit.train.optim import param_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    info = DistInfo(rank=rank, world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    cfg = load_config(args.config, [*args.overrides, *layout_overrides(args.layout)])
    tc = cfg.train

    baseline_kib = current_rss_kib()  # torch, Python and the batch generator, before any model exists
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).train()
    layout = Layout(cfg, info, torch.device("cpu"), None)
    layout.prepare(model)
    layout.apply(model, training=True)
    forward = layout.wrap(model)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas), foreach=True)
    laid_out_kib = current_rss_kib()  # after building and sharding, before the first step
    objective = RectifiedFlow(cfg.objective)
    wants_target = model.wants_target
    mc = cfg.model

    def batch(step: int):
        g = torch.Generator().manual_seed(10_000 * step + rank)
        return (torch.randn(tc.batch_size, mc.in_channels, mc.image_size, mc.image_size, generator=g),
                torch.randint(mc.num_classes, (tc.batch_size,), generator=g), g)

    def train_step(x0, y, g) -> None:
        captured = {}

        def model_fn(*a, **k):
            pred, captured["aux"], _ = forward(*a, **k)
            return pred

        loss, _ = objective.loss(model_fn, x0, y, generator=g, pass_target=wants_target)
        total = loss + sum(tc.aux_weights[n] * v for n, v in captured["aux"].items())
        total.backward()
        layout.after_backward(model)
        layout.clip_grad_norm(model, 1.0)
        optimizer.step()

    seconds, held = [], None
    total_steps = WARMUP + args.steps
    for step in range(total_steps):
        x0, y, g = batch(step)
        t0 = time.perf_counter()
        train_step(x0, y, g)
        if step == total_steps - 1:
            held = held_state(model, optimizer)  # gradients and AdamW state as the step leaves them
        optimizer.zero_grad(set_to_none=True)
        model.after_optimizer_step(all_reduce_sum)
        if step >= WARMUP:
            seconds.append(time.perf_counter() - t0)
    mine = {"rank": rank, "median_ms": 1e3 * statistics.median(seconds), "p90_ms": 1e3 * percentile(seconds, 90),
            "mean_ms": 1e3 * statistics.fmean(seconds),
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "baseline_rss_kib": baseline_kib,
            "laid_out_rss_kib": laid_out_kib,
            **held}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps({
            "world": world, "layout": args.layout, "data": cfg.parallel.data, "ep": cfg.parallel.ep,
            "layout_described": layout.describe(), "batch_size_per_rank": tc.batch_size, "steps": args.steps,
            "warmup": WARMUP, "threads_per_rank": torch.get_num_threads(), "ranks": everyone}, indent=1))
    # every rank past the write, then leave without tearing the gloo group down: at 4 ranks one rank's
    # destroy_process_group() sometimes never returned once the others had exited (seen twice, with and
    # without a barrier before it), which left torchrun waiting; the process holds nothing to flush
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------- launcher


def planner_row(config: str, overrides: list[str], layout: str, world: int) -> dict:
    from moedit.config import load_config
    from moedit.distributed import planner

    cfg = load_config(config, [*overrides, *layout_overrides(layout)])
    data, ep = LAYOUTS[layout]
    plan = planner.plan(cfg, planner.Hardware(gpus=world, gpu_memory=planner.parse_memory("128GiB")))
    row = next(r for r in plan.rows if r.data == data and r.ep == ep and r.checkpointing == "none")
    comparable = (planner.MASTER_BYTES + planner.GRAD_BYTES + planner.ADAM_BYTES) * row.params_per_rank
    buckets = planner.GRAD_BYTES * row.params_per_rank if data == "ddp" else 0
    return {"params_per_rank": row.params_per_rank, "params_dense": row.params_dense,
            "activation_bytes": row.activation_bytes,
            "memory_bytes_comparable": comparable + buckets + row.activation_bytes,
            "params_routed": row.params_routed, "state_bytes": row.state_bytes,
            "state_bytes_16B": comparable,
            "state_bytes_includes": "fp32 weights 4 + grads 4 + AdamW 8 + EMA 4 B/param"
                                    + (" + DDP gradient buckets 4 B/param" if data == "ddp" else "")}


def summarise(run: dict) -> dict:
    ranks = run["ranks"]
    top = max(ranks, key=lambda r: r["param_elements"])  # the fullest rank, as the planner counts
    median = max(r["median_ms"] for r in ranks)  # the slowest rank paces the step
    return {"median_ms_max_rank": median, "p90_ms_max_rank": max(r["p90_ms"] for r in ranks),
            "samples_per_s": run["world"] * run["batch_size_per_rank"] / (median / 1e3),
            "peak_rss_mib_max_rank": max(r["peak_rss_kib"] for r in ranks) / 1024,
            "laid_out_over_baseline_mib_max_rank": max(r["laid_out_rss_kib"] - r["baseline_rss_kib"]
                                                       for r in ranks) / 1024,
            "peak_over_baseline_mib_max_rank": max(r["peak_rss_kib"] - r["baseline_rss_kib"] for r in ranks) / 1024,
            "param_elements_max_rank": top["param_elements"],
            "held_16B_comparable_max_rank": max(r["held_bytes_16B_comparable"] for r in ranks),
            "held_bytes_max_rank": max(r["held_bytes"] for r in ranks),
            "adam_step_bytes_max_rank": max(r["adam_step_bytes"] for r in ranks)}


def markdown(runs: list[dict]) -> str:
    head = ("| W | layout | median ms | p90 ms | samples/s | peak RSS MiB | laid out − baseline MiB | peak − baseline MiB "
            "| plan P+G+Adam (+buckets) + act MiB | params/rank | plan params/rank "
            "| P+G+Adam B/rank | plan 16 B × params | +Adam step B | plan state B (incl. EMA) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in runs:
        s, p = run["summary"], run["planner"]
        match = lambda a, b: f"{a:,}" + ("" if a == b else f" (≠ {b:,})")
        lines.append(f"| {run['world']} | {run['layout']} | {s['median_ms_max_rank']:.1f} | {s['p90_ms_max_rank']:.1f} "
                     f"| {s['samples_per_s']:.0f} | {s['peak_rss_mib_max_rank']:.0f} "
                     f"| {s['laid_out_over_baseline_mib_max_rank']:.0f} | {s['peak_over_baseline_mib_max_rank']:.0f} | {p['memory_bytes_comparable'] / 2**20:.0f} "
                     f"| {match(s['param_elements_max_rank'], p['params_per_rank'])} | {p['params_per_rank']:,} "
                     f"| {match(s['held_16B_comparable_max_rank'], p['state_bytes_16B'])} | {p['state_bytes_16B']:,} "
                     f"| {s['adam_step_bytes_max_rank']:,} | {p['state_bytes']:,} |")
    lines += ["",
              "Laid out − baseline: RSS after the model was built, sharded and given its optimizer, before "
              "the first step, less the baseline.",
              "Peak − baseline: the rank's peak RSS less its RSS before the model was built (torch, Python, "
              "the batch generator), against the planner's parameters + gradients + AdamW moments (ddp: + DDP's "
              "gradient buckets) + activations for this micro-batch; every rank builds the whole unsharded model "
              "before sharding it, which the planner does not count.",
              "Per run, the largest rank's figure (step time: the slowest rank's median and p90; samples/s = W × batch "
              "/ that median). P+G+Adam: fp32 parameters + gradients + AdamW exp_avg/exp_avg_sq held locally, "
              "compared with the planner's 16 B × parameters per rank (≠ marks a mismatch); +Adam step: AdamW's "
              "per-tensor `step` scalars, which the planner does not count. Plan state: `moedit plan`'s state, "
              "20 B/param including an EMA copy the worker does not keep (ddp 24 B: + DDP's gradient buckets)."]
    return "\n".join(lines)


def run_bounded(cmd: list[str], env: dict, timeout: float) -> tuple[int | str, str]:
    """Run torchrun in its own process group; past `timeout` seconds end that group (torchrun and its
    workers, nothing else) and report the time-out instead of waiting on a hung rank."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate()
        return f"timed out after {timeout:.0f} s", stderr


def launch(args: argparse.Namespace) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for world, layout in runs_for(args.worlds, args.layouts):
            out = Path(scratch) / f"w{world}_{layout}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   str(Path(__file__).resolve()), "--worker", "--layout", layout, "--steps", str(args.steps),
                   "--config", args.config, "--worker-out", str(out)]
            if args.overrides:
                cmd += ["--set", *args.overrides]
            print(f"world {world}, {layout}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            returncode, stderr = run_bounded(cmd, env, args.timeout)
            if returncode != 0 or not out.exists():
                sys.exit(f"world {world}, {layout} failed (exit {returncode}):\n{stderr[-4000:]}")
            run = json.loads(out.read_text())
            run["wall_s"] = time.perf_counter() - t0
            run["planner"] = planner_row(args.config, args.overrides, layout, world)
            run["summary"] = summarise(run)
            runs.append(run)
    table = markdown(runs)
    meta = {"study": "scaling_cpu", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "PYTHONPATH=src python studies/scaling_cpu.py " + " ".join(sys.argv[1:]),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "omp_num_threads": 1,
            "threads_per_rank": 1, "config": args.config, "overrides": args.overrides, "steps": args.steps,
            "warmup_steps": WARMUP, "grad_clip": 1.0, "optimizer": "AdamW foreach=True, trainer's weight-decay groups",
            "activation_checkpointing": "none", "ema": False,
            "timing": "time.perf_counter around one optimizer step on each rank, after the warm-up",
            "peak_rss": "resource.getrusage(RUSAGE_SELF).ru_maxrss after the steps, KiB on Linux",
            "held_bytes": "local (to_local) numel × element size of parameters, gradients and every optimizer.state "
                          "tensor, after the last optimizer step before zero_grad",
            "comparison": "planner params_per_rank and 16 B × params_per_rank (params + grads + AdamW, no EMA) "
                          "against the fullest rank's params and params+grads+AdamW moments; planner state_bytes "
                          "(with EMA, ddp + buckets) listed for reference"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**meta, "runs": runs, "table": table}, indent=1))
    args.out.with_suffix(".md").write_text(f"{table}\n\n`{meta['command']}` — torch {meta['torch']}, "
                                           f"{meta['cpu_count']} CPUs, {meta['date']}\n")
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps after the 3 warm-ups")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one torchrun run may take")
    parser.add_argument("--out", type=Path, default=ROOT / "studies" / "results" / "scaling_cpu.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=list(LAYOUTS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    main()

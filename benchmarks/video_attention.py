"""Full vs factorised attention in the video DiT: training throughput and peak memory at several token counts.

    PYTHONPATH=src python benchmarks/video_attention.py [--config configs/video_quickstart.yaml]
                                                        [--frames 4 8 16] [--batch 8] [--steps 6] [--warmup 2]
                                                        [--out benchmarks/results/video_attention.json]

For every frame count T (tokens = T/pt · (H/p)², the config's patches) and each of `full` and `factorised`
attention, a fresh Python process builds the config's model with `model.frames=T` (and that attention),
trains `--warmup` + `--steps` optimizer steps of the rectified-flow loss on random clips of `--batch`, and
reports the median step time (clips/s = batch / median) and its peak memory: the process's peak resident
set (ru_maxrss) less its resident set just before the model was built, i.e. the model, its optimizer state
and the step's activations, without torch and Python themselves. One process per point so that one point's
freed memory never hides the next one's peak. The configs differ only in model.frames and model.attention;
the FFN (dense or MoE) is the config's. Writes `--out` and a markdown table beside it (.md).
On a 2-core CPU the step times are those of one thread (OMP_NUM_THREADS=1, set for the children).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status (this benchmark reads Linux's /proc)")


def measure(config: str, frames: int, attention: str, batch: int, steps: int, warmup: int) -> dict:
    """One point, in this process: build, train, time, and read the memory."""
    from moedit.config import load_config
    from moedit.models import build_model
    from moedit.objectives.rectified_flow import RectifiedFlow

    torch.set_num_threads(1)
    cfg = load_config(config, [f"model.frames={frames}", f"model.attention={attention}"])
    gen = torch.Generator().manual_seed(0)
    shape = (batch, cfg.model.in_channels, frames, cfg.model.image_size, cfg.model.image_size)
    x0, y = torch.rand(shape, generator=gen) * 2 - 1, torch.randint(cfg.model.num_classes, (batch,), generator=gen)
    baseline = rss_kib()
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    flow = RectifiedFlow(cfg.objective)
    seconds = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss, _ = flow.loss(model, x0, y, generator=gen, pass_target=model.wants_target)
        total = loss + sum(0.01 * v for v in model.aux_losses().values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        model.after_optimizer_step()
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"frames": frames, "attention": attention, "tokens": model.time_grid * model.grid ** 2,
            "tokens_per_frame": model.grid ** 2, "batch": batch, "median_step_s": median,
            "clips_per_s": batch / median, "peak_mib": (peak - baseline) / 1024,
            "params": sum(p.numel() for p in model.parameters())}


def table(points: list[dict]) -> str:
    lines = ["| frames | tokens | attention | clips/s | step ms | peak MiB | vs full: speed | vs full: memory |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    full = {p["frames"]: p for p in points if p["attention"] == "full"}
    for p in points:
        ref = full.get(p["frames"])
        speed = f"{p['clips_per_s'] / ref['clips_per_s']:.2f}×" if ref else "-"
        memory = f"{p['peak_mib'] / ref['peak_mib']:.2f}×" if ref else "-"
        lines.append(f"| {p['frames']} | {p['tokens']} | {p['attention']} | {p['clips_per_s']:.1f} | "
                     f"{1e3 * p['median_step_s']:.0f} | {p['peak_mib']:.0f} | {speed} | {memory} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "video_quickstart.yaml"))
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "video_attention.json")
    parser.add_argument("--point", nargs=2, metavar=("FRAMES", "ATTENTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure(args.config, int(args.point[0]), args.point[1], args.batch, args.steps,
                                 args.warmup)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    points = []
    for frames in args.frames:
        for attention in ("full", "factorised"):
            cmd = [sys.executable, __file__, "--config", args.config, "--batch", str(args.batch), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--point", str(frames), attention]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"frames {frames}, {attention} failed:\n{done.stderr[-3000:]}")
            points.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"frames {frames:3d} {attention:10s} {points[-1]['clips_per_s']:7.1f} clips/s "
                  f"{points[-1]['peak_mib']:7.0f} MiB", file=sys.stderr, flush=True)
    meta = {"command": "PYTHONPATH=src python benchmarks/video_attention.py " + " ".join(sys.argv[1:]),
            "config": args.config, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": 1,
            "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**meta, "points": points}, indent=1))
    args.out.with_suffix(".md").write_text(f"{table(points)}\n\n`{meta['command']}`: torch {meta['torch']}, "
                                           f"{meta['cpu_count']} CPUs, one thread, {meta['date']}\n")
    print(table(points))


if __name__ == "__main__":
    main()

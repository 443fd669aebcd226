"""Routing monitor overhead: the quickstart trained with the monitor on and off, same seed.

    python benchmarks/monitor_overhead.py [--config configs/quickstart.yaml] [--steps 150] [--repeats 3]
                                          [--interleaved 400] [--block 10]

Three measurements, because on a shared 2-core machine two runs of the same thing differ by up to ±10%,
more than the monitor costs:
1. separate runs: each repeat trains `--steps` steps twice, monitor on then off, same seed, in a fresh
   run directory; the training loop's wall time (Trainer.train's train_wall_s: every step and the
   log-step flushes; no checkpoint, no sample grid).
2. interleaved: one run of `--interleaved` steps whose monitor is switched on and off every `--block`
   steps; per-step times of the two kinds are compared, so slow drifts of the machine hit both alike.
3. direct: the monitor's own calls (observe, end_step, flush) timed inside the "on" runs of 1.
Writes benchmarks/results/monitor_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from moedit.config import load_config
from moedit.diagnostics import monitor as monitor_mod
from moedit.train.trainer import Trainer

TIMED = ("observe_model", "end_step", "flush")


def timed_monitor_class(totals: dict[str, float]):
    """RoutingMonitor whose per-step methods add their wall time to `totals`."""
    base = monitor_mod.RoutingMonitor

    class Timed(base):
        pass

    for name in TIMED:
        def wrapper(self, *args, _name=name, **kwargs):
            t0 = time.perf_counter()
            out = getattr(base, _name)(self, *args, **kwargs)
            totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - t0
            return out
        setattr(Timed, name, wrapper)
    return Timed


def build_trainer(config: str, steps: int, monitor: bool, out_dir: Path) -> Trainer:
    overrides = [f"train.out_dir={out_dir}", f"train.steps={steps}", "train.ckpt_every=0", "train.sample_every=0",
                 "sample.steps=1", "sample.per_class=1", f"diagnostics.monitor={str(monitor).lower()}"]
    return Trainer(load_config(config, overrides), progress=False)


def train_once(config: str, steps: int, monitor: bool, out_dir: Path) -> dict:
    totals: dict[str, float] = {}
    original = monitor_mod.RoutingMonitor
    monitor_mod.RoutingMonitor = timed_monitor_class(totals)
    try:
        result = build_trainer(config, steps, monitor, out_dir).train()
    finally:
        monitor_mod.RoutingMonitor = original
    return {"ms_per_step": 1000 * result["train_wall_s"] / steps,
            "monitor_ms_per_step": {k: 1000 * v / steps for k, v in totals.items()}}


def train_interleaved(config: str, steps: int, block: int, out_dir: Path) -> dict:
    """Per-step ms with the monitor on and off, alternating every `block` steps in one run."""
    trainer = build_trainer(config, steps, True, out_dir)
    real, null = trainer.routing_monitor, monitor_mod.NullMonitor()
    trainer.model.train()
    times: dict[str, list[float]] = {"on": [], "off": []}
    for step in range(steps):
        mode = "on" if (step // block) % 2 == 0 else "off"
        trainer.routing_monitor = real if mode == "on" else null
        t0 = time.perf_counter()
        trainer.train_step(step)
        trainer.routing_monitor.end_step(step + 1)
        if (step + 1) % trainer.cfg.train.log_every == 0:
            trainer.routing_monitor.flush()
        times[mode].append(1000 * (time.perf_counter() - t0))
    real.close()
    return {mode: {"median_ms": statistics.median(v), "mean_ms": statistics.fmean(v), "steps": len(v)}
            for mode, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interleaved", type=int, default=400)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/monitor_overhead")
    args = parser.parse_args()
    runs = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for mode in ("on", "off"):
                runs[mode].append(train_once(args.config, args.steps, mode == "on", Path(tmp) / f"{mode}{r}"))
                print(f"repeat {r} monitor {mode}: {runs[mode][-1]['ms_per_step']:.1f} ms/step", flush=True)
        interleaved = train_interleaved(args.config, args.interleaved, args.block, Path(tmp) / "interleaved")
    write(summarise(runs, interleaved, args), Path(args.out))


def summarise(runs: dict, interleaved: dict, args) -> dict:
    on = statistics.median(r["ms_per_step"] for r in runs["on"])
    off = statistics.median(r["ms_per_step"] for r in runs["off"])
    calls = {k: statistics.median(r["monitor_ms_per_step"].get(k, 0.0) for r in runs["on"]) for k in TIMED}
    return {
        "command": "python benchmarks/monitor_overhead.py " + " ".join(sys.argv[1:]),
        "config": args.config, "steps": args.steps, "repeats": args.repeats, "block": args.block,
        "device": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
        "python": platform.python_version(),
        "ms_per_step_on": on, "ms_per_step_off": off, "ratio_on_off": on / off,
        "interleaved": interleaved,
        "interleaved_ratio_on_off": interleaved["on"]["median_ms"] / interleaved["off"]["median_ms"],
        "monitor_calls_ms_per_step": calls, "monitor_calls_share": sum(calls.values()) / on,
        "runs": runs,
    }


def write(summary: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    calls, inter = summary["monitor_calls_ms_per_step"], summary["interleaved"]
    lines = [
        "# Routing monitor overhead", "",
        f"`{summary['command']}` on {summary['device']}, torch {summary['torch']}, Python {summary['python']}; "
        f"{summary['config']}.", "",
        "| measurement | monitor off | monitor on | on/off |", "|---|---|---|---|",
        f"| separate runs, {summary['steps']} steps, median of {summary['repeats']} (ms/step) | "
        f"{summary['ms_per_step_off']:.1f} | {summary['ms_per_step_on']:.1f} | {summary['ratio_on_off']:.3f} |",
        f"| one run switched every {summary['block']} steps, median step (ms) | {inter['off']['median_ms']:.1f} | "
        f"{inter['on']['median_ms']:.1f} | {summary['interleaved_ratio_on_off']:.3f} |",
        f"| the monitor's own calls (ms/step) | | {sum(calls.values()):.2f} | "
        f"+{summary['monitor_calls_share']:.2%} |", "",
        "Monitor calls per step: " + ", ".join(f"{k} {v:.2f} ms" for k, v in calls.items()) + ".",
        "Separate runs: " + "; ".join(f"{m} " + ", ".join(f"{r['ms_per_step']:.1f}" for r in summary["runs"][m])
                                      for m in ("on", "off")) + " ms/step.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Where the quickstart's training step spends its time on this CPU (docs/QUICKSTART.md, "The step").

    PYTHONPATH=src python studies/quickstart_profile.py [--set KEY=VALUE ...] [--threads N] [--steps N]

Builds the real Trainer for configs/quickstart.yaml (plus overrides) in a scratch run directory and runs
`--steps` training steps after 5 warm-ups, timing each phase of `Trainer.train_step` with wall clocks
(CPU ops are synchronous, so a phase's time is its own): batch, codec, forward+loss, backward, routing
monitor, gradient clip, optimizer, router hooks, EMA. Then a torch.profiler pass over the same steps lists
the operators that take the most self time. Prints a table; `--json PATH` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from moedit.config import load_config
from moedit.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


class PhaseClock:
    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name].append(time.perf_counter() - t0)


def timed_step(trainer: Trainer, step: int, clock: PhaseClock) -> None:
    """Trainer.train_step's body with a clock around each phase (grad_accum 1, no DDP)."""
    from moedit.train.optim import lr_at, set_lr

    tc = trainer.cfg.train
    set_lr(trainer.optimizer, lr_at(step, tc))
    with clock.phase("batch"):
        x0_BCHW, y_B = trainer.batches.get(step, 0)
    with clock.phase("codec"):
        x0_BCHW = trainer.codec.encode(x0_BCHW)
    with clock.phase("forward+loss"), trainer._autocast():
        loss, aux, _ = trainer._loss_and_aux(x0_BCHW, y_B)
        total = loss.float() + trainer.weighted_aux(aux)
        trainer._note_finite(step + 1, total.detach())
    with clock.phase("backward"):
        total.backward()
    with clock.phase("monitor"):
        trainer.routing_monitor.observe_model(trainer.model)
        trainer.routing_monitor.end_step(step + 1)
    with clock.phase("grad clip"):
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), tc.grad_clip)
    with clock.phase("optimizer"):
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    with clock.phase("router hooks"):
        trainer.model.after_optimizer_step(None)
    with clock.phase("EMA"):
        trainer.ema.update(trainer.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(args.config, [*args.overrides, f"train.out_dir={scratch}/run", "train.log_every=100000"])
        trainer = Trainer(cfg, progress=False)
        trainer.model.train()
        clock = PhaseClock()
        for step in range(5):
            timed_step(trainer, step, PhaseClock())
        for step in range(5, 5 + args.steps):
            with clock.phase("step"):
                timed_step(trainer, step, clock)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for step in range(5 + args.steps, 5 + args.steps + 10):
                timed_step(trainer, step, PhaseClock())
        trainer.close()
    rows = {name: {"median_ms": 1e3 * sorted(v)[len(v) // 2], "mean_ms": 1e3 * sum(v) / len(v)}
            for name, v in clock.seconds.items()}
    params = sum(p.numel() for p in trainer.model.parameters())
    print(f"{params / 1e6:.2f}M parameters, batch {cfg.train.batch_size}, {args.threads} threads, "
          f"{args.steps} steps, overrides {args.overrides or 'none'}")
    print(f"{'phase':<14}{'median ms':>10}{'mean ms':>10}")
    for name, row in rows.items():
        print(f"{name:<14}{row['median_ms']:>10.1f}{row['mean_ms']:>10.1f}")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    print(table)
    if args.json:
        ops = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / 10, "calls_per_step": e.count / 10}
               for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:args.top]]
        args.json.write_text(json.dumps({"overrides": args.overrides, "threads": args.threads,
                                         "torch": torch.__version__, "parameters": params,
                                         "phases": rows, "top_ops": ops}, indent=1))


if __name__ == "__main__":
    main()

"""Kill -9 at random moments, resume, and count what was lost: the reliability figures of docs/RELIABILITY.md.

    python studies/kill_resume.py [--kills 30] [--steps 400] [--seed 0] [--out studies/results/kill_resume]

One run directory is trained by `moedit train --resume-or-start` (a micro MoE-DiT on synthetic data, a
checkpoint and a log row every step, so that most kills land inside a checkpoint write, a metrics append
or the routing record) and killed with SIGKILL after a random delay, `--kills` times; between kills
every file a user relies on is checked:
  - every `checkpoints/step_*` loads (state.json validated, each file's size and sha256, finite weights);
  - `metrics.jsonl` and `routing/` read back (a torn last line is allowed, nothing else);
  - the next start clears the partial directories the kill left (reported by the trainer).
Then the run is resumed to `--steps` and its final weights are compared, bit for bit, with an
uninterrupted run of the same config. With `--torchrun-runs N`, N short 2-process gloo runs under torchrun
are then trained to the end and each is checked for a clean exit with all of rank 0's final files
(checkpoint, grid, summary). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from moedit.diagnostics.record import RoutingRecord
from moedit.train import checkpoint as ckpt
from moedit.train.metrics import read_metrics
from study_results import write_results

SRC = Path(__file__).parents[1] / "src"
FILES = ("model.safetensors", "ema.safetensors", "trainer.safetensors")


def config(run: Path, steps: int) -> dict:
    return {
        "seed": 7,
        "model": {"preset": "micro", "image_size": 8, "patch_size": 2,
                  "moe": {"num_experts": 4, "expert_ratio": 1.0, "router": {"top_k": 2}}},
        "data": {"name": "synthetic", "image_size": 8},
        "train": {"out_dir": str(run), "steps": steps, "batch_size": 8, "ckpt_every": 1, "log_every": 1,
                  "keep_last": 2, "warmup_steps": 5, "threads": 1},
        "sample": {"steps": 2, "per_class": 1},
    }


def command(cfg_path: Path) -> list[str]:
    return [sys.executable, "-m", "moedit.cli.main", "train", "-c", str(cfg_path), "--no-progress", "--resume-or-start"]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


def check_run(run: Path) -> list[str]:
    """What is wrong with the run directory right after a kill (empty list: nothing)."""
    problems = []
    for path in ckpt.list_checkpoints(run / "checkpoints"):
        try:
            ckpt.read_state(path)
            for name in FILES:
                ckpt.load_tensors(path, name)
        except ckpt.CheckpointError as exc:
            problems.append(f"checkpoint lost: {exc}")
    if (run / "metrics.jsonl").exists():
        try:
            read_metrics(run / "metrics.jsonl")
        except Exception as exc:  # noqa: BLE001 - any failure to read counts as a lost history
            problems.append(f"metrics.jsonl unreadable: {exc}")
    if (run / "routing" / "header.json").exists():
        try:
            RoutingRecord(run)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"routing record unreadable: {exc}")
    return problems


def kill_once(cmd: list[str], delay: float) -> tuple[int | None, str]:
    """Start training, SIGKILL it after `delay` s (None: it had already ended), return (exit code, output)."""
    proc = subprocess.Popen(cmd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    return proc.returncode, out


def final_weights(run: Path, steps: int) -> dict[str, dict[str, torch.Tensor]]:
    path = ckpt.step_dir(run / "checkpoints", steps)
    return {name: load_file(str(path / name)) for name in ("model.safetensors", "ema.safetensors")}


def campaign(args, root: Path) -> dict:
    rng = random.Random(args.seed)
    run = root / "killed"
    cfg_path = root / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(config(run, args.steps)))
    kills, problems, swept, cleared_locks, finished_early = [], [], 0, 0, 0
    for i in range(args.kills):
        delay = rng.uniform(args.min_delay, args.max_delay)
        code, out = kill_once(command(cfg_path), delay)
        swept += sum(out.count(s) for s in ("removed the unfinished checkpoint", "restored step_", "finished deleting"))
        cleared_locks += out.count("cleared a stale lock")
        latest = ckpt.list_checkpoints(run / "checkpoints")
        found = check_run(run)
        problems += [f"kill {i} after {delay:.2f} s: {p}" for p in found]
        if code is not None and code >= 0:
            finished_early += 1
            if code != 0:
                problems.append(f"kill {i}: the run exited with {code} before the kill:\n{out[-2000:]}")
        kills.append({"delay_s": round(delay, 3), "exit": code, "latest": latest[-1].name if latest else None,
                      "problems": len(found)})
        print(f"kill {i + 1:3d}/{args.kills}: after {delay:.2f} s, latest {kills[-1]['latest']}, "
              f"{len(found)} problem(s)", flush=True)
    result = subprocess.run(command(cfg_path), env=environment(), capture_output=True, text=True)
    if result.returncode != 0:
        problems.append(f"the final resume failed:\n{result.stdout[-1000:]}{result.stderr[-2000:]}")
    swept += (result.stdout + result.stderr).count("removed the unfinished checkpoint")
    straight = root / "straight"
    (root / "straight.yaml").write_text(yaml.safe_dump(config(straight, args.steps)))
    subprocess.run(command(root / "straight.yaml"), env=environment(), check=True, capture_output=True)
    a, b = final_weights(straight, args.steps), final_weights(run, args.steps)
    differ = [f"{name}:{k}" for name in a for k in a[name] if not torch.equal(a[name][k], b[name][k])]
    steps = [row["step"] for row in read_metrics(run / "metrics.jsonl")]
    return {
        "kills": len(kills), "killed_runs": len(kills) - finished_early, "problems": problems,
        "partial_checkpoints_swept": swept, "stale_locks_cleared": cleared_locks,
        "final_matches_uninterrupted": not differ, "differing_tensors": differ[:10],
        "metrics_rows_once_each": steps == list(range(1, args.steps + 1)),
        "delays_s": [args.min_delay, args.max_delay], "steps": args.steps, "seed": args.seed, "log": kills,
    }


def torchrun_ends(root: Path, runs: int) -> dict:
    """N short 2-rank runs trained to the end: how many exit 0 with rank 0's final files all written."""
    clean, failures = 0, []
    for i in range(runs):
        run = root / f"ddp_{i}"
        cfg_path = root / f"ddp_{i}.yaml"
        cfg_path.write_text(yaml.safe_dump(config(run, 6)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "moedit.cli.main", "train", "-c", str(cfg_path), "--no-progress"]
        result = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=300)
        files = [run / "checkpoints" / "step_00000006" / "state.json", run / "samples" / "final.png", run / "summary.json"]
        if result.returncode == 0 and all(f.is_file() for f in files):
            clean += 1
        else:
            failures.append(f"torchrun run {i}: exit {result.returncode}, missing "
                            f"{[f.name for f in files if not f.is_file()]}: {result.stderr[-500:]}")
        print(f"torchrun run {i + 1}/{runs}: exit {result.returncode}", flush=True)
    return {"torchrun_runs": runs, "torchrun_clean": clean, "torchrun_failures": failures}


def markdown(r: dict, machine: str) -> str:
    return "\n".join([
        "# Kill -9 and resume", "",
        f"`python studies/kill_resume.py --kills {r['kills']} --steps {r['steps']} --seed {r['seed']}"
        + (f" --torchrun-runs {r['torchrun_runs']}" if r.get("torchrun_runs") else "") + f"` on {machine}.", "",
        "| measure | value |", "|---|---|",
        f"| SIGKILLs at random moments ({r['delays_s'][0]}–{r['delays_s'][1]} s after start) | {r['kills']} |",
        f"| of which killed the process (the others found it already exited) | {r['killed_runs']} |",
        f"| checkpoints, metrics or routing records lost or unreadable | {len(r['problems'])} |",
        f"| partial checkpoint directories cleared at the next start | {r['partial_checkpoints_swept']} |",
        f"| stale locks cleared at the next start | {r['stale_locks_cleared']} |",
        f"| final weights bit-identical to an uninterrupted run | {r['final_matches_uninterrupted']} |",
        f"| metrics.jsonl holds each step once, in order | {r['metrics_rows_once_each']} |",
    ] + ([f"| 2-process torchrun runs ending cleanly with all final files | {r['torchrun_clean']} of "
          f"{r['torchrun_runs']} |"] if r.get("torchrun_runs") else [])
        + [""] + [f"- {p}" for p in r["problems"] + r.get("torchrun_failures", [])]) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-delay", type=float, default=1.0, help="seconds after start (imports take about 1 s)")
    p.add_argument("--max-delay", type=float, default=6.0)
    p.add_argument("--torchrun-runs", type=int, default=0, help="then N 2-process runs to the end (clean exits)")
    p.add_argument("--out", default="studies/results/kill_resume")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = campaign(args, Path(tmp)) if args.kills else {"kills": 0, "problems": [], "final_matches_uninterrupted": True}
        if args.torchrun_runs:
            r.update(torchrun_ends(Path(tmp), args.torchrun_runs))
    machine = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"
    write_results(Path(args.out), {"machine": machine, **r}, markdown(r, machine))
    failed = r["problems"] or not r["final_matches_uninterrupted"] or r.get("torchrun_failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Full vs factorised attention in the video quickstart at equal wall time: which samples better for the same
CPU time (docs/VIDEO.md, "Full vs factorised attention: sample quality at equal wall time"; speed and memory
alone: benchmarks/video_attention.py).

    PYTHONPATH=src python studies/video_attention_quality.py            # ~20 min of training + 3 evaluations, 2 idle cores
    PYTHONPATH=src python studies/video_attention_quality.py --n 500 --steps 1000

Protocol, every stage a user-facing command line printed before it runs:
  1. moedit train -c configs/video_quickstart.yaml --set model.attention=full ...        (RUN_ROOT/full)
  2. moedit train -c configs/video_quickstart.yaml --set model.attention=factorised ...  (RUN_ROOT/factorised)
     both with the same steps, no periodic samples, a checkpoint (and a log line) every --ckpt-every steps, all kept;
  3. the budget is full's training wall time; the factorised run's checkpoint at that budget is its latest
     whose logged elapsed time is within it (the metrics log's elapsed_s, which counts checkpoint writes in
     both runs alike). If factorised is the faster one the roles swap: full is cut at factorised's time;
  4. moedit eval RUN --checkpoint CK --n N for each cut (and for the uncut run at equal steps), the same
     seed and sampler for all: per-frame FD-LeNet / KID / accuracy and the temporal measures (eval/video.py).
Both runs train one after the other on the same machine; nothing else should run meanwhile (the budget is
wall time). A stage whose output exists is not run again. Writes studies/results/video_attention_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
from study_results import write_results

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/video_quickstart.yaml"
ATTENTIONS = ("full", "factorised")
SHOWN = ("fd_lenet_frames", "kid_lenet_frames", "class_accuracy_frames", "identity_stability", "motion_speed_ratio",
         "motion_consistency")


def moedit(*args: str) -> None:
    """Run one moedit command as a user would, failing loudly."""
    print("\n$ moedit " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "moedit.cli.main", *args], check=True, cwd=ROOT)


def train(run: Path, attention: str, steps: int, ckpt_every: int) -> dict:
    if not (run / "summary.json").is_file():
        moedit("train", "-c", CONFIG, "--resume-or-start", "--set", f"train.out_dir={run}",
               f"model.attention={attention}", f"train.steps={steps}", "train.sample_every=0",
               f"train.ckpt_every={ckpt_every}", f"train.keep_last={steps // ckpt_every + 1}",
               f"train.log_every={ckpt_every}")  # every checkpoint step then has a logged elapsed time
    return json.loads((run / "summary.json").read_text())


def elapsed_by_step(run: Path) -> dict[int, float]:
    """Step -> seconds since training started, from the metrics log (written at every log step)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row["elapsed_s"] for row in rows if "elapsed_s" in row}


def checkpoint_within(run: Path, budget_s: float) -> tuple[int, float]:
    """The latest checkpointed step whose logged elapsed time is at most `budget_s`, and that time."""
    elapsed = elapsed_by_step(run)
    saved = sorted(int(p.name.split("_")[-1]) for p in (run / "checkpoints").glob("step_*") if p.is_dir())
    within = [s for s in saved if s in elapsed and elapsed[s] <= budget_s]
    if not within:
        raise SystemExit(f"{run}: no checkpoint within {budget_s:.0f} s; lower --ckpt-every and run again")
    return within[-1], elapsed[within[-1]]


def evaluate(run: Path, step: int, n: int) -> dict:
    out = run / "eval" / f"attention_quality_step_{step:08d}_n{n}"
    if not (out / "eval.json").is_file():
        moedit("eval", str(run), "--checkpoint", str(run / "checkpoints" / f"step_{step:08d}"), "--n", str(n),
               "--out", str(out), "--no-progress")
    return json.loads((out / "eval.json").read_text())


def row(attention: str, cut: str, step: int, wall_s: float, report: dict) -> dict:
    metrics = report["metrics"]
    return {"attention": attention, "cut": cut, "step": step, "wall_s": round(wall_s, 1),
            "metrics": {k: metrics[k] for k in SHOWN if k in metrics}, "eval_dir": relative(report["out_dir"])}


def relative(path: str) -> str:
    """A path inside the checkout as the user would type it there; any other as given."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def fmt(value) -> str:
    if isinstance(value, dict):  # KID: mean ± std over subsets
        return f"{value['mean']:.2f} ± {value['std']:.2f}"
    return f"{value:.3f}" if isinstance(value, float) else ("–" if value is None else str(value))


def markdown(result: dict) -> str:
    lines = ["# Full vs factorised attention at equal wall time (video quickstart)", "",
             f"`{result['command']}` on {result['device']}; both trained one after the other, "
             f"{result['steps']} steps each; evaluation: `moedit eval --n {result['n']}`, same seed and sampler.", "",
             "| attention | cut | step | training wall (s) | " + " | ".join(SHOWN) + " |",
             "|---|---|---:|---:|" + "---:|" * len(SHOWN)]
    for r in result["rows"]:
        lines.append(f"| {r['attention']} | {r['cut']} | {r['step']} | {r['wall_s']} | "
                     + " | ".join(fmt(r["metrics"].get(k, "–")) for k in SHOWN) + " |")
    lines += ["", f"Budget: {result['budget_s']:.1f} s, the faster-finishing run's training wall time "
              f"({result['budget_from']}). Contact sheets: each row's eval_dir (results JSON)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000, help="training steps of both runs (default 1000)")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint interval: the granularity of the cut")
    p.add_argument("--n", type=int, default=200, help="clips per evaluation")
    p.add_argument("--run-root", default="runs/video_attention_quality")
    p.add_argument("--out", default=str(ROOT / "studies" / "results" / "video_attention_quality"))
    args = p.parse_args()
    if args.steps % args.ckpt_every:
        p.error(f"--steps {args.steps} must be a multiple of --ckpt-every {args.ckpt_every}")

    runs = {a: ROOT / args.run_root / a for a in ATTENTIONS}
    walls = {a: train(runs[a], a, args.steps, args.ckpt_every)["train_wall_s"] for a in ATTENTIONS}
    fast = min(walls, key=walls.get)  # the one that finishes first sets the budget
    slow = next(a for a in ATTENTIONS if a != fast)
    rows = [row(fast, "all steps", args.steps, walls[fast], evaluate(runs[fast], args.steps, args.n))]
    step, at = checkpoint_within(runs[slow], walls[fast])
    rows.append(row(slow, "equal wall time", step, at, evaluate(runs[slow], step, args.n)))
    if step != args.steps:
        rows.append(row(slow, "all steps", args.steps, walls[slow], evaluate(runs[slow], args.steps, args.n)))
    result = {"command": "python studies/video_attention_quality.py " + " ".join(sys.argv[1:]),
              "device": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "steps": args.steps, "n": args.n, "budget_s": walls[fast], "budget_from": fast, "rows": rows}
    write_results(Path(args.out), result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The CPU latent demo: the quickstart MoE-DiT in pixel space vs in the shipped autoencoder's latent space,
at equal training time, scored on decoded images (docs/LATENT.md, "Measured").

    PYTHONPATH=src python studies/latent_vs_pixel.py --dataset fashion_mnist
    PYTHONPATH=src python studies/latent_vs_pixel.py --dataset mnist

1. `moedit extract` encodes the training split with `moedit:<dataset>` into runs/latents/<dataset> (once;
   the extraction's images/s is recorded).
2. Two runs train at the same time, one thread each: configs/quickstart.yaml (pixels, 1,500 steps) and
   configs/latent_quickstart.yaml (the same model on the 7×7 latents read from the store: 4 channels for
   MNIST, 8 for Fashion-MNIST, so only the patch embedding and the output layer differ), the latter with a
   checkpoint every 100 steps and more steps than it needs; it is stopped when the pixel run ends.
3. The pixel run's training time T decides: the latent run is evaluated at its last checkpoint reached
   within T (its metrics.jsonl logs the elapsed time of every step), so both had the same wall-clock.
4. `moedit eval --n 1000` of both (EMA weights, the quickstart's sampler): FD-LeNet, KID, precision/recall
   and class accuracy on the decoded 28×28 images, and the two grids side by side in one PNG.

Writes runs/latent_demo/<dataset>/{pixel,latent}/, studies/results/latent_vs_pixel_<dataset>.{json,md} and
docs/latent_vs_pixel_<dataset>.png. Rerunning continues the runs (--resume-or-start) and the cached evals.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MOEDIT = [sys.executable, "-m", "moedit.cli.main"]
PIXEL_STEPS, LATENT_STEPS, EVAL_N = 1500, 3000, 1000


def run(cmd: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    print("$ " + " ".join(cmd[2:] if cmd[:2] == MOEDIT[:2] else cmd), flush=True)
    return subprocess.Popen(cmd, env=env, cwd=ROOT, **kw)


def wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a step failed (exit {p.returncode}); see its output above")


def extract(dataset: str, store: Path) -> dict:
    t0 = time.perf_counter()
    wait(run([*MOEDIT, "extract", "-c", "configs/latent_quickstart.yaml", "--out", str(store), "--workers", "1",
              "--no-progress", "--set", f"data.name={dataset}", "data.path=", f"codec.path=moedit:{dataset}",
              "train.threads=1"]))
    index = json.loads((store / "index.json").read_text())  # the run that encoded the store says its speed
    return {"images": index["count"], "encoded_now": index["encoded_now"], "wall_s": round(index["wall_s"], 1),
            "img_per_s": round(index["img_per_s"], 1) if index["img_per_s"] else None,
            "command_wall_s": round(time.perf_counter() - t0, 1)}


def latent_channels(dataset: str) -> int:
    from moedit.codecs.autoencoder import autoencoder_files, read_record

    return int(read_record(autoencoder_files(f"moedit:{dataset}")[1])["spec"]["latent_channels"])


def train_both(dataset: str, out: Path, store: Path) -> None:
    """Both runs at once; the latent one is stopped (its checkpoints are kept) when the pixel one
    ends, since only what it reached within the pixel run's time is evaluated. A rerun after both are done
    trains nothing."""
    if (out / "pixel" / "summary.json").is_file() and (out / "latent" / "metrics.jsonl").is_file():
        return
    common = ["--resume-or-start", "--no-progress", "--set", "train.threads=1", f"data.name={dataset}"]
    pixel = run([*MOEDIT, "train", "-c", "configs/quickstart.yaml", *common, f"train.out_dir={out / 'pixel'}",
                 f"train.steps={PIXEL_STEPS}"])
    latent = run([*MOEDIT, "train", "-c", "configs/latent_quickstart.yaml", *common[:-1], "data.name=latents",
                  f"data.path={store}", f"codec.path=moedit:{dataset}", f"model.in_channels={latent_channels(dataset)}",
                  f"train.out_dir={out / 'latent'}",
                  f"train.steps={LATENT_STEPS}", "train.ckpt_every=100", "train.keep_last=100"])
    wait(pixel)
    latent.terminate()  # SIGTERM (SIGINT is ignored by processes started in the background); its
    # checkpoints are complete directories or none (checkpoints are published atomically)
    if latent.wait() not in (0, -signal.SIGTERM):
        raise SystemExit(f"the latent run failed (exit {latent.returncode}); see its output above")


def steps_within(run_dir: Path, seconds: float) -> int:
    """The last checkpointed step the run reached within `seconds` of training."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    reached = [r["step"] for r in rows if r["elapsed_s"] <= seconds and r["step"] % 100 == 0]
    return max(reached)


def evaluate(run_dir: Path, step: int, out: Path) -> dict:
    wait(run([*MOEDIT, "eval", str(run_dir), "--n", str(EVAL_N), "--no-progress", "--out", str(out),
              "--checkpoint", str(run_dir / "checkpoints" / f"step_{step:08d}"), "--set", "train.threads=1"]))
    return json.loads((out / "eval.json").read_text())


def side_by_side(left: Path, right: Path, path: Path) -> None:
    a, b = Image.open(left).convert("L"), Image.open(right).convert("L")
    gap = 12
    canvas = Image.new("L", (a.width + gap + b.width, max(a.height, b.height)), 255)
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + gap, 0))
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=("mnist", "fashion_mnist"))
    args = p.parse_args(argv)
    out, store = ROOT / "runs" / "latent_demo" / args.dataset, ROOT / "runs" / "latents" / args.dataset
    extraction = extract(args.dataset, store)
    train_both(args.dataset, out, store)
    pixel_summary = json.loads((out / "pixel" / "summary.json").read_text())
    budget = pixel_summary["train_wall_s"]
    latent_step = steps_within(out / "latent", budget)
    results = {"dataset": args.dataset, "extraction": extraction, "budget_s": round(budget, 1)}
    for name, run_dir, step in (("pixel", out / "pixel", PIXEL_STEPS), ("latent", out / "latent", latent_step)):
        record = evaluate(run_dir, step, out / f"eval_{name}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        at = max((r for r in rows if r["step"] <= step), key=lambda r: r["step"])
        results[name] = {"steps": step, "train_s": round(at["elapsed_s"], 1), "img_per_s": round(at["img_per_s"], 1),
                         **{k: v for k, v in record["metrics"].items()}}
    results.update(torch=__import__("torch").__version__, python=platform.python_version(),
                   machine=platform.machine(), threads_per_run=1, eval_n=EVAL_N,
                   command=f"python studies/latent_vs_pixel.py --dataset {args.dataset}")
    figure = ROOT / "docs" / f"latent_vs_pixel_{args.dataset}.png"
    side_by_side(out / "eval_pixel" / "grid.png", out / "eval_latent" / "grid.png", figure)
    (ROOT / "studies" / "results" / f"latent_vs_pixel_{args.dataset}.json").write_text(json.dumps(results, indent=1))
    (ROOT / "studies" / "results" / f"latent_vs_pixel_{args.dataset}.md").write_text(report(results))
    print(report(results))
    return 0


def _metric(m: dict, key: str, field: str = "value") -> str:
    value = m.get(key)
    if isinstance(value, dict):
        value = value.get(field, value.get("mean"))
    return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def report(r: dict) -> str:
    lines = [f"Latent vs pixel space, {r['dataset']}: the quickstart MoE-DiT, equal training time "
             f"({r['budget_s']:.0f} s, one thread per run, both at once on the 2-core CPU); evaluation N = "
             f"{r['eval_n']} decoded samples against the test split. torch {r['torch']}, Python {r['python']}.", "",
             "| space | steps | train s | img/s | FD-LeNet ↓ | KID ↓ | class acc. ↑ |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("pixel", "latent"):
        m = r[name]
        lines.append(f"| {name} | {m['steps']} | {m['train_s']:.0f} | {m['img_per_s']:.0f} | {_metric(m, 'fd_lenet')} | "
                     f"{_metric(m, 'kid_lenet')} | {_metric(m, 'class_accuracy')} |")
    e = r["extraction"]
    lines += ["", f"Extraction of the {e['images']} training images (and their flips) with moedit:{r['dataset']}: "
              f"{e['img_per_s']} img/s ({e['wall_s']} s, one DataLoader worker)." if e["img_per_s"] else
              "", f"Command: `{r['command']}`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""The quickstart recipe search (issue 18; docs/QUICKSTART.md, "The recipe").

    PYTHONPATH=src python studies/quickstart_search.py NAME="KEY=VALUE KEY=VALUE" [NAME=...] [--threads 1]
        [--evals "KEY=VALUE ..." ...]

Each trial is `--config` (default configs/quickstart.yaml) with the given overrides, trained into runs/qs_search/NAME
(`moedit train --resume-or-start`: a finished trial is not trained again) and scored by
`moedit eval RUN --n 1000` (EMA weights, the run's sampler unless `--evals` names sampler overrides;
each `--evals` string is one more evaluation of every trial, e.g. "sample.cfg_scale=3"). Trials given
together train at once, one process each with `--threads` threads: their training seconds are then
those of a shared CPU and only comparable with each other; the quickstart's own wall time is measured
alone (docs/QUICKSTART.md). Every result is merged into studies/results/quickstart_search.json by
(trial, evaluation) and the table studies/results/quickstart_search.md is rewritten from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "qs_search"
RESULTS = ROOT / "studies" / "results" / "quickstart_search.json"
MOEDIT = [sys.executable, "-m", "moedit.cli.main"]


def launch(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([*MOEDIT, *args], env=env, cwd=ROOT, stdout=log.open("a"), stderr=subprocess.STDOUT)


def wait_all(procs: dict[str, subprocess.Popen]) -> None:
    failed = [name for name, p in procs.items() if p.wait() != 0]
    if failed:
        sys.exit(f"failed: {failed}; see runs/qs_search/<name>.log")


def train(trials: dict[str, str], threads: int, config: str) -> None:
    procs = {name: launch(["train", "-c", config, "--resume-or-start", "--no-progress", "--set",
                           f"train.out_dir={RUNS / name}", f"train.threads={threads}", *sets.split()],
                          RUNS / f"{name}.log")
             for name, sets in trials.items() if not (RUNS / name / "summary.json").is_file()}  # finished
    wait_all(procs)


def eval_dir(name: str, sets: str) -> Path:
    tag = "default" if not sets else sets.replace("sample.", "").replace("=", "").replace(" ", "_")
    return RUNS / name / "eval" / f"search_n1000_{tag}"


def evaluate(trials: dict[str, str], evals: list[str], threads: int) -> None:
    procs = {}
    for name in trials:
        for sets in evals:
            if not (eval_dir(name, sets) / "eval.json").is_file():
                procs[f"{name} {sets}"] = launch(
                    ["eval", str(RUNS / name), "--n", "1000", "--no-progress", "--out", str(eval_dir(name, sets)),
                     "--set", f"train.threads={threads}", *sets.split()], RUNS / f"{name}.log")
        if len(procs) >= 2:  # two at a time: one per core
            wait_all(procs)
            procs = {}
    wait_all(procs)


def record(trials: dict[str, str], evals: list[str]) -> list[dict]:
    rows = json.loads(RESULTS.read_text())["trials"] if RESULTS.is_file() else []
    for name, sets in trials.items():
        summary = json.loads((RUNS / name / "summary.json").read_text())
        for ev in evals:
            metrics = json.loads((eval_dir(name, ev) / "eval.json").read_text())["metrics"]
            row = {"trial": name, "overrides": sets, "eval_overrides": ev, "steps": summary["steps"],
                   "train_wall_s": round(summary["train_wall_s"], 1), "img_per_s": round(summary["img_per_s"], 1),
                   "fd_lenet": round(metrics["fd_lenet"], 2), "kid_lenet": round(metrics["kid_lenet"]["mean"], 2),
                   "class_accuracy": round(metrics["class_accuracy"], 4),
                   "precision": metrics["precision_recall_lenet"]["precision"],
                   "recall": metrics["precision_recall_lenet"]["recall"]}
            rows = [r for r in rows if (r["trial"], r["eval_overrides"]) != (name, ev)] + [row]
    RESULTS.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                   "torch": torch.__version__, "python": platform.python_version(),
                                   "trials": rows}, indent=1))
    return rows


def write_table(rows: list[dict]) -> None:
    lines = ["| trial | overrides of configs/quickstart.yaml | eval overrides | steps | train s (shared CPU) | "
             "FD-LeNet | KID | accuracy | precision | recall |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['trial']} | `{r['overrides'] or '-'}` | `{r['eval_overrides'] or '-'}` | {r['steps']} | "
                     f"{r['train_wall_s']:.0f} | {r['fd_lenet']:.2f} | {r['kid_lenet']:.2f} | "
                     f"{r['class_accuracy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trials", nargs="+", help='NAME="KEY=VALUE ..." (an empty value: the config as it is)')
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", default="configs/quickstart.yaml",
                        help="the base config (the search of docs/QUICKSTART.md started from the quickstart of c032342)")
    parser.add_argument("--evals", nargs="*", default=[], help="sampler overrides of extra evaluations")
    args = parser.parse_args()
    trials = dict(t.split("=", 1) if "=" in t else (t, "") for t in args.trials)
    evals = ["", *args.evals]
    RUNS.mkdir(parents=True, exist_ok=True)
    train(trials, args.threads, args.config)
    evaluate(trials, evals, args.threads)
    write_table(record(trials, evals))
    print(RESULTS.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

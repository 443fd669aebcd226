"""One zoo run, resumable at every stage: train ─► evaluate each curve checkpoint ─► routing stats ─► result.json.

    RUN/zoo_train.json   one segment per finished training call of this run (start step, steps, wall,
                         CPU load); speed itself is read from metrics.jsonl's logging windows, which a
                         call interrupted before its end also leaves behind
    RUN/eval/step_*/     `moedit eval` folders (eval.json, grid.png, samples.npz), one per curve checkpoint
    RUN/result.json      the run's row: settings, parameter counts, quality per step, routing, speed

A run with result.json is done and skipped; one without it continues from its latest checkpoint
(moedit.train.Trainer with resume) and reuses finished evaluations (evaluate_run's sample cache).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from moedit.config import to_dict
from moedit.eval.evaluate import evaluate_run
from moedit.models.params import count_parameters
from moedit.train import checkpoint as ckpt
from moedit.train.metrics import read_metrics
from moedit.train.trainer import Trainer
from moedit.utils.files import atomic_write_text
from moedit.zoo.plan import ZooRun, ZooSettings, run_config
from moedit.zoo.routing_stats import routing_stats

RESULT, SEGMENTS = "result.json", "zoo_train.json"


def _write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def train_segment(run: ZooRun, settings: ZooSettings, progress: bool) -> list[dict]:
    """Train (or continue) the run to settings.steps; returns every segment so far."""
    path = run.run_dir / SEGMENTS
    segments = json.loads(path.read_text()) if path.exists() else []
    done = ckpt.list_checkpoints(run.run_dir / "checkpoints")
    if done and int(done[-1].name.removeprefix("step_")) >= settings.steps:
        return segments
    trainer = Trainer(run_config(run, settings), resume=True, progress=progress, start_if_empty=True)
    summary = trainer.train()
    segments.append({"start_step": summary["start_step"], "steps": summary["steps"],
                     "train_wall_s": summary["train_wall_s"], "img_per_s": summary["img_per_s"],
                     "load_5min": os.getloadavg()[1], "threads": trainer.cfg.train.threads})
    _write_json(path, segments)
    return segments


def evaluate_curve(run: ZooRun, settings: ZooSettings, progress: bool) -> list[dict]:
    """evaluate_run on each curve checkpoint (EMA weights, the zoo's N, seed and sampler)."""
    points = []
    for step in settings.curve_steps:
        path = run.run_dir / "checkpoints" / f"step_{step:08d}"
        overrides = [f"sample.steps={settings.sampler_steps}", f"sample.cfg_scale={settings.cfg_scale}"]
        if settings.threads:
            overrides.append(f"train.threads={settings.threads}")
        r = evaluate_run(run.run_dir, n=settings.eval_n, seed=settings.eval_seed, checkpoint=path,
                         overrides=overrides, progress=progress, log=lambda msg: print(f"note: {msg}"))
        m = r["metrics"]
        points.append({"step": step, "fd_lenet": m["fd_lenet"], "kid": m["kid_lenet"]["mean"],
                       "kid_std": m["kid_lenet"]["std"], "precision": m["precision_recall_lenet"]["precision"],
                       "recall": m["precision_recall_lenet"]["recall"], "accuracy": m["class_accuracy"],
                       "eval_dir": r["out_dir"]})
    return points


def window_rates(metrics_path: Path, batch_size: int) -> list[float]:
    """Images/s of each logging window of metrics.jsonl (steps and elapsed time between consecutive rows
    of one training call; a resumed call restarts its clock, and that pair is skipped)."""
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    return [(b["step"] - a["step"]) * batch_size / (b["elapsed_s"] - a["elapsed_s"])
            for a, b in zip(rows, rows[1:]) if b["step"] > a["step"] and b["elapsed_s"] > a["elapsed_s"]]


def speed(run_dir: Path, segments: list[dict], settings: ZooSettings, batch_size: int, tokens_per_image: int) -> dict:
    """Training speed: the median over the logging windows (brief CPU contention moves a mean, hardly a
    median; a budget of fewer than two windows uses the segments' average rates), the whole budget's
    wall time at that rate, and the wall time the segments measured."""
    rates = window_rates(run_dir / "metrics.jsonl", batch_size)
    if not rates:  # a budget shorter than two logging windows: the segments' own average rates
        rates = [s["img_per_s"] for s in segments if s.get("img_per_s")]
    img_per_s = statistics.median(rates) if rates else None
    return {"tokens_per_s": img_per_s * tokens_per_image if img_per_s else None,
            "train_wall_s": settings.steps * batch_size / img_per_s if img_per_s else None,
            "measured_wall_s": sum(s["train_wall_s"] for s in segments), "segments": len(segments),
            "max_load_5min": max((s["load_5min"] for s in segments), default=None)}


def run_one(run: ZooRun, settings: ZooSettings, progress: bool = True) -> dict:
    """The run's result row (from RUN/result.json when it is already done)."""
    result_path = run.run_dir / RESULT
    if result_path.exists():
        return json.loads(result_path.read_text())
    cfg = run_config(run, settings)
    segments = train_segment(run, settings, progress)
    curve = evaluate_curve(run, settings, progress)
    moe = cfg.model.moe
    counts = count_parameters(cfg.model)
    tokens_per_image = (cfg.model.image_size // cfg.model.patch_size) ** 2
    result = {
        "entry": run.entry.name, "dataset": run.dataset, "seed": run.seed, "config": str(run.entry.config),
        "overrides": list(run.entry.overrides), "model": to_dict(cfg.model),
        "params_total": counts.total, "params_activated": counts.activated, "params_router": counts.router,
        "curve": curve, "final": curve[-1],
        "routing": routing_stats(run.run_dir, moe.num_experts, cfg.model.num_classes) if moe else {},
        **speed(run.run_dir, segments, settings, cfg.train.batch_size, tokens_per_image),
    }
    _write_json(result_path, result)
    return result

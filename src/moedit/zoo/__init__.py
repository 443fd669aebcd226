"""The router zoo (`moedit zoo`): every routing method trained on the same data, step budget, seeds and
activated parameters, evaluated by docs/EVALUATION.md, tabulated and plotted (docs/RESULTS.md).

    zoo file (configs/zoo/routers.yaml) ─► plan.py (runs, settings, equal-activated check, ROOT/zoo.json)
        ─► runner.py per run: train ─► evaluate curve checkpoints ─► routing_stats.py ─► RUN/result.json
        ─► report.py: ROOT/results.md (quality and routing tables per dataset), ROOT/quality_vs_steps.png
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from moedit.zoo.plan import (DATASETS, PLAN_FILE, Claim, ZooEntry, ZooError, ZooRun, ZooSettings, activated_table,
                             check_or_write_plan, load_claims, load_zoo_file, plan_runs,
                             select_entries)
from moedit.zoo.report import markdown, plot_curves
from moedit.zoo.routing_stats import routing_stats
from moedit.zoo.runner import RESULT, run_one
from moedit.utils.files import atomic_write_text

__all__ = ["DATASETS", "ZooEntry", "ZooError", "ZooRun", "ZooSettings", "run_zoo", "write_report"]

REPORT_MD, REPORT_JSON, PLOT = "results.md", "results.json", "quality_vs_steps.png"


def machine(threads: int | None = None) -> str:
    """The device and versions; `threads` is what each run trained with (the zoo's setting), not the
    thread count of the process writing the report."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU"
    threads = threads or torch.get_num_threads()
    return f"{device}, torch {torch.__version__}, Python {platform.python_version()}, {threads} thread(s) per run"


def run_zoo(zoo_file: str | Path, root: str | Path, settings: ZooSettings, *, datasets: Sequence[str] = ("mnist",),
            seeds: Sequence[int] = (0, 1), entries: Sequence[str] | None = None, progress: bool = True,
            log: Callable[[str], None] = print) -> list[dict]:
    """Train, evaluate and tabulate every (dataset, seed, entry) run not done yet under `root`; returns
    the result rows of the whole root (earlier calls' runs included) after writing the report."""
    root = Path(root)
    all_entries, max_gap = load_zoo_file(zoo_file)
    chosen = select_entries(all_entries, list(entries) if entries else None)
    _, table = activated_table(chosen, max_gap)
    log(f"activated parameters (routers left out of the gap, max {max_gap:.0%}):\n{table}")
    runs = plan_runs(chosen, list(datasets), list(seeds), root)
    check_or_write_plan(root, settings)
    for i, run in enumerate(runs, 1):
        done = (run.run_dir / RESULT).exists()
        log(f"[{i}/{len(runs)}] {run.dataset} {run.entry.name} seed {run.seed}" + (" (done)" if done else ""))
        row = run_one(run, settings, progress)
        f = row["final"]
        wall = f"{row['train_wall_s']:.0f} s" if row["train_wall_s"] is not None else "not timed"
        log(f"    FD-LeNet {f['fd_lenet']:.2f}  KID {f['kid']:.4f}  acc {f['accuracy']:.3f}  train {wall}")
    return write_report(root, [e.name for e in all_entries], load_claims(zoo_file))


def write_report(root: str | Path, entry_order: Sequence[str] = (), claims: Sequence[Claim] = (),
                 refresh_routing: bool = False) -> list[dict]:
    """ROOT/results.{md,json} and ROOT/quality_vs_steps.png from every finished run under root; entries
    in `entry_order` (the zoo file's order), others after them by name; `claims` checked per dataset.
    `refresh_routing` recomputes each run's routing metrics from its routing record (and rewrites them
    into its result.json): runs finished by an older moedit get the current metric definitions."""
    root = Path(root)
    if not (root / PLAN_FILE).is_file():
        raise ZooError(f"{root} holds no zoo ({PLAN_FILE} is missing): run `moedit zoo --out {root}` first")
    settings = json.loads((root / PLAN_FILE).read_text())
    paths = sorted(root.glob(f"*/*/seed*/{RESULT}"))
    rows = [json.loads(p.read_text()) for p in paths]
    if refresh_routing:
        for path, row in zip(paths, rows):
            if row["model"].get("moe"):
                row["routing"] = routing_stats(path.parent, row["model"]["moe"]["num_experts"],
                                               row["model"]["num_classes"])
                atomic_write_text(path, json.dumps(row, indent=1) + "\n")
    order = {name: i for i, name in enumerate(entry_order)}
    rows.sort(key=lambda r: (DATASETS.index(r["dataset"]) if r["dataset"] in DATASETS else 99,
                             order.get(r["entry"], len(order)), r["entry"], r["seed"]))
    where = machine(settings.get("threads"))
    atomic_write_text(root / REPORT_JSON, json.dumps({"settings": settings, "machine": where, "rows": rows}, indent=1))
    atomic_write_text(root / REPORT_MD, markdown(rows, settings, where, claims))
    if rows:
        plot_curves(rows, root / PLOT)
    return rows


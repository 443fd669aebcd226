"""The bf16 trap on the quickstart model: pure bf16 weight storage loses router updates; each remedy
restores them (docs/ROUTING_MATH.md §7.4, docs/PRECISION.md).

    PYTHONPATH=src python studies/bf16_trap.py                      # 200 steps, lr 2e-3 and 1e-4
    PYTHONPATH=src python studies/bf16_trap.py --steps 100 --lrs 2e-3

configs/quickstart.yaml (topk, 8 experts + 1 shared, 1.9M parameters, MNIST) trained under bf16
autocast (train.precision=bf16, also on CPU) for the same steps and seed, with a 20-step warm-up
(the quickstart's 100 would be half of a 200-step run), once per storage:
  (a) fp32 master weights (the default, train.param_dtype=fp32),
  (b) pure bf16 storage (param_dtype=bf16, router_fp32=false), round to nearest,
  (c) pure bf16 + router and prototypes in float32 (router_fp32=true),
  (d) pure bf16 + stochastic rounding (router_fp32=false, stochastic_rounding=true).
Per run, from the precision monitor measuring every step (train.bf16_monitor_every=1, definitions in
diagnostics/precision.py), averaged over the logged windows: per parameter group the fraction of
moved elements whose stored value did not change (update_lost), the share of the intended update the
stored weights realised (update_kept) and what bf16 round-to-nearest would lose (bf16_lost); the
drift ‖w − w0‖ of each group from its (stored) initial value; the train loss over the last 50 steps
and the held-out loss of the trained (non-EMA) weights on 1,000 MNIST test images (fixed t and noise).
Writes RUN_ROOT/lr<lr>/<variant>/ (normal run directories, each with its bf16_trap_result.json: rerunning
the script reuses finished runs) and studies/results/bf16_trap.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import torch

from moedit.config import load_config
from moedit.diagnostics.precision import GROUPS, param_group
from moedit.objectives import build_objective
from moedit.train.metrics import read_metrics
from moedit.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_routers import held_out  # noqa: E402  (same held-out protocol as the router comparison)

VARIANTS = {
    "a_fp32_master": ("(a) fp32 master weights", {"param_dtype": "fp32"}),
    "b_pure_bf16": ("(b) pure bf16", {"param_dtype": "bf16", "router_fp32": False}),
    "c_bf16_router_fp32": ("(c) bf16 + router fp32", {"param_dtype": "bf16", "router_fp32": True}),
    "d_bf16_stochastic": ("(d) bf16 + stochastic rounding",
                          {"param_dtype": "bf16", "router_fp32": False, "stochastic_rounding": True}),
}


def group_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in model.named_parameters()}


def group_drift(model: torch.nn.Module, w0: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖w − w0‖ over each parameter group."""
    squares = dict.fromkeys(GROUPS, 0.0)
    for name, p in model.named_parameters():
        squares[param_group(name)] += (p.detach().float() - w0[name]).square().sum().item()
    return {g: s**0.5 for g, s in squares.items() if any(param_group(n) == g for n in w0)}


def monitor_means(rows: list[dict]) -> dict[str, float]:
    """Mean over the logged windows of every precision-monitor metric."""
    keys = sorted({k for row in rows for k in row if k.split("/")[0] in ("bf16_lost", "update_lost", "update_kept")})
    return {k: sum(row[k] for row in rows if k in row) / sum(k in row for row in rows) for k in keys}


def run_variant(variant: str, lr: float, steps: int, warmup: int, run_dir: Path) -> dict:
    label, storage = VARIANTS[variant]
    overrides = [f"train.steps={steps}", f"train.lr={lr}", f"train.warmup_steps={warmup}",
                 f"train.out_dir={run_dir}", "train.precision=bf16",
                 "train.ckpt_every=0", "train.log_every=10", "train.bf16_monitor_every=1",
                 "sample.steps=1", "sample.per_class=1"]  # the final grid is not what is measured here
    overrides += [f"train.{k}={str(v).lower()}" for k, v in storage.items()]
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    trainer = Trainer(cfg, progress=True)
    w0 = group_snapshot(trainer.model)
    summary = trainer.train()
    rows = read_metrics(trainer.run_dir / "metrics.jsonl")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-stored weights need the bf16 compute they trained with
        evaluated = held_out(trainer.model, build_objective(cfg.objective), cfg)
    last = [row["loss"] for row in rows if row["step"] > steps - 50]
    return {"variant": variant, "label": label, "lr": lr, "steps": steps, "warmup": warmup, "storage": storage,
            "monitor": monitor_means(rows), "drift": group_drift(trainer.model, w0),
            "train_loss": sum(last) / len(last), "held_out_loss": evaluated["held_out_loss"],
            "expert_share_min_max": [evaluated["share_min"], evaluated["share_max"]],
            "router_lost_series": [[row["step"], row.get("update_lost/router")] for row in rows],
            "train_wall_s": summary["train_wall_s"], "run_dir": str(run_dir)}


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"Device: {meta['device']}, torch {meta['torch']}, Python {meta['python']}, {meta['threads']} threads.",
             f"Command: `{meta['command']}`", ""]
    for lr in sorted({r["lr"] for r in results}, reverse=True):
        rows = [r for r in results if r["lr"] == lr]
        base = rows[0]["drift"]["router"]
        lines += [f"### lr = {lr:g}, {rows[0]['steps']} steps ({rows[0]['warmup']} warm-up)", "",
                  "| storage | update lost: router | experts | rest | router update kept | router drift ‖w−w0‖ "
                  "(vs a) | experts drift | train loss | held-out loss |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            m, d = r["monitor"], r["drift"]
            lines.append(
                f"| {r['label']} | {m.get('update_lost/router', 0):.3f} | {m.get('update_lost/experts', 0):.3f} | "
                f"{m.get('update_lost/rest', 0):.3f} | {m.get('update_kept/router', 0):.3f} | "
                f"{d['router']:.4f} ({d['router'] / base:.2f}×) | {d['experts']:.3f} | {r['train_loss']:.4f} | "
                f"{r['held_out_loss']:.4f} |")
        bf16 = rows[0]["monitor"]
        lines += ["", "What bf16 round-to-nearest would lose in run (a) (bf16_lost): " + ", ".join(
            f"{g} {bf16[f'bf16_lost/{g}']:.3f}" for g in GROUPS if f"bf16_lost/{g}" in bf16), ""]
    return "\n".join(lines)


def cached_run(variant: str, lr: float, args: argparse.Namespace, run_dir: Path) -> dict:
    """A finished run's result is kept in its run directory, so an interrupted sweep picks up where it
    stopped; a run directory without one (an interrupted run) is trained again from scratch."""
    done = run_dir / "bf16_trap_result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if (result["steps"], result["warmup"]) == (args.steps, args.warmup):
            return result
    if run_dir.exists():
        print(f"{run_dir} holds an unfinished or different run; training it again")
        shutil.rmtree(run_dir)
    result = run_variant(variant, lr, args.steps, args.warmup, run_dir)
    done.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 1e-4])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--run-root", default="runs/bf16_trap")
    p.add_argument("--out", default=str(ROOT / "studies" / "results" / "bf16_trap"))
    args = p.parse_args()
    meta = {"device": f"{platform.machine()} CPU" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "command": "PYTHONPATH=src python studies/bf16_trap.py " + " ".join(sys.argv[1:])}
    results = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for lr in args.lrs:
        for variant in args.variants:
            results.append(cached_run(variant, lr, args, Path(args.run_root) / f"lr{lr:g}" / variant))
            Path(args.out + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
            Path(args.out + ".md").write_text(markdown(results, meta))  # rewritten after every run
            print(markdown(results[-1:], meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()

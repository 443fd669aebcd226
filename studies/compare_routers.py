"""Train the quickstart once per router for the same steps and tabulate what each run measured.

    PYTHONPATH=src python studies/compare_routers.py                 # all router configs, 1500 steps
    PYTHONPATH=src python studies/compare_routers.py --steps 300 --configs configs/router_race.yaml

Each config (configs/quickstart.yaml = topk, configs/router_*.yaml, configs/deepseek_style.yaml) differs
from the quickstart only in its routing (tests/unit/test_shipped_configs.py checks it). Per run:
- train loss: mean of the logged diffusion loss over the last 250 steps;
- held-out loss: the EMA model in eval() (inference routing: EMA thresholds for race and DiffMoE) on
  1,000 MNIST test images with one fixed draw of t and noise, the same for every router;
- wall time and tokens/s of the training steps (summary.json);
- routing in eval on those test images: experts per token (assignments / tokens: fixed by top_k for
  topk and ProMoE, free for the others) and each expert's share of the assignments, averaged over
  MoE layers (min and max over experts; 1/E each when balanced).
Writes RUN_ROOT/<name>/ (each a normal run directory with its sample grid) and
studies/results/compare_routers.{json,md}. Existing run directories are refused, not overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
from pathlib import Path

import torch

from moedit.config import load_config
from moedit.data import build_dataset
from moedit.objectives import build_objective
from moedit.train.metrics import read_metrics
from moedit.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["quickstart", "router_expert_choice", "router_diffmoe", "router_race", "router_promoe",
                   "deepseek_style"]


@torch.no_grad()
def held_out(model, objective, cfg, num: int = 1000, batch: int = 250) -> dict:
    """Held-out loss and eval-mode routing of `model` on the first `num` test images (or clips)."""
    data = build_dataset(dataclasses.replace(cfg.data, split="test"))
    num = min(num, len(data))
    model.eval()
    generator = torch.Generator().manual_seed(1234)  # same t and noise for every router
    losses, assignments, tokens = [], 0, 0
    loads = [0.0] * len(model.moe_layers())
    for start in range(0, num, batch):
        x0_BCHW, y_B = data.batch(torch.arange(start, min(start + batch, num)))
        loss, _ = objective.loss(model, x0_BCHW, y_B, generator=generator)
        losses.append(loss.item() * x0_BCHW.shape[0])
        for i, layer in enumerate(model.moe_layers()):
            routing = layer.last_routing
            loads[i] = loads[i] + routing.load_E().double()
            assignments += routing.token_M.numel()
            tokens += routing.num_tokens
    if not loads:  # a dense model: no routing to report
        return {"held_out_loss": sum(losses) / num}
    # shares among the configured routed experts (ProMoE's unconditional expert idles at real labels)
    E = cfg.model.moe.num_experts
    share_LE = torch.stack([load[:E] / load[:E].sum().clamp_min(1) for load in loads])
    mean_share_E = share_LE.mean(0)
    return {"held_out_loss": sum(losses) / num, "experts_per_token": assignments / tokens,
            "share_min": mean_share_E.min().item(), "share_max": mean_share_E.max().item(),
            "share_E": [round(v, 4) for v in mean_share_E.tolist()]}


def run_one(name: str, steps: int, run_root: Path) -> dict:
    overrides = [f"train.steps={steps}", f"train.out_dir={run_root / name}", "train.ckpt_every=0"]
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", overrides)
    trainer = Trainer(cfg, progress=True)
    summary = trainer.train()
    load = os.getloadavg()[1]  # 5-min load at the end of training: above ~cores, something shared the CPU
    (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    logged = [row for row in read_metrics(trainer.run_dir / "metrics.jsonl") if row["step"] > steps - 250]
    routed = held_out(trainer.ema.model, build_objective(cfg.objective), cfg)
    tokens_per_image = (cfg.model.image_size // cfg.model.patch_size) ** 2
    r = cfg.model.moe.router
    return {"config": f"configs/{name}.yaml", "router": r.name, "gate": r.gate, "score": r.score, "top_k": r.top_k,
            "steps": steps, "train_loss": sum(row["loss"] for row in logged) / len(logged),
            "train_wall_s": summary["train_wall_s"], "tokens_per_s": summary["img_per_s"] * tokens_per_image,
            "load_5min": load, "grid": summary["final_grid"],
            "params": sum(p.numel() for p in trainer.model.parameters()), **routed}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Device: {meta['device']}, torch {meta['torch']}, {meta['threads']} threads; "
             f"{rows[0]['steps'] if rows else 0} steps each.", "",
             "| config | router (gate, score, k) | params | train loss | held-out loss | train s | tokens/s "
             "| experts/token (eval) | expert share min–max (eval) | CPU load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(
            f"| `{r['config']}` | {r['router']} ({r['gate'] or '—'}, {r['score']}, {r['top_k']}) | "
            f"{r['params'] / 1e6:.2f}M | {r['train_loss']:.4f} | {r['held_out_loss']:.4f} | "
            f"{r['train_wall_s']:.0f} | {r['tokens_per_s']:.0f} | {r['experts_per_token']:.2f} | "
            f"{r['share_min']:.3f}–{r['share_max']:.3f} | {r['load_5min']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, help="config names in configs/ (no .yaml)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--run-root", default="runs/compare_routers")
    p.add_argument("--out", default=str(ROOT / "studies" / "results" / "compare_routers"))
    args = p.parse_args()
    meta = {"device": f"{platform.machine()} CPU" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    rows = []
    for name in args.configs:
        rows.append(run_one(Path(name).stem, args.steps, Path(args.run_root)))
        print(markdown(rows[-1:], meta))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # after every run: a crash keeps the rest
        Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        Path(args.out + ".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()

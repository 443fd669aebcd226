"""The conversion study of arXiv 2605.19378 at quickstart scale: train the dense quickstart, convert it to a
token-choice MoE with a linear, an MLP and a cross-attention gate, fine-tune each, and diagnose the routing.

    PYTHONPATH=src python studies/conversion_study.py            # or: make conversion-study
    PYTHONPATH=src python studies/conversion_study.py --gates linear --finetune-steps 300
    PYTHONPATH=src python studies/conversion_study.py --variant nobalance --set train.aux_weights.balance=0

Every stage is the user-facing command line, printed before it runs (docs/CONVERSION_STUDY.md):
  1. moedit train -c configs/dense_quickstart.yaml                            (dense source, 1,500 steps)
  2. moedit convert runs/dense_quickstart --out RUN_ROOT/<gate> --moe configs/study/convert_moe.yaml
         --set model.moe.router.gate=<gate> --verify                         (8 full copies, top-2 normalised)
  3. moedit train -c RUN_ROOT/<gate>/config.yaml --resume                     (fine-tune, monitor on)
  4. moedit diagnose RUN_ROOT/<gate>                                          (report.md + figures)
A stage whose output exists is not run again, so an interrupted study continues where it stopped.
Then, per run: the verification error, held-out loss of the EMA weights on 1,000 MNIST test images (same t
and noise for every model; studies/compare_routers.py's protocol), and from the routing record
the last quarter's per-layer top-1 share, score entropy and expert-output cosine, plus the detector
events. Writes studies/results/conversion_study.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from moedit.diagnostics import record as rec
from moedit.diagnostics.report import tail
from moedit.objectives import build_objective
from moedit.runs import open_run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_routers import held_out  # noqa: E402  (same held-out protocol as the router comparison)

GATES = ["linear", "mlp", "cross_attn"]


def moedit(*args: str) -> None:
    """Run one moedit command as a user would, failing loudly."""
    print("\n$ moedit " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "moedit.cli.main", *args], check=True, cwd=ROOT)


def trained(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def evaluate(run_dir: Path) -> dict:
    """Held-out loss (and eval routing) of the run's latest EMA weights."""
    run = open_run(run_dir)
    model = run.load_model("ema")
    torch.manual_seed(0)
    return held_out(model, build_objective(run.cfg.objective), run.cfg)


def routing_tail(run_dir: Path) -> dict:
    """Per MoE layer, over the last quarter of the record: top-1 share, entropy, expert cosine, min load."""
    record = rec.RoutingRecord(run_dir)
    last = tail(record.records)
    with np.errstate(invalid="ignore"):
        def per_layer(series_RY):
            return [round(float(v), 4) for v in np.nanmean(series_RY, axis=0)]
        first_probe = record.records[record.records["probes"] > 0][:1]
        return {
            "blocks": record.blocks,
            "top1_share": per_layer(rec.top1_share_RY(last)),
            "entropy": per_layer(rec.entropy_RY(last)),
            "cosine": per_layer(rec.probe_cos_RY(last)),
            "cosine_first_probe": per_layer(rec.probe_cos_RY(first_probe)) if len(first_probe) else None,
            "minority_share": per_layer(rec.minority_share_RY(last)),
            "events": record.events,
            "summary": record.summary,
        }


def run_gate(gate: str, dense: Path, run_root: Path, finetune_steps: int | None, extra: list[str],
             variant: str) -> dict:
    out = run_root / (f"{gate}_{variant}" if variant else gate)
    if not (out / "conversion.json").is_file():
        sets = [f"model.moe.router.gate={gate}", *extra] + ([f"train.steps={finetune_steps}"] if finetune_steps else [])
        moedit("convert", str(dense), "--out", str(out), "--moe", "configs/study/convert_moe.yaml",
               "--set", *sets, "--verify")
    if not trained(out):
        moedit("train", "-c", str(out / "config.yaml"), "--resume")
    moedit("diagnose", str(out))
    conversion = json.loads((out / "conversion.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    return {"gate": gate, "run": str(out), "verification": conversion.get("verification"),
            "train_wall_s": summary.get("train_wall_s"), **evaluate(out), "routing": routing_tail(out)}


def fmt_layers(values: list[float | None]) -> str:
    return " / ".join("–" if v is None or v != v else f"{v:.2f}" for v in values)


def markdown(result: dict) -> str:
    lines = ["# Conversion study (dense quickstart → token-choice MoE, three gates)", "",
             f"`{result['command']}` on {result['device']}."
             + (f" Overrides: {', '.join(result['overrides'])}." if result["overrides"] else ""), "",
             f"Dense source: {result['dense']['run']}, held-out loss {result['dense']['held_out_loss']:.4f}.", "",
             "| gate | verify max \\|Δ\\| | held-out loss | top-1 share per layer | score entropy per layer | "
             "expert cosine per layer (first probe → last quarter) | least-loaded expert's share | events |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        g = r["routing"]
        kinds: dict[str, int] = {}
        for e in g["events"]:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        events = ", ".join(f"{k} ×{n}" for k, n in kinds.items()) or "none"
        first = fmt_layers(g["cosine_first_probe"]) if g["cosine_first_probe"] else "–"
        lines.append(f"| {r['gate']} | {r['verification']['max_abs']:.2g} | {r['held_out_loss']:.4f} | "
                     f"{fmt_layers(g['top1_share'])} | {fmt_layers(g['entropy'])} | {first} → "
                     f"{fmt_layers(g['cosine'])} | {fmt_layers(g['minority_share'])} | {events} |")
    lines += ["", "Per-layer values are MoE layers in block order (blocks "
              f"{result['runs'][0]['routing']['blocks'] if result['runs'] else []}), "
              "averaged over the last quarter of the fine-tuning record. Full reports: RUN/diagnostics/report.md."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gates", nargs="*", default=GATES, choices=GATES)
    p.add_argument("--dense", default="runs/dense_quickstart", help="dense run (trained here if missing)")
    p.add_argument("--run-root", default="runs/conversion_study")
    p.add_argument("--finetune-steps", type=int, help="override configs/study/convert_moe.yaml's train.steps")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra overrides given to every `moedit convert` (e.g. train.aux_weights.balance=0)")
    p.add_argument("--variant", default="", help="name of this variant: runs go to RUN_ROOT/<gate>_<variant>, "
                   "results to conversion_study_<variant>.{json,md}")
    p.add_argument("--out", default=str(ROOT / "studies" / "results" / "conversion_study"))
    args = p.parse_args()

    dense, run_root = Path(args.dense), Path(args.run_root)
    if args.variant and not args.set:
        p.error("--variant names a change: give it with --set")
    if not trained(ROOT / dense):
        moedit("train", "-c", "configs/dense_quickstart.yaml", "--set", f"train.out_dir={dense}")
    dense_eval = evaluate(ROOT / dense)
    result = {
        "command": "python studies/conversion_study.py " + " ".join(sys.argv[1:]),
        "device": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                  f"Python {platform.python_version()}",
        "dense": {"run": str(dense), "held_out_loss": dense_eval["held_out_loss"]},
        "overrides": args.set,
        "runs": [run_gate(g, dense, run_root, args.finetune_steps, args.set, args.variant) for g in args.gates],
    }
    out = Path(args.out + (f"_{args.variant}" if args.variant else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

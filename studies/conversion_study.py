"""The conversion study of arXiv 2605.19378 at quickstart scale: train the dense quickstart, convert it to a
token-choice MoE with a linear, an MLP and a cross-attention gate, fine-tune each, and diagnose the routing.
`--domain video` runs it in the paper's own domain: the dense video quickstart on Moving MNIST.

    PYTHONPATH=src python studies/conversion_study.py            # or: make conversion-study
    PYTHONPATH=src python studies/conversion_study.py --domain video   # or: make video-conversion-study
    PYTHONPATH=src python studies/conversion_study.py --gates linear --finetune-steps 300
    PYTHONPATH=src python studies/conversion_study.py --variant nobalance --set train.aux_weights.balance=0

Every stage is the user-facing command line, printed before it runs (docs/CONVERSION_STUDY.md):
  1. moedit train -c configs/dense_quickstart.yaml --resume-or-start          (dense source; video:
                                                    configs/dense_video_quickstart.yaml)
  2. moedit convert runs/dense_quickstart --out RUN_ROOT/<gate> --moe configs/study/convert_moe.yaml
         --set model.moe.router.gate=<gate> --verify                         (8 full copies, top-2 normalised)
  3. moedit train -c RUN_ROOT/<gate>/config.yaml --resume                     (fine-tune, monitor on)
  4. moedit diagnose RUN_ROOT/<gate>                                          (report.md + figures)
A stage whose output exists is not run again, so an interrupted study continues where it stopped.
Then, per run: the verification error, held-out loss of the EMA weights on 1,000 MNIST test images (same t
and noise for every model; studies/compare_routers.py's protocol), and from the routing record
the last quarter's per-layer top-1 share, score entropy and expert-output cosine, plus the detector
events, and the shared expert's share of each MoE layer's output on the held-out batch (Law 2 starts it
at noise; its growth is one of the paper's observations). Writes studies/results/conversion_study.{json,md}
(video: video_conversion_study.{json,md}, runs under runs/video_conversion_study).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from moedit.config import from_dict, load_config, load_yaml, to_dict
from moedit.diagnostics import record as rec
from moedit.diagnostics.report import tail
from moedit.objectives import build_objective
from moedit.runs import open_run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_routers import held_out  # noqa: E402  (same held-out protocol as the router comparison)
from study_results import write_results  # noqa: E402

GATES = ["linear", "mlp", "cross_attn"]
# domain -> (dense config, dense run, run root, results name)
DOMAINS = {"image": ("configs/dense_quickstart.yaml", "runs/dense_quickstart", "runs/conversion_study",
                     "conversion_study"),
           "video": ("configs/dense_video_quickstart.yaml", "runs/dense_video_quickstart",
                     "runs/video_conversion_study", "video_conversion_study")}


def moedit(*args: str) -> None:
    """Run one moedit command as a user would, failing loudly."""
    print("\n$ moedit " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "moedit.cli.main", *args], check=True, cwd=ROOT)


def trained(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted.key: value}."""
    out = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def stale_source(dense: Path, dense_config: str) -> str | None:
    """None when the dense run in `dense` (if any) was made by `dense_config` as it is now, else why not: a run
    left by an earlier version of the config would silently make every conversion a different study's."""
    if not (ROOT / dense / "config.yaml").is_file():
        return None
    want = flat(to_dict(load_config(ROOT / dense_config, [f"train.out_dir={dense}"])))
    have = flat(to_dict(from_dict(load_yaml(ROOT / dense / "config.yaml"))))
    changed = [f"{k}: run {have.get(k)!r}, config {want.get(k)!r}" for k in sorted(set(want) | set(have))
               if want.get(k) != have.get(k)]
    if not changed:
        return None
    return (f"{dense} was trained with a different config than {dense_config} is now ("
            + "; ".join(changed[:6]) + (f"; {len(changed) - 6} more" if len(changed) > 6 else "")
            + f"). Move it aside (mv {dense} {dense}_old) and rerun to train the study's source, or pass "
            f"--dense {dense} to convert it as it is.")


def evaluate(run_dir: Path, checkpoint: Path | None = None) -> dict:
    """Held-out loss (and eval routing, and the shared expert's output share) of the run's EMA weights at
    `checkpoint` (default: its latest)."""
    run = open_run(run_dir, checkpoint)
    model = run.load_model("ema")
    torch.manual_seed(0)
    with shared_output_share(model) as share:
        result = held_out(model, build_objective(run.cfg.objective), run.cfg)
    return {**result, **({"shared_share": share()} if model.moe_layers() else {})}


@contextlib.contextmanager
def shared_output_share(model):
    """While open, every MoE layer with a shared expert sums ‖shared(x)‖ and ‖layer output‖ over tokens; the
    yielded function gives, per layer, Σ‖shared‖ / Σ‖output‖ (None for a layer without a shared expert)."""
    layers = model.moe_layers()
    sums = [[0.0, 0.0] for _ in layers]
    undo = []
    for i, layer in enumerate(layers):
        if layer.shared is None:
            continue

        def shared_all(x_ND, _i=i, _forward=layer.shared.forward_all):
            out_ND = _forward(x_ND)
            sums[_i][0] += out_ND.detach().float().norm(dim=-1).sum().item()
            return out_ND

        def total(module, args, out_BLD, _i=i):
            sums[_i][1] += out_BLD.detach().float().norm(dim=-1).sum().item()

        layer.shared.forward_all = shared_all
        undo += [lambda _l=layer: delattr(_l.shared, "forward_all"), layer.register_forward_hook(total).remove]
    try:
        yield lambda: [float(f"{s / t:.3g}") if t else None for s, t in sums]
    finally:
        for fn in undo:
            fn()


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
            "train_wall_s": summary.get("train_wall_s"), **evaluate(out), **shared_at_conversion(out),
            "routing": routing_tail(out)}


def shared_at_conversion(run_dir: Path) -> dict:
    """The shared expert's output share in the converted model before fine-tuning (its step-0 checkpoint), so
    that the table shows how far fine-tuning grew it from Law 2's noise."""
    start = run_dir / "checkpoints" / "step_00000000"
    if not start.is_dir():
        return {}
    return {"shared_share_start": evaluate(run_dir, start).get("shared_share")}


def fmt_layers(values: list[float | None], spec: str = ".2f") -> str:
    return " / ".join("–" if v is None or v != v else format(v, spec) for v in values)


def shared_growth(run: dict) -> str:
    end = fmt_layers(run.get("shared_share") or [], ".2g")
    start = run.get("shared_share_start")
    return f"{fmt_layers(start, '.2g')} → {end}" if start else end


def markdown(result: dict) -> str:
    source = "dense video quickstart" if result.get("domain") == "video" else "dense quickstart"
    lines = [f"# Conversion study ({source} → token-choice MoE, three gates)", "",
             f"`{result['command']}` on {result['device']}."
             + (f" Overrides: {', '.join(result['overrides'])}." if result["overrides"] else ""), "",
             f"Dense source: {result['dense']['run']}, held-out loss {result['dense']['held_out_loss']:.4f}.", "",
             "| gate | verify max \\|Δ\\| | held-out loss | top-1 share per layer | score entropy per layer | "
             "expert cosine per layer (first probe → last quarter) | least-loaded expert's share | "
             "shared expert's output share (converted → fine-tuned) | events |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        g = r["routing"]
        kinds: dict[str, int] = {}
        for e in g["events"]:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        events = ", ".join(f"{k} ×{n}" for k, n in kinds.items()) or "none"
        first = fmt_layers(g["cosine_first_probe"]) if g["cosine_first_probe"] else "–"
        lines.append(f"| {r['gate']} | {r['verification']['max_abs']:.2g} | {r['held_out_loss']:.4f} | "
                     f"{fmt_layers(g['top1_share'])} | {fmt_layers(g['entropy'])} | {first} → "
                     f"{fmt_layers(g['cosine'])} | {fmt_layers(g['minority_share'])} | "
                     f"{shared_growth(r)} | {events} |")
    lines += ["", "Per-layer values are MoE layers in block order (blocks "
              f"{result['runs'][0]['routing']['blocks'] if result['runs'] else []}), "
              "averaged over the last quarter of the fine-tuning record. Full reports: RUN/diagnostics/report.md."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gates", nargs="*", default=GATES, choices=GATES)
    p.add_argument("--domain", default="image", choices=list(DOMAINS),
                   help="image: the MNIST quickstart; video: the Moving MNIST video quickstart")
    p.add_argument("--dense", help="dense run (trained here if missing); default by --domain")
    p.add_argument("--run-root", help="where the converted runs go; default by --domain")
    p.add_argument("--finetune-steps", type=int, help="override configs/study/convert_moe.yaml's train.steps")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra overrides given to every `moedit convert` (e.g. train.aux_weights.balance=0)")
    p.add_argument("--variant", default="", help="name of this variant: runs go to RUN_ROOT/<gate>_<variant>, "
                   "results to conversion_study_<variant>.{json,md}")
    p.add_argument("--out", help="results path without suffix; default studies/results/<domain's name>")
    args = p.parse_args()

    dense_config, dense_default, root_default, name = DOMAINS[args.domain]
    dense, run_root = Path(args.dense or dense_default), Path(args.run_root or root_default)
    args.out = args.out or str(ROOT / "studies" / "results" / name)
    if args.variant and not args.set:
        p.error("--variant names a change: give it with --set")
    problem = None if args.dense else stale_source(dense, dense_config)
    if problem:
        p.error(problem)
    if not trained(ROOT / dense):
        # --resume-or-start: an interrupted dense run continues from its last checkpoint
        moedit("train", "-c", dense_config, "--resume-or-start", "--set", f"train.out_dir={dense}")
    dense_eval = evaluate(ROOT / dense)
    result = {
        "command": "python studies/conversion_study.py " + " ".join(sys.argv[1:]),
        "device": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                  f"Python {platform.python_version()}",
        "domain": args.domain,
        "dense": {"run": str(dense), "held_out_loss": dense_eval["held_out_loss"],
                  "train_wall_s": json.loads((ROOT / dense / "summary.json").read_text()).get("train_wall_s")},
        "overrides": args.set,
        "runs": [run_gate(g, dense, run_root, args.finetune_steps, args.set, args.variant) for g in args.gates],
    }
    write_results(Path(args.out + (f"_{args.variant}" if args.variant else "")), result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

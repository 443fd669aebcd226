"""`moedit bench layer|model`: the speed benchmarks of moedit.bench (docs/PERFORMANCE.md); prints
a table and writes OUT.json + OUT.md. Benchmarks measure; tests never assert on their times."""

from __future__ import annotations

import json
from pathlib import Path

from moedit.utils.files import atomic_write_text

HELP = ("time one MoE layer (vs dense FFN and peer loops), whole training steps or sampling "
        "(dense vs MoE per router)")


def add_arguments(p) -> None:
    p.add_argument("what", choices=("layer", "model", "sample"),
                   help="layer: MoE layer fwd+bwd; model: training steps; sample: generation images/s")
    p.add_argument("--preset", help="layer: dit (D 1152, H 4608, T 8k/32k) or cpu (the quickstart's layer); "
                   "model/sample: gpu (DiT-XL/2, 256 tokens) or cpu (tiny). Default: by device")
    p.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="layer: parameter and input dtype (default bf16 on cuda)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median reported)")
    p.add_argument("--impl", nargs="+", help="layer: implementations to time (default all); model: variant name filters")
    p.add_argument("--routing", nargs="+", default=["random", "skewed"], choices=("random", "skewed"))
    p.add_argument("--out", help="output prefix (default benchmarks/results/<what>_<preset>)")


def run(args) -> int:
    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    on_gpu = device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("moedit bench: --device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if args.what == "layer":
        result, table = _layer(args, torch.device(device), on_gpu)
    else:
        from moedit.bench.model import run_model_bench, run_sample_bench
        from moedit.bench.report import model_markdown

        run_bench = run_model_bench if args.what == "model" else run_sample_bench
        result = run_bench(args.preset or ("gpu" if on_gpu else "cpu"), device, args.repeats, names=args.impl)
        table = model_markdown(result)
    out = Path(args.out or f"benchmarks/results/{args.what}_{result['meta']['preset']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), table)
    print(table)
    print(f"wrote {out}.json and {out}.md")
    from moedit.bench.report import failures

    if failed := failures(result):
        print(f"moedit bench: {len(failed)} measurement(s) failed (their rows say why):\n  " + "\n  ".join(failed))
        return 1
    return 0


def _layer(args, device, on_gpu: bool) -> tuple[dict, str]:
    import torch

    from moedit.bench.layer import IMPLEMENTATIONS, cpu_cases, dit_cases, run_case, runnable
    from moedit.bench.report import layer_markdown
    from moedit.bench.timing import describe_device

    preset = args.preset or ("dit" if on_gpu else "cpu")
    cases = {"dit": dit_cases, "cpu": cpu_cases}[preset]()
    dtype = torch.bfloat16 if (args.dtype or ("bf16" if on_gpu else "fp32")) == "bf16" else torch.float32
    names = tuple(args.impl) if args.impl else IMPLEMENTATIONS
    unknown = set(names) - set(IMPLEMENTATIONS)
    if unknown:
        raise SystemExit(f"moedit bench: unknown implementation(s) {sorted(unknown)}; choose from {', '.join(IMPLEMENTATIONS)}")
    kept, reason = runnable(names, device)
    if reason is not None and args.impl and kept != names:
        raise SystemExit(f"moedit bench: {', '.join(sorted(set(names) - set(kept)))} cannot run here: {reason}")
    if reason is not None and kept != names:
        print(f"leaving out {', '.join(n for n in names if n not in kept)}: {reason}")
    names = kept
    rows = []
    for case in cases:
        for routing in args.routing:
            rows += run_case(case, routing == "skewed", device, dtype, names, args.repeats)
            print(f"{case.name} {routing}: " + ", ".join(f"{r['impl']} " + ("failed" if r.get("failed") else f"{r['tflops']:.1f} TFLOP/s")
                                                         for r in rows[-len(names):]))
    meta = {**describe_device(device), "preset": preset, "dtype": str(dtype).removeprefix("torch."), "repeats": args.repeats}
    result = {"meta": meta, "rows": rows}
    return result, layer_markdown(result)

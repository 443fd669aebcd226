"""`moedit plan`: memory per rank, traffic and time lower bounds of every parallel layout for N GPUs,
by arithmetic alone (moedit.distributed.planner: no GPU, no process group, the model on the meta device)."""

from __future__ import annotations

import json

from moedit.config import apply_overrides, from_dict, load_config

HELP = ("plan a parallel run: parameters, optimizer state, activations and traffic per rank for ddp, fsdp "
        "and fsdp+ep on N GPUs, with communication and compute lower bounds on the step time")


def add_arguments(p) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", "-c", help="YAML run config, e.g. configs/quickstart.yaml")
    source.add_argument("--preset", help="a model preset with default train settings, e.g. DiT-MoE-XL/2-8E2A")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. --set train.batch_size=32 parallel.ep=4")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) of the run")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB, 141GB (default 80GiB)")
    p.add_argument("--bandwidth", type=float, default=400.0,
                   help="per-GPU bandwidth inside a node, GB/s (default 400, NVLink class)")
    p.add_argument("--inter-node-bandwidth", type=float, default=50.0,
                   help="per-GPU bandwidth between nodes, GB/s (default 50); used by collectives whose groups "
                   "span nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense bf16 TFLOP/s of one GPU (default 989: H100/H200)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")


def run(args) -> int:
    from moedit.distributed.planner import Hardware, parse_memory, plan

    hw = Hardware(gpus=args.gpus, gpu_memory=parse_memory(args.gpu_memory), bandwidth_gbs=args.bandwidth,
                  inter_node_bandwidth_gbs=args.inter_node_bandwidth, gpus_per_node=args.gpus_per_node,
                  peak_tflops=args.peak_tflops)
    if args.preset is not None:
        cfg = from_dict(apply_overrides({"model": {"preset": args.preset}}, args.set))
        label = args.preset
    else:
        cfg = load_config(args.config, args.set)
        label = args.config
    result = plan(cfg, hw)
    print(json.dumps({"source": label, **result.to_dict()}, indent=1) if args.json else render(result, label))
    return 0


# ----------------------------------------------------------------------------- the table

COLUMNS = ("layout", "ckpt", "dense/rank", "routed/rank", "state {m}", "work {m}", "act {m}", "total {m}", "fits",
           "a2a {t}", "fsdp/ddp {t}", "comm ms", "compute ms")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _ms(x: float) -> str:
    return f"{x:.2f}" if x >= 1 or x == 0 else f"{x:.3g}"


def _units(rows) -> tuple[tuple[str, float], tuple[str, float]]:
    """Memory in GiB (MiB when every total is under 1 GiB) and traffic in GB (MB when all under 1 GB)."""
    memory = ("GiB", 2 ** 30) if max(r.total_bytes for r in rows) >= 2 ** 30 else ("MiB", 2 ** 20)
    busiest = max(max(r.all_to_all_bytes, r.collective_bytes) for r in rows)
    traffic = ("GB", 1e9) if busiest >= 1e9 else ("MB", 1e6)
    return memory, traffic


def _cells(row, memory: float, traffic: float) -> list[str]:
    def mem(n: int) -> str:
        return f"{n / memory:.2f}"

    def moved(n: int) -> str:
        return f"{n / traffic:.2f}" if n else "-"

    return [row.layout + (" *" if row.configured else ""), row.checkpointing, _count(row.params_dense),
            _count(row.params_routed), mem(row.state_bytes), mem(row.working_set_bytes), mem(row.activation_bytes),
            mem(row.total_bytes), "yes" if row.fits else "NO", moved(row.all_to_all_bytes),
            moved(row.collective_bytes), _ms(row.comm_ms), _ms(row.compute_ms)]


def _table(rows) -> list[str]:
    (m, memory), (t, traffic) = _units(rows)
    cells = [[c.format(m=m, t=t) for c in COLUMNS]] + [_cells(r, memory, traffic) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c[i].ljust(widths[i]) if i < 2 else c[i].rjust(widths[i]) for i in range(len(COLUMNS)))
             for c in cells]
    return lines[:1] + ["-" * len(lines[0])] + lines[1:]


def _header(result, label: str) -> list[str]:
    m, hw = result.model, result.hardware
    moe = (f"{m['moe_layers']} MoE layers of {m['routed_experts']} routed experts, {m['experts_per_token']:g} per token"
           if m["moe_layers"] else "dense")
    node = f"{hw.nodes} node{'s' if hw.nodes > 1 else ''} of {hw.gpus_per_node}"
    return [f"{label}: {_count(m['total_params'])} parameters ({_count(m['activated_params'])} activated), "
            f"{m['blocks']} blocks, {moe}",
            f"per rank: micro-batch {result.batch_size} x {m['tokens_per_sample']} tokens = "
            f"{result.tokens_per_micro_batch:,} tokens, grad_accum {result.grad_accum}, compute "
            f"{'bf16' if result.compute_bytes == 2 else 'fp32'}",
            f"{hw.gpus} GPU{'s' if hw.gpus > 1 else ''} of {hw.gpu_memory / 2 ** 30:.0f} GiB ({node}), "
            f"{hw.bandwidth_gbs:g} GB/s intra-node, {hw.inter_node_bandwidth_gbs:g} GB/s inter-node, "
            f"{hw.peak_tflops:g} TFLOP/s", ""]


LEGEND = [
    "",
    "* = the config's parallel.data/ep/activation_checkpointing. Per rank: the fullest one (rank 0):",
    "dense/routed/rank: parameters held (padded FSDP shards); state: fp32 weights, grads, AdamW, EMA = 20 B",
    "  per parameter (ddp 24: + gradient buckets), exact; work: FSDP's gathered unit x2 (bf16) + its fp32 grads,",
    "  ddp: autocast's bf16 weight copies; act: estimated saved activations of one micro-batch; fits: total <=",
    "  GPU memory. a2a / fsdp/ddp GB: bytes sent per optimizer step; comm ms = bytes / bandwidth, compute ms =",
    "  6 x activated params x tokens / peak (full: 8, moe_only: + 2 x the MoE share, the recomputed forward):",
    "  lower bounds, not predictions (formulas: moedit/distributed/planner.py).",
]


def render(result, label: str) -> str:
    lines = _header(result, label) + _table(result.rows) + LEGEND
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)

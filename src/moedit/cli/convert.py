"""`moedit convert`: a dense DiT (moedit run or facebookresearch/DiT checkpoint) → a MoE run directory.

    moedit convert runs/dense --out runs/moe --set model.moe.num_experts=8 model.moe.router.normalize=true --verify

The work is `moedit.convert.workflow.convert_run` (docs/CONVERT.md); this file only parses arguments.
"""

from __future__ import annotations

from pathlib import Path

HELP = "convert a dense DiT (moedit run or facebookresearch/DiT checkpoint) into a MoE run directory"


def add_arguments(p) -> None:
    p.add_argument("source", help="dense moedit run dir, its checkpoints/step_N dir, or a facebookresearch/DiT "
                                  ".pt/.pth/.safetensors file")
    p.add_argument("--out", required=True, help="new run directory to write (never overwritten)")
    p.add_argument("--moe", metavar="FILE", help="YAML with the MoE settings under model.moe (other sections, e.g. "
                                                 "train or sample, override the output run config)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the output config, e.g. model.moe.num_experts=8 model.moe.router.top_k=1")
    p.add_argument("--raw", action="store_true", help="convert the raw weights instead of the EMA weights")
    p.add_argument("--shared-init", choices=("noise", "zero"), default="noise",
                   help="shared experts: tiny noise for training (default) or exactly zero")
    p.add_argument("--noise-std", type=float, default=1e-4, help="std of the shared experts' noise (default 1e-4)")
    p.add_argument("--zero-gates", action="store_true",
                   help="zero the gates' last layer (uniform scores): what an exact fine-grained split needs")
    p.add_argument("--seed", type=int, default=0, help="seed of the routers' random initialisation")
    p.add_argument("--learn-sigma", choices=("keep", "drop"), default="keep",
                   help="DiT checkpoints with 2·C outputs: keep the learned-sigma channels or drop them")
    p.add_argument("--heads", type=int, help="attention heads of a facebookresearch/DiT checkpoint "
                                             "(default: the DiT preset of its width)")
    p.add_argument("--verify", action="store_true", help="compare dense and MoE outputs (shared experts zeroed)")
    p.add_argument("--verify-batch", type=int, default=8, help="samples for --verify (half with the null label)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="--verify fails above tolerance·max(1, max|dense output|) when exactness is expected")


def run(args) -> int:
    from moedit.convert.workflow import ConvertRequest, convert_run

    convert_run(ConvertRequest(
        source=args.source, out=Path(args.out), moe_file=args.moe, overrides=args.set, raw=args.raw,
        shared_init=args.shared_init, noise_std=args.noise_std, zero_gates=args.zero_gates, seed=args.seed,
        learn_sigma=args.learn_sigma, heads=args.heads, verify=args.verify, verify_batch=args.verify_batch,
        tolerance=args.tolerance))
    return 0

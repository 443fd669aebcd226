"""`moedit import CHECKPOINT --out RUN`: a peer's released MoE-DiT checkpoint as a moedit run directory
(convert/peers.py; docs/CONVERT.md, "Importing peer checkpoints"). The work is `import_run`."""

from __future__ import annotations

HELP = ("import a peer's MoE-DiT checkpoint (DiT-MoE, ProMoE-TC/EC, DiffMoE, DSMoE) as a moedit run directory, "
        "weight for weight")


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="the peer's .pt/.pth/.safetensors file (a training checkpoint's EMA weights by default)")
    p.add_argument("--out", required=True, help="new run directory to write (never overwritten)")
    p.add_argument("--layout", default="auto",
                   help="auto (read off the key names), dit_moe, promoe_tc, promoe_ec (same keys as promoe_tc: "
                        "never auto-detected), diffmoe or dsmoe")
    p.add_argument("--objective", choices=("ddpm", "rectified_flow"),
                   help="what the checkpoint was trained with: decides the time convention and sampler "
                        "(default: DiT-MoE ddpm, ProMoE-TC rectified_flow, the only one it trains)")
    p.add_argument("--heads", type=int, help="attention heads (default: the DiT preset of the checkpoint's width)")
    p.add_argument("--top-k", type=int, help="experts per token, for ProMoE-EC on average (not stored in the weights; "
                                              "default DiT-MoE 2, ProMoE 1)")
    p.add_argument("--score", choices=("softmax", "sigmoid", "identity"),
                   help="router weights (not stored in the weights): ProMoE's router_weight_mode over the "
                        "cosine similarities (default identity, their configs'); DiT-MoE: softmax only")
    p.add_argument("--learn-sigma", choices=("keep", "drop"), default="keep",
                   help="checkpoints with 2·C outputs: keep the learned-sigma channels or drop them")
    p.add_argument("--image-size", type=int, help="latent side of a RoPE checkpoint (DSMoE), which has no position "
                                                   "table to read it off (default 32: ImageNet 256 in SD-VAE latents)")
    p.add_argument("--raw", action="store_true", help="import the raw weights of a training checkpoint instead of EMA")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the output run config, e.g. sample.cfg_scale=1.5")


def run(args) -> int:
    from moedit.convert.peers import import_run

    import_run(args.checkpoint, args.out, layout=args.layout, objective=args.objective, heads=args.heads,
               top_k=args.top_k, score=args.score, learn_sigma=args.learn_sigma, raw=args.raw, overrides=args.set,
               image_size=args.image_size)
    return 0

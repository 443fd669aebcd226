"""`moedit train`: train a (MoE) DiT from a YAML config with dotted overrides."""

from __future__ import annotations

import sys

import yaml

from moedit.config import ConfigError, load_config, to_dict

HELP = "train a model; writes RUN/config.yaml, metrics.jsonl, samples/*.png, checkpoints/"


def add_arguments(p) -> None:
    p.add_argument("--config", "-c", help="YAML run config, e.g. configs/quickstart.yaml")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. --set train.lr=3e-4 model.moe.router.top_k=1")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in train.out_dir from its latest checkpoint (an error if it has none)")
    p.add_argument("--resume-or-start", action="store_true",
                   help="continue train.out_dir's run if it has a checkpoint, else start a new run there")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the parallel layout (mesh, what is sharded where), then exit")
    p.add_argument("--world", type=int, default=None, metavar="N",
                   help="with --dry-run: the number of ranks to lay out (default: torchrun's WORLD_SIZE, else 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    cfg = load_config(args.config, args.set)
    if args.dry_run:
        import os

        from moedit.distributed.describe import describe_layout

        world = args.world if args.world is not None else int(os.environ.get("WORLD_SIZE", "1"))
        if world < 1:
            raise ConfigError(f"--world {world}: need at least 1 rank")
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one copy of the text
            sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            print(describe_layout(cfg, world))
        return 0
    from moedit.distributed.setup import shutdown
    from moedit.train.trainer import Trainer

    trainer = Trainer(cfg, resume=args.resume or args.resume_or_start, progress=not args.no_progress,
                      start_if_empty=args.resume_or_start)
    summary = trainer.train()  # writes RUN/summary.json; every rank waits for rank 0's last file
    if trainer.dist.is_main:
        print(f"done: {summary['steps']} steps in {summary['train_wall_s']:.0f} s "
              f"({summary['img_per_s']:.0f} img/s); samples: {summary['final_grid']}; run: {trainer.run_dir}")
    shutdown()  # after the barrier in train(): a clean end of the process group, no abort at exit
    return 0

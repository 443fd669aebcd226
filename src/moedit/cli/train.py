"""`moedit train`: train a (MoE) DiT from a YAML config with dotted overrides."""

from __future__ import annotations

import json
import sys

import yaml

from moedit.config import load_config, to_dict

HELP = "train a model; writes RUN/config.yaml, metrics.jsonl, samples/*.png, checkpoints/"


def add_arguments(p) -> None:
    p.add_argument("--config", "-c", help="YAML run config, e.g. configs/quickstart.yaml")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. --set train.lr=3e-4 model.moe.router.top_k=1")
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its latest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    cfg = load_config(args.config, args.set)
    if args.dry_run:
        sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from moedit.train.trainer import Trainer

    trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress)
    summary = trainer.train()
    if trainer.dist.is_main:
        (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"done: {summary['steps']} steps in {summary['train_wall_s']:.0f} s "
              f"({summary['img_per_s']:.0f} img/s); samples: {summary['final_grid']}; run: {trainer.run_dir}")
    return 0

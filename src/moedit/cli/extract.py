"""`moedit extract`: encode a dataset once into a latent store that `data.name=latents` trains from."""

from __future__ import annotations

HELP = ("encode a dataset with the config's codec into a sharded, memory-mapped latent store "
        "(resumable; under torchrun each rank writes its own shards)")


def add_arguments(p) -> None:
    p.add_argument("--config", "-c", help="a run config whose data and codec sections say what to encode with what "
                                          "(the training config itself works)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides, e.g. --set data.name=folder data.path=/data/imagenet data.image_size=256 "
                        "data.crop=adm codec.name=diffusers codec.path=/models/sd-vae-ft-ema")
    p.add_argument("--out", required=True, help="the store folder (created; an existing one of the same "
                                                "extraction is resumed)")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images (0 = none)")
    p.add_argument("--no-flip", action="store_true", help="do not store the horizontally flipped view")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="moments on disk")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from moedit.config import load_config
    from moedit.distributed.setup import shutdown
    from moedit.extract import ExtractSettings, extract

    cfg = load_config(args.config, args.set)
    settings = ExtractSettings(out=args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                               workers=args.workers, flip=not args.no_flip, dtype=args.dtype, device=args.device,
                               progress=not args.no_progress)
    summary = extract(cfg.data, cfg.codec, settings)
    now = (f"encoded {summary['encoded_now']} now in {summary['wall_s']:.1f} s ({summary['img_per_s']:.0f} img/s)"
           if summary["encoded_now"] else "every shard was already complete")
    print(f"done: {summary['count']} images in {summary['shards']} shards at {summary['store']}; {now}. Train on "
          f"it with --set data.name=latents data.path={summary['store']}")
    shutdown()
    return 0

"""`moedit extract`: encode a dataset once into a latent store (data/latent_store.py has the format).

    moedit extract -c CONFIG --out STORE [--set data.… codec.…]        one process
    torchrun --nproc_per_node=8 -m moedit.cli.main extract -c CONFIG --out STORE   one shard stream per rank

The config's `data` section names the images (mnist, fashion_mnist, npz, or a folder such as ImageNet's
train/ with data.crop=adm and data.image_size=256) and its `codec` section the encoder. Images are decoded
in DataLoader workers (`--workers`), so a folder is never loaded whole; each batch and its horizontal flip
are encoded on the device, and every shard is written and published on its own. Running the same command
again skips the complete shards (resume after a kill); the same store with another codec, source or layout
is refused, naming what differs. Rank 0 writes index.json once every rank's shards are complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moedit.codecs import build_codec
from moedit.config import CodecConfig, ConfigError, DataConfig, to_dict
from moedit.data import DatasetError, build_dataset
from moedit.data.latent_store import (DTYPES, FORMAT, read_header, shard_count, shard_done, shard_range,
                                      write_shard)
from moedit.data.lazy_folder import LazyImageFolder
from moedit.device import resolve_device
from moedit.distributed import setup as dist_setup
from moedit.utils.files import atomic_write_text, ensure_writable_dir
from moedit.utils.lock import DirLock, LockedError

# what must agree between a store's header and a run that continues it
SAME_FOR_RESUME = ("codec_identity", "source", "count", "shard_size", "flip", "dtype", "latent_shape")


@dataclass(kw_only=True)
class ExtractSettings:
    out: str
    shard_size: int = 4096
    batch_size: int = 64
    workers: int = 2
    flip: bool = True
    dtype: str = "float32"
    device: str = "auto"
    progress: bool = True

    def check(self) -> None:
        for key in ("shard_size", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')}={getattr(self, key)} must be at least 1")
        if self.workers < 0:
            raise ConfigError(f"--workers={self.workers} must be at least 0 (0 = decode in the main process)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype={self.dtype} is not valid; choose one of: {', '.join(DTYPES)}")


class _Images(torch.utils.data.Dataset):
    """An in-memory dataset as (uint8 C×H×W, label) items, like LazyImageFolder's."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset.images_NCHW[i], int(self.dataset.labels_N[i])


def open_source(data: DataConfig):
    """The images to encode: a folder lazily (decoded per item), everything else as loaded in memory."""
    if data.name == "latents":
        raise ConfigError("data.name=latents is already a latent store; extract from the images it came from")
    if data.name == "folder":
        return LazyImageFolder(data.path, data.split, data.image_size, data.crop)
    return _Images(build_dataset(data))


def _source_info(source) -> tuple[list[str], int, int]:
    inner = getattr(source, "dataset", source)
    return list(inner.class_names), int(inner.channels), int(inner.image_size)


def make_header(data: DataConfig, codec_cfg: CodecConfig, codec, source, s: ExtractSettings) -> dict:
    class_names, channels, size = _source_info(source)
    codec.check_pixels(channels, size)
    latent_c, latent_side = codec.latent_shape(channels, size)
    return {"format": FORMAT, "version": 1, "codec_identity": codec.identity(), "codec": {
                "name": codec_cfg.name, "path": codec_cfg.path, "scale": codec.scale, "shift": codec.shift,
                "describe": codec.describe()},
            "source": to_dict(data), "count": len(source), "shard_size": s.shard_size, "flip": s.flip,
            "dtype": s.dtype, "latent_shape": [latent_c, latent_side, latent_side],
            "pixel_shape": [channels, size, size], "class_names": class_names}


def _agree_on_header(store: Path, header: dict, is_main: bool) -> None:
    """Rank 0 writes store.json, or checks the one there: a resumed store must be the same extraction."""
    if is_main and (store / "store.json").is_file():
        before = read_header(store)
        differ = [k for k in SAME_FOR_RESUME if before.get(k) != header[k]]
        if differ:
            raise DatasetError(f"{store} already holds latents of another extraction ({', '.join(differ)} differ: "
                               + "; ".join(f"{k} {before.get(k)!r} there, {header[k]!r} now" for k in differ[:2])
                               + "); choose a new --out, or repeat the original command to resume it")
    elif is_main:
        atomic_write_text(store / "store.json", json.dumps(header, indent=1))


@torch.no_grad()
def encode_views(codec, x_BCHW: torch.Tensor, flip: bool) -> torch.Tensor:
    """(B, F, 2, C, h, w): the moments of each image and, with flip, of its mirror image."""
    views = [x_BCHW, torch.flip(x_BCHW, dims=[-1])] if flip else [x_BCHW]
    return torch.stack([torch.stack(codec.moments(v), dim=1) for v in views], dim=1)


def _encode_shard(codec, source, header: dict, k: int, s: ExtractSettings, device, bar) -> None:
    start, stop = shard_range(header, k)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(source, range(start, stop)),
                                         batch_size=s.batch_size, num_workers=s.workers, shuffle=False)
    moments, labels = [], []
    for u_BCHW, y_B in loader:
        x_BCHW = u_BCHW.to(device, torch.float32) / 127.5 - 1.0
        moments.append(encode_views(codec, x_BCHW, s.flip).cpu().numpy().astype(s.dtype))
        labels.append(y_B.numpy().astype(np.int64))
        bar.update(len(y_B))
    write_shard(Path(s.out), k, np.concatenate(moments), np.concatenate(labels))


def extract(data: DataConfig, codec_cfg: CodecConfig, s: ExtractSettings) -> dict:
    s.check()
    device = resolve_device(s.device)
    info = dist_setup.init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    store = Path(s.out).expanduser()
    lock = DirLock(store, "moedit extract", log=tqdm.write)
    if info.is_main:
        ensure_writable_dir(store, "--out")
        try:
            lock.acquire()
        except LockedError as exc:
            raise DatasetError(str(exc)) from None
    try:
        return _extract(data, codec_cfg, s, store, device, info)
    finally:
        lock.release()


def _extract(data, codec_cfg, s, store, device, info) -> dict:
    source = open_source(data)
    codec = build_codec(codec_cfg).to(device)
    header = make_header(data, codec_cfg, codec, source, s)
    if codec.name == "identity":
        raise ConfigError("codec.name=identity has no latents to extract; set codec.name=autoencoder or diffusers")
    _agree_on_header(store, header, info.is_main)
    dist_setup.barrier()
    todo = [k for k in range(info.rank, shard_count(header), info.world)
            if not shard_done(store, k, len(range(*shard_range(header, k))))]
    images = sum(len(range(*shard_range(header, k))) for k in todo)
    bar = tqdm(total=images, desc=f"extract rank {info.rank}" if info.enabled else "extract", unit="img",
               disable=not (s.progress and info.is_main), dynamic_ncols=True)
    t0 = time.perf_counter()
    for k in todo:
        _encode_shard(codec, source, header, k, s, device, bar)
    bar.close()
    wall = time.perf_counter() - t0
    done = dist_setup.gather_to_main({"images": images, "wall_s": wall})
    dist_setup.barrier()
    summary = {"store": str(store), "count": header["count"], "shards": shard_count(header),
               "encoded_now": sum(d["images"] for d in done), "wall_s": max(d["wall_s"] for d in done)}
    summary["img_per_s"] = summary["encoded_now"] / summary["wall_s"] if summary["wall_s"] > 0 else None
    if info.is_main:
        missing = [k for k in range(shard_count(header)) if not shard_done(store, k, len(range(*shard_range(header, k))))]
        if missing:
            raise DatasetError(f"{len(missing)} shards of {store} are still missing (first {missing[:3]}); run the "
                               "same command again to finish them")
        if summary["encoded_now"] or not (store / "index.json").is_file():  # a no-op rerun keeps the first's figures
            atomic_write_text(store / "index.json", json.dumps({**header, "complete": True, **summary}, indent=1))
    return summary

"""Loading and extraction throughput on real image files (docs/LATENT.md, "Measured").

    PYTHONPATH=src python studies/data_throughput.py

Writes Fashion-MNIST's 10,000 test images as PNG and as JPEG (quality 95) class folders under
runs/throughput/, then measures on this machine, each figure the best of 3 passes:
- in memory: `load_folder` reading the whole folder, then training batches of 64 from memory;
- lazy: `LazyImageFolder` opened with no scan cache and with it, then training batches of 64 through
  train/batches.py's BatchStream with 0, 1 and 2 DataLoader workers (the training step's own reading);
- extraction: `moedit extract` of the PNG folder with the shipped Fashion-MNIST autoencoder, 0/1/2 workers
  (one pass each);
- indexing at ImageNet's scale: 1,000 class folders × 1,281 files (1,281,000 hard links
  to 32 JPEGs, so the folder costs directory entries only), opened by `LazyImageFolder` with no scan cache and with it.
Writes studies/results/data_throughput.{json,md}.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from moedit.config import CodecConfig, DataConfig
from moedit.data import build_dataset
from moedit.data.folder import load_folder
from moedit.data.lazy_folder import LazyImageFolder
from moedit.extract import ExtractSettings, extract
from moedit.train.batches import BatchStream

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "throughput"
BATCH, BATCHES, PASSES = 64, 40, 3


def write_folders() -> dict[str, Path]:
    data = build_dataset(DataConfig(name="fashion_mnist", split="test"))
    folders = {}
    for fmt, ext, kw in (("png", "png", {}), ("jpeg", "JPEG", {"quality": 95})):
        root = OUT / fmt
        if not (root / ".complete").is_file():
            shutil.rmtree(root, ignore_errors=True)
            for i in range(len(data)):
                folder = root / data.class_names[int(data.labels_N[i])].replace("/", "-")
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(data.images_NCHW[i, 0].numpy()).save(folder / f"{i:05d}.{ext}", **kw)
            (root / ".complete").write_text("")
        folders[fmt] = root
    return folders


def best(fn) -> float:
    """Seconds of the fastest of PASSES calls."""
    times = []
    for _ in range(PASSES):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def batches_per_s(dataset, workers: int) -> float:
    def read():
        stream = BatchStream(dataset, BATCH, seed=0, workers=workers)
        for step in range(BATCHES):
            stream.get(step)
        stream.close()
    return BATCH * BATCHES / best(read)


def measure(root: Path) -> dict:
    cache = OUT / "cache"
    os.environ["MOEDIT_CACHE"] = str(cache)
    out = {"images": sum(1 for _ in root.rglob("*.*") if _.name != ".complete")}
    out["in_memory_load_s"] = round(best(lambda: load_folder(root)), 2)
    memory = load_folder(root)
    out["in_memory_batches_img_per_s"] = round(batches_per_s(memory, 0))

    def fresh_scan():
        shutil.rmtree(cache, ignore_errors=True)
        LazyImageFolder(root)
    out["lazy_first_open_s"] = round(best(fresh_scan), 3)
    out["lazy_cached_open_s"] = round(best(lambda: LazyImageFolder(root)), 3)
    lazy = LazyImageFolder(root)
    out["lazy_batches_img_per_s"] = {w: round(batches_per_s(lazy, w)) for w in (0, 1, 2)}
    return out


def extraction(root: Path) -> dict:
    rates = {}
    for workers in (0, 1, 2):
        def run():
            store = OUT / "store"
            shutil.rmtree(store, ignore_errors=True)
            extract(DataConfig(name="folder", path=str(root)), CodecConfig(name="autoencoder", path="moedit:fashion_mnist"),
                    ExtractSettings(out=str(store), workers=workers, batch_size=256, progress=False, device="cpu"))
        t0 = time.perf_counter()  # one pass each: an extraction of 10,000 images is long enough to time
        run()
        rates[workers] = round(10_000 / (time.perf_counter() - t0))
    return rates


def imagenet_scale_index(classes: int = 1000, per_class: int = 1281) -> dict:
    root = OUT / "imagenet_like" / "train"
    if not (root.parent / ".complete").is_file():
        shutil.rmtree(root.parent, ignore_errors=True)
        root.mkdir(parents=True)
        sources = []  # ext4 allows 65,000 links to one file: spread them over 32 files
        for k in range(32):
            sources.append(root.parent / f"source_{k}.JPEG")
            Image.new("RGB", (64, 48), (120 + k, 80, 40)).save(sources[-1], quality=90)
        for c in range(classes):
            folder = root / f"n{c:08d}"
            folder.mkdir()
            for i in range(per_class):
                os.link(sources[(c * per_class + i) % len(sources)], folder / f"n{c:08d}_{i}.JPEG")
        (root.parent / ".complete").write_text("")
    cache = OUT / "cache_imagenet"
    os.environ["MOEDIT_CACHE"] = str(cache)
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    first = LazyImageFolder(root.parent, image_size=32)
    first_s = time.perf_counter() - t0
    cached_s = best(lambda: LazyImageFolder(root.parent, image_size=32))
    return {"files": len(first), "classes": first.num_classes, "first_open_s": round(first_s, 2),
            "cached_open_s": round(cached_s, 2)}


def main() -> int:
    torch.set_num_threads(1)  # the DataLoader workers take the other core
    folders = write_folders()
    results = {fmt: measure(root) for fmt, root in folders.items()}
    results["extract_png_img_per_s"] = extraction(folders["png"])
    results["imagenet_scale_index"] = imagenet_scale_index()
    results.update(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                   cpus=os.cpu_count(), threads=1, batch=BATCH, batches=BATCHES,
                   command="python studies/data_throughput.py")
    (ROOT / "studies" / "results" / "data_throughput.json").write_text(json.dumps(results, indent=1))
    (ROOT / "studies" / "results" / "data_throughput.md").write_text(report(results))
    print(report(results))
    return 0


def report(r: dict) -> str:
    lines = [f"Data throughput on {r['cpus']} CPUs ({r['machine']}), torch {r['torch']}, 1 intra-op thread, batches "
             f"of {r['batch']} ({r['batches']} per pass, best of {PASSES}); Fashion-MNIST's 10,000 test images as "
             "28×28 grey files.", "",
             "| files | in memory: load all | in memory: img/s | lazy: first open | lazy: cached open | lazy img/s, "
             "0 workers | 1 worker | 2 workers |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for fmt in ("png", "jpeg"):
        m = r[fmt]
        w = m["lazy_batches_img_per_s"]
        lines.append(f"| {fmt} | {m['in_memory_load_s']} s | {m['in_memory_batches_img_per_s']:,} | "
                     f"{m['lazy_first_open_s']} s | {m['lazy_cached_open_s']} s | {w[0]:,} | {w[1]:,} | {w[2]:,} |")
    e = r["extract_png_img_per_s"]
    lines += ["", f"`moedit extract` of the PNG folder (moedit:fashion_mnist, batch 256, both views): {e[0]:,} img/s "
              f"with 0 workers, {e[1]:,} with 1, {e[2]:,} with 2."]
    i = r["imagenet_scale_index"]
    lines += ["", f"Indexing an ImageNet-sized folder ({i['files']:,} files in {i['classes']:,} class folders, hard "
              f"links): {i['first_open_s']} s for the first scan, {i['cached_open_s']} s from the cached scan.", "",
              f"Command: `{r['command']}`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

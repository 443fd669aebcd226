"""What each evaluation metric reads for real images: the floor and the ceiling that moedit's sample
scores sit between (docs/EVAL_SANITY.md).

    PYTHONPATH=src python studies/metric_sanity.py               # both datasets, N = 300, 1000, 10000

For each dataset (its own LeNet classifier, its test split as the reference, exactly as `moedit eval`
scores samples: moedit.eval.score_images) and each N, four sets of N images stand in for samples:
- train split: N train images drawn with the seed, with their true labels (the floor: a perfect model);
- other dataset: N test images of the other dataset (MNIST for Fashion-MNIST and back), labels i mod 10;
- uniform noise: N images of independent uniform uint8 pixels, labels i mod 10;
- test split itself, N = 10000 only: the identical set (FD, KID ≈ 0; P/R = 1).
Writes studies/results/metric_sanity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from moedit.config import DataConfig
from moedit.data import build_dataset
from moedit.eval import score_images

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("mnist", "fashion_mnist")


def candidate_sets(dataset: str, n: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    train = build_dataset(DataConfig(name=dataset, split="train"))
    pick = torch.randperm(len(train), generator=gen)[:n]
    other = build_dataset(DataConfig(name=DATASETS[1 - DATASETS.index(dataset)], split="test"))
    cycle_N = torch.arange(n) % 10
    sets = {"train split": (train.images_NCHW[pick], train.labels_N[pick]),
            "other dataset": (other.images_NCHW[torch.randperm(len(other), generator=gen)[:n]], cycle_N),
            "uniform noise": (torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen), cycle_N)}
    if n == 10000:
        test = build_dataset(DataConfig(name=dataset, split="test"))
        sets["test split itself"] = (test.images_NCHW, test.labels_N)
    return sets


def row(dataset: str, name: str, n: int, m: dict) -> dict:
    pr = m["precision_recall_lenet"]
    return {"dataset": dataset, "set": name, "n": n, "fd_lenet": m["fd_lenet"], "kid": m["kid_lenet"]["mean"],
            "kid_std": m["kid_lenet"]["std"], "precision": pr["precision"], "recall": pr["recall"],
            "accuracy": m["class_accuracy"]}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"`{meta['command']}` on {meta['device']}, torch {meta['torch']}; reference: the dataset's test split "
             "(10,000 images); KID over 100 subsets of min(1000, N); P/R with k = 3 against N test images.", ""]
    for dataset in DATASETS:
        lines += [f"### {dataset}", "", "| images scored | N | FD-LeNet | KID | precision | recall | class acc. |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["dataset"] == dataset):
            lines.append(f"| {r['set']} | {r['n']:,} | {r['fd_lenet']:.2f} | {r['kid']:.3f} ± {r['kid_std']:.3f} | "
                         f"{r['precision']:.3f} | {r['recall']:.3f} | {r['accuracy']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[300, 1000, 10000])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "studies" / "results" / "metric_sanity"))
    args = p.parse_args()
    t0, rows = time.perf_counter(), []
    for dataset in DATASETS:
        reference = DataConfig(name=dataset, split="test")
        for n in args.n:
            for name, (images, labels) in candidate_sets(dataset, n, args.seed).items():
                rows.append(row(dataset, name, n, score_images(images, labels, reference, seed=args.seed)))
                print(rows[-1])
    meta = {"device": f"{platform.machine()} CPU", "torch": torch.__version__, "python": platform.python_version(),
            "seconds": round(time.perf_counter() - t0, 1),
            "command": "PYTHONPATH=src python studies/metric_sanity.py" + (f" --n {' '.join(map(str, args.n))}"
                                                                             if args.n != [300, 1000, 10000] else "")}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()

"""Train the autoencoders moedit ships (`codec.path: moedit:mnist`, `moedit:fashion_mnist`; docs/LATENT.md).

    python scripts/train_autoencoder.py --dataset mnist
    python scripts/train_autoencoder.py --dataset fashion_mnist

Runs `moedit autoencoder train -c configs/autoencoder/<dataset>.yaml` into runs/autoencoder_<dataset>
(or --run), which trains, exports the EMA weights with the latent shift / scale measured on the training
split, and measures the reconstructions of the whole test split (PSNR, FD-LeNet, the shipped LeNet's
accuracy on originals and reconstructions). Then copies the two exported files into the package,
`src/moedit/codecs/weights/autoencoder_<dataset>.{safetensors,json}`, adding to the record the command,
the wall time and the versions. The test split is read once, after training: nothing was tuned on it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from moedit.cli.main import main as moedit
from moedit.codecs.autoencoder import RECORD_NAME, SHIPPED, WEIGHTS_NAME, read_record, shipped_dir
from moedit.utils.files import atomic_write_text, file_sha256

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=SHIPPED)
    p.add_argument("--run", type=Path, default=None, help="run folder (default runs/autoencoder_<dataset>)")
    p.add_argument("--out", type=Path, default=shipped_dir(), help="where the shipped files go")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the config's, 1)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    run = args.run or ROOT / "runs" / f"autoencoder_{args.dataset}"
    config = ROOT / "configs" / "autoencoder" / f"{args.dataset}.yaml"
    cli = ["autoencoder", "train", "-c", str(config), "--set", f"train.out_dir={run}"]
    cli += [f"train.threads={args.threads}"] if args.threads else []
    cli += ["--resume"] * args.resume + ["--no-progress"] * args.no_progress
    t0 = time.perf_counter()
    if moedit(cli) != 0:
        return 1
    record = read_record(run / RECORD_NAME)
    summary = json.loads((run / "summary.json").read_text())
    record.update(command=" ".join(["python", "scripts/train_autoencoder.py", *map(shlex.quote, sys.argv[1:])]),
                  moedit_command="moedit " + " ".join(map(shlex.quote, cli)),
                  train_seconds=round(summary["train_wall_s"], 1), script_seconds=round(time.perf_counter() - t0, 1),
                  torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
                  cpu=platform.processor() or platform.machine())
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / f"autoencoder_{args.dataset}.safetensors"
    shutil.copyfile(run / WEIGHTS_NAME, weights)
    assert file_sha256(weights) == record["weights_sha256"]
    atomic_write_text(args.out / f"autoencoder_{args.dataset}.json", json.dumps(record, indent=1))
    quality = record["reconstruction"]
    print(f"shipped {weights} ({weights.stat().st_size / 1e6:.2f} MB): PSNR {quality['psnr_db']} dB, FD-LeNet "
          f"{quality.get('fd_lenet')}, LeNet accuracy {quality.get('accuracy_reconstructed')} vs "
          f"{quality.get('accuracy_original')} on the originals")
    return 0


if __name__ == "__main__":
    sys.exit(main())

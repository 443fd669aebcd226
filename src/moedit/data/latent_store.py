"""A latent store: a dataset's images encoded once by a codec (`moedit extract`), read memory-mapped.

    STORE/store.json              the header: codec (name, signature, scale, shift), source data, count N,
                                  shard size S, flip, dtype, latent shape (C, h, w), class names
    STORE/shards/00042.moments.npy  (n, F, 2, C, h, w): per image, per view f (0 = the image, 1 = its
                                  horizontal flip, when flip), the posterior mean and log-variance, unscaled
    STORE/shards/00042.labels.npy   (n,) int64
    STORE/shards/00042.json       written last, once the two arrays are on disk: the shard is complete
    STORE/index.json              written when every shard is: the store is complete and readable

Shard k holds images [k·S, min((k+1)·S, N)) of the source, in the source's order. Each is written under a
temporary name and renamed, so a kill leaves complete shards and no partial ones; `moedit extract` run
again on the same folder skips them (resume). Under torchrun rank r writes shards r, r + W, r + 2W, ...

Reading (`LatentDataset`): the arrays are memory-mapped (np.load mmap_mode="r"), so only the rows a batch
asks for are read. A training sample is z = scale · (μ + σ·ε − shift) from the moments of a view picked at
random (posterior `sample`, as DiT's train.py draws from SD-VAE), or scale · (μ − shift) (`mean`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from moedit.data.base import DatasetError
from moedit.utils.files import atomic_write_text

FORMAT = "moedit-latents"
DTYPES = ("float32", "float16")


def shard_paths(store: Path, k: int) -> tuple[Path, Path, Path]:
    base = store / "shards" / f"{k:05d}"
    return base.with_suffix(".moments.npy"), base.with_suffix(".labels.npy"), base.with_suffix(".json")


def shard_count(header: dict) -> int:
    return -(-header["count"] // header["shard_size"])


def shard_range(header: dict, k: int) -> tuple[int, int]:
    start = k * header["shard_size"]
    return start, min(start + header["shard_size"], header["count"])


def write_shard(store: Path, k: int, moments: np.ndarray, labels: np.ndarray) -> None:
    """The two arrays under temporary names, renamed into place, then the marker that completes the shard."""
    moments_path, labels_path, marker = shard_paths(store, k)
    moments_path.parent.mkdir(parents=True, exist_ok=True)
    for path, array in ((moments_path, moments), (labels_path, labels)):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(array))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    atomic_write_text(marker, json.dumps({"shard": k, "count": int(len(labels)),
                                          "bytes": {p.name: p.stat().st_size for p in (moments_path, labels_path)}}))


def shard_done(store: Path, k: int, expected: int) -> bool:
    moments_path, labels_path, marker = shard_paths(store, k)
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("count") == expected and all(
        p.is_file() and p.stat().st_size == info["bytes"].get(p.name) for p in (moments_path, labels_path))


def read_header(store: Path) -> dict:
    path = store / "store.json"
    if not store.is_dir():
        raise DatasetError(f"latent store {store} does not exist; write one with `moedit extract --out {store}`")
    try:
        header = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{store} has no store.json: not a latent store written by `moedit extract`") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path} cannot be read: {exc}; the store is damaged, extract it again") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a moedit latent store header (no \"format\": \"{FORMAT}\")")
    return header


class LatentDataset:
    """A complete latent store as a dataset: `len`, `channels` and `image_size` (the latent's), labels,
    class names, and `batch(indices)` → (z_BCHW in the model's space, y_B)."""

    is_latent = True

    def __init__(self, store: str | Path, scale: float, shift: float, posterior: str = "sample",
                 flip: bool = True):
        self.store = Path(store).expanduser()
        self.header = read_header(self.store)
        if not (self.store / "index.json").is_file():
            missing = [k for k in range(shard_count(self.header))
                       if not shard_done(self.store, k, len(range(*shard_range(self.header, k))))]
            raise DatasetError(f"latent store {self.store} is incomplete: {len(missing)} of "
                               f"{shard_count(self.header)} shards missing (first: {missing[:3]}); run the same "
                               "`moedit extract` again to finish it (it resumes)")
        self.scale, self.shift, self.posterior = float(scale), float(shift), posterior
        self.use_flip = flip and self.header["flip"]
        self._moments, labels = [], []
        for k in range(shard_count(self.header)):
            moments, shard_labels = self._open_shard(k)
            self._moments.append(moments)
            labels.append(shard_labels)
        self.labels_N = torch.from_numpy(np.concatenate(labels).astype(np.int64))
        self.class_names = list(self.header["class_names"])
        self.num_classes = len(self.class_names)
        self.channels, self.image_size = int(self.header["latent_shape"][0]), int(self.header["latent_shape"][1])
        self.name = f"latents:{self.store}"

    def _open_shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        moments_path, labels_path, _ = shard_paths(self.store, k)
        start, stop = shard_range(self.header, k)
        c, h, w = self.header["latent_shape"]
        views = 2 if self.header["flip"] else 1
        try:
            moments = np.load(moments_path, mmap_mode="r", allow_pickle=False)
            shard_labels = np.load(labels_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"latent shard {moments_path.parent / f'{k:05d}'} cannot be read ({exc}); delete its "
                               "three files and run `moedit extract` again: it re-encodes that shard only") from exc
        if moments.shape != (stop - start, views, 2, c, h, w) or shard_labels.shape != (stop - start,):
            raise DatasetError(f"latent shard {moments_path} has shape {moments.shape}, expected "
                               f"{(stop - start, views, 2, c, h, w)}; delete its files and run `moedit extract` again")
        return moments, shard_labels

    def __len__(self) -> int:
        return int(self.header["count"])

    def moments(self, indices) -> torch.Tensor:
        """(B, F, 2, C, h, w) float32 for global indices, read from the memory maps."""
        idx = np.asarray(indices, dtype=np.int64)
        shard, row = np.divmod(idx, self.header["shard_size"])
        out = np.empty((len(idx), *self._moments[0].shape[1:]), dtype=np.float32)
        for k in np.unique(shard):
            pick = shard == k
            out[pick] = self._moments[k][np.sort(row[pick])][np.argsort(np.argsort(row[pick]))]
        if not np.isfinite(out).all():
            bad = int(shard[~np.isfinite(out.reshape(len(idx), -1)).all(1)][0])
            raise DatasetError(f"latent shard {bad:05d} of {self.store} holds NaN or inf; delete "
                               f"{self.store / 'shards' / f'{bad:05d}'}.* and run `moedit extract` again")
        return torch.from_numpy(out)

    def item(self, i: int) -> tuple[torch.Tensor, int]:
        """One image's stored moments (F, 2, C, h, w) and label: what a DataLoader worker reads."""
        return self.moments([int(i)])[0], int(self.labels_N[int(i)])

    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        """In the main process, from the checkpointed RNG: a view per image, then z = scale·(μ + σ·ε − shift)."""
        m_BF2CHW = torch.stack([m for m, _ in items])
        B = m_BF2CHW.shape[0]
        view_B = torch.randint(0, 2, (B,)) if self.use_flip else torch.zeros(B, dtype=torch.long)
        mean_BCHW, logvar_BCHW = m_BF2CHW[torch.arange(B), view_B].unbind(1)
        z_BCHW = mean_BCHW
        if self.posterior == "sample":
            z_BCHW = mean_BCHW + torch.exp(0.5 * logvar_BCHW) * torch.randn(mean_BCHW.shape)
        return (z_BCHW - self.shift) * self.scale, torch.tensor([y for _, y in items], dtype=torch.long)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        m_BF2CHW = self.moments(indices)  # one gather per shard, not one read per image
        labels_B = self.labels_N[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
        return self.collate(list(zip(m_BF2CHW, labels_B.tolist())))

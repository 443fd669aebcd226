"""The peers' pre-extracted latents, built here with their file names, keys and shapes (data/peer_latents.py):
fast-DiT's features/labels .npy pairs, ProMoE's <image>.latent.npz and MAR's <image>.npz moments. Each is
read with its scale convention; a damaged file or a wrong setting is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moedit.codecs.autoencoder import export_autoencoder
from moedit.codecs.autoencoder_net import AutoencoderSpec, KLAutoencoder
from moedit.config import DataConfig, from_dict
from moedit.data import DatasetError, latent_format, open_latents
from moedit.data.peer_latents import detect_format
from moedit.train.trainer import Trainer, TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ("n01440764", "n01443537")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEDIT_CACHE", str(tmp_path / "cache"))


def _fast_dit(root, n=12):
    (root / "imagenet256_features").mkdir(parents=True)
    (root / "imagenet256_labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):  # names sort as text: 0, 1, 10, 11, 2, ...
        np.save(root / "imagenet256_features" / f"{i}.npy", rng.standard_normal((1, 4, 4, 4)).astype(np.float32) + i)
        np.save(root / "imagenet256_labels" / f"{i}.npy", np.array([i % 3]))
    return root


def _per_image(root, fmt, per_class=3):
    keys = {"promoe": ("latent", "latent_flip"), "mar": ("moments", "moments_flip")}[fmt]
    suffix = {"promoe": ".JPEG.latent.npz", "mar": ".JPEG.npz"}[fmt]
    rng = np.random.default_rng(1)
    for c, wnid in enumerate(CLASSES):
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            params = {k: rng.standard_normal((8, 4, 4)).astype(np.float32) for k in keys}  # mean ‖ logvar, 4 ch
            np.savez(root / wnid / f"{wnid}_{i}{suffix}", **params)
            if fmt == "promoe":
                (root / wnid / f"{wnid}_{i}.JPEG").write_bytes(b"the image sits beside its latent")
    return root, keys, suffix


def test_fast_dit_latents_are_used_as_stored_and_paired_by_name(tmp_path):
    root = _fast_dit(tmp_path / "features")
    assert detect_format(root) == "fast_dit"
    data = open_latents(DataConfig(name="latents", path=str(root)), scale=0.18215, shift=0.0)
    assert len(data) == 12 and (data.channels, data.image_size, data.num_classes) == (4, 4, 3)
    z, y = data.batch([2, 4])  # sorted names: index 2 is 10.npy, index 4 is 2.npy
    torch.testing.assert_close(z[0], torch.from_numpy(np.load(root / "imagenet256_features" / "10.npy")[0]))
    assert y.tolist() == [10 % 3, 2 % 3]
    caches = list((tmp_path / "cache" / "folder_scans").glob("fast_dit_*.json"))
    assert caches  # the first open cached its index
    for cache in caches:
        cache.write_text("{damaged")  # a cut cache file is rescanned, not a traceback
    assert len(open_latents(DataConfig(name="latents", path=str(root)), scale=0.18215, shift=0.0)) == 12
    with pytest.raises(DatasetError, match="multiplied by 0.18215.*codec.scale=0.18215"):
        open_latents(DataConfig(name="latents", path=str(root)), scale=0.5, shift=0.0)
    (root / "imagenet256_labels" / "11.npy").unlink()
    with pytest.raises(DatasetError, match="same <i>.npy names"):
        open_latents(DataConfig(name="latents", path=str(root), latent_format="fast_dit"), 0.18215, 0.0)


@pytest.mark.parametrize("fmt", ["promoe", "mar"])
def test_per_image_moments_give_a_scaled_sample_of_a_random_view(tmp_path, fmt):
    root, keys, suffix = _per_image(tmp_path / fmt, fmt)
    cfg = DataConfig(name="latents", path=str(root))
    assert latent_format(cfg) == fmt
    data = open_latents(cfg, scale=0.5, shift=0.1, posterior="mean")
    assert len(data) == 6 and data.class_names == list(CLASSES) and (data.channels, data.image_size) == (4, 4)
    z, y = data.batch([4, 1])
    assert y.tolist() == [1, 0]
    stored = np.load(root / CLASSES[1] / f"{CLASSES[1]}_1{suffix}")
    means = [(torch.from_numpy(stored[k][:4]) - 0.1) * 0.5 for k in keys]
    assert any(torch.allclose(z[0], m) for m in means)
    torch.manual_seed(0)
    views = {tuple(open_latents(cfg, 0.5, 0.1, "mean").batch([4])[0].flatten()[:3].tolist()) for _ in range(20)}
    assert len(views) == 2  # both the image and its flip are drawn
    sampled, _ = open_latents(cfg, 0.5, 0.1, "sample").batch([4])
    assert not any(torch.allclose(sampled[0], m) for m in means)  # μ + σ·ε, not μ


def test_damaged_files_and_unknown_folders_are_clear_errors(tmp_path):
    root, keys, suffix = _per_image(tmp_path / "mar", "mar")
    np.savez(root / CLASSES[0] / f"{CLASSES[0]}_1{suffix}", wrong_key=np.zeros((8, 4, 4), np.float32))
    data = open_latents(DataConfig(name="latents", path=str(root), latent_format="mar"), 1.0, 0.0)
    with pytest.raises(DatasetError, match=f"{CLASSES[0]}_1{suffix}.*should hold moments"):
        data.batch([1])
    (root / CLASSES[1] / f"{CLASSES[1]}_0{suffix}").write_bytes(b"PK not really")
    with pytest.raises(DatasetError, match=f"cannot read latent file .*{CLASSES[1]}_0"):
        data.batch([3])
    (tmp_path / "plain" / "a").mkdir(parents=True)
    (tmp_path / "plain" / "a" / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="not a latents folder.*data.latent_format"):
        detect_format(tmp_path / "plain")


def test_training_from_a_peer_folder_needs_its_vae(tmp_path):
    root, _, _ = _per_image(tmp_path / "mar", "mar", per_class=4)
    cfg = {"model": {"preset": "micro", "image_size": 4, "in_channels": 4, "patch_size": 2, "num_classes": 2},
           "data": {"name": "latents", "path": str(root)},
           "train": {"out_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 4, "ckpt_every": 0,
                     "log_every": 1, "warmup_steps": 1},
           "sample": {"steps": 2, "per_class": 1}}
    with pytest.raises(TrainingError, match="need the VAE they were extracted with.*codec.name=diffusers"):
        Trainer(from_dict(cfg), progress=False)
    vae = tmp_path / "vae"
    export_autoencoder(vae, KLAutoencoder(AutoencoderSpec(in_channels=3, latent_channels=4, channels=[4, 4],
                                                          groups=2)), 1.0, 0.0, {})
    cfg["codec"] = {"name": "autoencoder", "path": str(vae)}
    summary = Trainer(from_dict(cfg), progress=False).train()
    assert summary["steps"] == 2 and (tmp_path / "run" / "samples" / "final.png").is_file()

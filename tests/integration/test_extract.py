"""`moedit extract` and what reads its stores, on a small synthetic ImageNet-layout folder (train/<wnid>/
*.JPEG and .png of several sizes): the lazy folder's cached scan and crops, the store's moments against
the codec's own, resume after a lost shard, every damaged input a clear error, and extract → train → sample
from the store, with a 2-rank torchrun extraction writing the same store as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moedit.cli.main import main as cli_main
from moedit.codecs import build_codec
from moedit.codecs.autoencoder import export_autoencoder
from moedit.codecs.autoencoder_net import AutoencoderSpec, KLAutoencoder
from moedit.config import CodecConfig, DataConfig
from moedit.data import DatasetError, LatentDataset
from moedit.data import lazy_folder
from moedit.data.lazy_folder import LazyImageFolder, center_crop
from moedit.extract import ExtractSettings, extract

pytestmark = pytest.mark.usefixtures("one_thread")
WNIDS = ("n01440764", "n01443537", "n02102040")


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """3 classes × 7 RGB photos of assorted sizes, JPEG and PNG, laid out as ImageNet's train/."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(7):
            w, h = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            arr = (rng.random((h, w, 3)) * 80 + c * 80).astype(np.uint8)
            suffix = ".JPEG" if i % 2 == 0 else ".png"
            Image.fromarray(arr).save(root / "train" / wnid / f"{wnid}_{i}{suffix}")
    return root


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ae")
    spec = AutoencoderSpec(in_channels=3, latent_channels=2, channels=[4, 4], groups=2)
    export_autoencoder(folder, KLAutoencoder(spec).eval(), scale=0.5, shift=0.1, extra={"data": {"name": "folder"}})
    return folder


def _data(root) -> DataConfig:
    return DataConfig(name="folder", path=str(root), image_size=16, crop="adm")


def _codec(folder) -> CodecConfig:
    return CodecConfig(name="autoencoder", path=str(folder))


def test_the_lazy_folder_scans_once_and_crops_like_adm(imagenet_like, monkeypatch, tmp_path):
    monkeypatch.setenv("MOEDIT_CACHE", str(tmp_path / "cache"))
    ds = LazyImageFolder(imagenet_like, image_size=16, crop="adm")
    assert len(ds) == 21 and ds.class_names == list(WNIDS) and ds.channels == 3
    x, y = ds[8]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 1
    listed = []
    monkeypatch.setattr(lazy_folder, "_files", lambda d, suffixes=None: listed.append(d) or [])
    assert len(LazyImageFolder(imagenet_like, image_size=16)) == 21 and not listed  # from the cached scan
    monkeypatch.undo()
    monkeypatch.setenv("MOEDIT_CACHE", str(tmp_path / "cache"))
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(imagenet_like / "train" / WNIDS[0] / "extra.png")
    try:
        assert len(LazyImageFolder(imagenet_like, image_size=16)) == 22  # the folder changed: scanned again
    finally:
        (imagenet_like / "train" / WNIDS[0] / "extra.png").unlink()
    big = Image.fromarray((np.random.default_rng(1).random((70, 100, 3)) * 255).astype(np.uint8))
    adm, plain = center_crop(big, 16, "adm"), center_crop(big, 16, "center")
    assert adm.size == plain.size == (16, 16) and np.asarray(adm).tolist() != np.asarray(plain).tolist()
    with pytest.raises(DatasetError, match="data.crop='zoom'"):
        LazyImageFolder(imagenet_like, image_size=16, crop="zoom")


def test_an_unreadable_image_is_named(imagenet_like, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEDIT_CACHE", str(tmp_path / "cache"))
    bad = imagenet_like / "train" / WNIDS[2] / "zz_broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    try:
        ds = LazyImageFolder(imagenet_like, image_size=16)
        with pytest.raises(DatasetError, match="zz_broken.JPEG.*fix or delete"):
            ds[len(ds) - 1]
    finally:
        bad.unlink()


def test_the_store_holds_the_codecs_moments_of_both_views(imagenet_like, codec_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEDIT_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "store"
    summary = extract(_data(imagenet_like), _codec(codec_dir), ExtractSettings(out=str(store), shard_size=8,
                                                                               workers=0, progress=False))
    assert summary["shards"] == 3 and summary["encoded_now"] == 21
    header = json.loads((store / "index.json").read_text())
    assert header["latent_shape"] == [2, 8, 8] and header["source"]["crop"] == "adm" and header["complete"]
    codec = build_codec(_codec(codec_dir))
    images = LazyImageFolder(imagenet_like, image_size=16, crop="adm")
    x = torch.stack([images[i][0] for i in (0, 9, 20)]).float() / 127.5 - 1
    mean, logvar = codec.moments(x)
    flip_mean, _ = codec.moments(torch.flip(x, dims=[-1]))
    data = LatentDataset(store, scale=0.5, shift=0.1, posterior="mean")
    m = data.moments([0, 9, 20])
    torch.testing.assert_close(m[:, 0, 0], mean)
    torch.testing.assert_close(m[:, 0, 1], logvar)
    torch.testing.assert_close(m[:, 1, 0], flip_mean)
    z, y = data.batch([20, 0, 9])
    assert y.tolist() == [2, 0, 1]
    for row, i in zip(z, (2, 0, 1)):  # a random view, scaled as the model sees it
        assert any(torch.allclose(row, (m[i, v, 0] - 0.1) * 0.5, atol=1e-6) for v in (0, 1))
    assert (data.channels, data.image_size, len(data)) == (2, 8, 21)


def test_resume_re_encodes_only_what_is_missing(imagenet_like, codec_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEDIT_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "store"
    settings = ExtractSettings(out=str(store), shard_size=8, workers=0, progress=False)
    extract(_data(imagenet_like), _codec(codec_dir), settings)
    before = (store / "shards" / "00000.moments.npy").read_bytes()
    (store / "shards" / "00001.json").unlink()  # as if killed while writing shard 1
    (store / "index.json").unlink()
    with pytest.raises(DatasetError, match="incomplete: 1 of 3 shards missing.*run the same `moedit extract`"):
        LatentDataset(store, 1.0, 0.0)
    assert extract(_data(imagenet_like), _codec(codec_dir), settings)["encoded_now"] == 8
    assert (store / "shards" / "00000.moments.npy").read_bytes() == before
    other = _data(imagenet_like)
    other.crop = "center"
    with pytest.raises(DatasetError, match="another extraction \\(source differ"):
        extract(other, _codec(codec_dir), settings)
    moments = store / "shards" / "00002.moments.npy"
    moments.write_bytes(moments.read_bytes()[:100])
    with pytest.raises(DatasetError, match="00002 cannot be read.*re-encodes that shard only"):
        LatentDataset(store, 1.0, 0.0)
    with pytest.raises(DatasetError, match="no store.json"):
        LatentDataset(tmp_path, 1.0, 0.0)


def test_extract_train_sample_from_the_store(imagenet_like, codec_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOEDIT_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "store"
    common = [f"data.name=folder", f"data.path={imagenet_like}", "data.image_size=16", "data.crop=adm"]
    assert cli_main(["extract", "--out", str(store), "--workers", "1", "--shard-size", "10", "--no-progress",
                     "--set", *common, "codec.name=autoencoder", f"codec.path={codec_dir}"]) == 0
    assert "21 images in 3 shards" in capsys.readouterr().out
    run = tmp_path / "run"
    train = ["train", "--no-progress", "--set", "data.name=latents", f"data.path={store}", "model.preset=micro",
             "model.in_channels=2", "model.image_size=8", "model.patch_size=2", "model.num_classes=3",
             "train.steps=2", "train.batch_size=4", f"train.out_dir={run}", "train.log_every=1", "train.threads=1",
             "sample.steps=2", "sample.per_class=1"]
    assert cli_main(train) == 0  # the codec comes from the store
    npz = tmp_path / "s.npz"
    assert cli_main(["sample", "--run", str(run), "--npz", str(npz)]) == 0
    assert np.load(npz)["images"].shape == (3, 3, 16, 16)  # decoded to the source's images
    other = tmp_path / "other-ae"
    export_autoencoder(other, KLAutoencoder(AutoencoderSpec(in_channels=3, latent_channels=2, channels=[4, 4],
                                                            groups=2)), 1.0, 0.0, {})
    capsys.readouterr()
    assert cli_main([*train[:-6], f"train.out_dir={tmp_path / 'run2'}", "codec.name=autoencoder",
                     f"codec.path={other}"]) == 2
    assert "extracted with moedit autoencoder" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_write_the_same_store_as_one(imagenet_like, codec_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "OMP_NUM_THREADS": "1",
           "MOEDIT_CACHE": str(tmp_path / "cache")}
    args = ["extract", "--out", str(tmp_path / "two"), "--workers", "0", "--shard-size", "4", "--no-progress",
            "--set", "data.name=folder", f"data.path={imagenet_like}", "data.image_size=16", "data.crop=adm",
            "codec.name=autoencoder", f"codec.path={codec_dir}", "train.threads=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
           "-m", "moedit.cli.main", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert cli_main([*args[:2], str(tmp_path / "one"), *args[3:]]) == 0
    for k in range(6):  # 21 images in shards of 4: ranks 0 and 1 wrote alternate shards
        a = np.load(tmp_path / "two" / "shards" / f"{k:05d}.moments.npy")
        b = np.load(tmp_path / "one" / "shards" / f"{k:05d}.moments.npy")
        np.testing.assert_array_equal(a, b)
    assert json.loads((tmp_path / "two" / "index.json").read_text())["complete"]


def test_a_store_is_scored_against_the_images_it_came_from(tmp_path):
    """`moedit eval` of a run trained on a store compares its samples with the store's source data."""
    from moedit.data import source_data

    (tmp_path / "store.json").write_text(json.dumps({"format": "moedit-latents", "source": {
        "name": "fashion_mnist", "path": None, "split": "train", "image_size": None, "crop": "center"}}))
    source = source_data(DataConfig(name="latents", path=str(tmp_path), latent_format="moedit"))
    assert (source.name, source.split) == ("fashion_mnist", "train")
    assert source_data(DataConfig(name="mnist")).name == "mnist"

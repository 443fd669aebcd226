"""The codec seam with a diffusers AutoencoderKL: a tiny one built from a config with random weights and
saved locally stands in for SD-VAE. Round trips against the VAE's own encode/decode, clear errors for
what a user gets wrong, and train -> sample through the codec with the scale stored in the run."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import yaml

from moedit.cli.main import main as cli_main
from moedit.codecs import CodecError, build_codec
from moedit.config import CodecConfig, ConfigError, from_dict
from moedit.train.trainer import Trainer, TrainingError

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A 1-channel AutoencoderKL with two blocks: 1×16×16 images -> 4×8×8 latents."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


def test_encode_and_decode_are_the_vaes_own_with_its_scale(vae_dir):
    codec = build_codec(CodecConfig(name="diffusers", path=str(vae_dir)))
    assert (codec.scale, codec.shift) == (pytest.approx(0.18215), 0.0)  # the config's scaling_factor
    assert codec.latent_shape(1, 16) == (4, 8) and codec.pixel_shape(4, 8) == (1, 16)
    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        torch.testing.assert_close(codec.encode(x, sample=False), mean * 0.18215)
        torch.testing.assert_close(codec.decode(mean * 0.18215), vae.decode(mean).sample.clamp(-1, 1))
        sampled = codec.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(sampled, mean * 0.18215)  # the posterior sample, not its mean
    custom = build_codec(CodecConfig(name="diffusers", path=str(vae_dir), scale=0.5, shift=0.1))
    torch.testing.assert_close(custom.encode(x, sample=False), (mean - 0.1) * 0.5)


def test_what_a_user_gets_wrong_is_a_clear_error(vae_dir, tmp_path, monkeypatch):
    with pytest.raises(CodecError, match="not a directory.*never downloads"):
        build_codec(CodecConfig(name="diffusers", path=str(tmp_path / "missing")))
    with pytest.raises(CodecError, match="no config.json"):
        build_codec(CodecConfig(name="diffusers", path=str(tmp_path)))
    with pytest.raises(ConfigError, match="needs codec.path"):
        from_dict({"codec": {"name": "diffusers"}})
    with pytest.raises(ConfigError, match="codec.name=identity"):
        from_dict({"codec": {"scale": 0.18215}})
    with pytest.raises(CodecError, match="takes 1"):
        build_codec(CodecConfig(name="diffusers", path=str(vae_dir))).check_pixels(3, 16)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if the extra were not installed
    with pytest.raises(CodecError, match=r"pip install 'moedit\[diffusers\]'"):
        build_codec(CodecConfig(name="diffusers", path=str(vae_dir)))


def _config(run, vae_dir, **train) -> dict:
    return {
        "seed": 1,
        "model": {"preset": "micro", "image_size": 8, "in_channels": 4, "patch_size": 2,
                  "moe": {"num_experts": 2, "expert_ratio": 1.0, "router": {"top_k": 1}}},
        "data": {"name": "synthetic", "image_size": 16},
        "codec": {"name": "diffusers", "path": str(vae_dir)},
        "train": {"out_dir": str(run), "steps": 4, "batch_size": 4, "warmup_steps": 1, "ckpt_every": 2,
                  "log_every": 2, **train},
        "sample": {"steps": 2, "per_class": 1},
    }


def test_a_model_that_does_not_fit_the_latents_names_the_shape(vae_dir, tmp_path):
    data = _config(tmp_path / "run", vae_dir)
    data["model"].update(in_channels=1, image_size=16)
    with pytest.raises(ConfigError, match="4x8x8 through the codec.*model.in_channels=4 model.image_size=8"):
        Trainer(from_dict(data), progress=False)


def test_train_resume_and_sample_through_the_codec(vae_dir, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(from_dict(_config(straight, vae_dir)), progress=False).train()
    Trainer(from_dict(_config(split, vae_dir, steps=2)), progress=False).train()
    Trainer(from_dict(_config(split, vae_dir)), resume=True, progress=False).train()
    from safetensors.torch import load_file

    a = load_file(str(straight / "checkpoints" / "step_00000004" / "model.safetensors"))
    b = load_file(str(split / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the posterior noise is part of the exact resume
    with pytest.raises(TrainingError, match="trained with codec scale=0.18215.*scale=0.5"):
        Trainer(from_dict({**_config(split, vae_dir, steps=6), "codec": {"name": "diffusers", "path": str(vae_dir),
                                                                         "scale": 0.5}}), resume=True, progress=False)
    saved = yaml.safe_load((straight / "config.yaml").read_text())["codec"]
    assert saved["scale"] == pytest.approx(0.18215) and saved["shift"] == 0.0  # the run alone can sample
    npz = tmp_path / "s.npz"
    assert cli_main(["sample", "--run", str(straight), "--npz", str(npz), "--set", "sample.steps=2"]) == 0
    images = np.load(npz)["images"]
    assert images.shape == (10, 1, 16, 16) and images.dtype == np.uint8  # decoded images, not latents
    moved = tmp_path / "moved-vae"
    vae_dir.rename(moved)
    try:
        assert cli_main(["sample", "--run", str(straight), "--out", str(tmp_path / "x.png")]) == 2
        assert "is not a directory" in capsys.readouterr().err
        assert cli_main(["sample", "--run", str(straight), "--out", str(tmp_path / "x.png"),
                         "--set", f"codec.path={moved}"]) == 0
    finally:
        moved.rename(vae_dir)


def test_an_imported_facebookresearch_dit_checkpoint_samples_to_images_through_a_local_vae(vae_dir, tmp_path):
    """A DiT checkpoint models 4-channel latents; with the codec set at conversion (here into an MoE),
    `moedit sample` decodes them to a PNG and an npz of images."""
    import sys as _sys
    from pathlib import Path

    _sys.path.insert(0, str(Path(__file__).parents[1]))
    from dit_reference import dit_state_dict  # tests/

    path = tmp_path / "DiT-tiny.pt"
    torch.save(dit_state_dict(C=4, grid=4, p=2, classes=10), path)  # 4×8×8 latents
    out = tmp_path / "dit"
    assert cli_main(["convert", str(path), "--out", str(out), "--heads", "2", "--learn-sigma", "drop",
                     "--set", "model.moe.num_experts=2", "codec.name=diffusers", f"codec.path={vae_dir}"]) == 0
    npz = tmp_path / "dit.npz"
    assert cli_main(["sample", "--run", str(out), "--npz", str(npz), "--set", "sample.steps=2",
                     "sample.per_class=1"]) == 0
    assert np.load(npz)["images"].shape == (10, 1, 16, 16)
    assert (out / "samples").is_dir()


def test_eval_scores_the_decoded_images_and_keys_its_cache_by_the_codec(vae_dir, tmp_path):
    """A latent MNIST run (1×28×28 images -> 4×14×14 latents): `moedit eval` decodes before scoring, so
    the classifier sees 28×28 images, and the sample cache records the codec."""
    from moedit.data import DatasetError, load_mnist
    from moedit.eval import evaluate_run

    try:
        load_mnist("test")
    except DatasetError as exc:
        pytest.skip(f"MNIST is not installed: {exc}")
    run = tmp_path / "run"
    data = _config(run, vae_dir, steps=2, ckpt_every=0)
    data["model"].update(image_size=14)
    data["data"] = {"name": "mnist"}
    Trainer(from_dict(data), progress=False).train()
    out = tmp_path / "eval"
    record = evaluate_run(run, n=10, batch_size=10, out_dir=out, cache_dir=tmp_path / "cache", metrics=("fd_lenet",))
    with np.load(out / "samples.npz") as f:
        assert f["images"].shape == (10, 1, 28, 28)
    assert record["codec"].startswith("diffusers ") and "fd_lenet" in record["metrics"]

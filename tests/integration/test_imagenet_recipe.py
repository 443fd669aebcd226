"""The ImageNet-256 recipes' commands (configs/imagenet256/), end to end at a tiny size: a synthetic folder
in ImageNet's train/<wnid>/*.JPEG layout, a tiny AutoencoderKL with SD-VAE's downsampling factor 8 saved
locally in place of sd-vae-ft-ema, `moedit extract` with the recipe's config, then each recipe trained for
two steps from the store (its preset at two blocks) and sampled to decoded RGB images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moedit.cli.main import main as cli_main
from moedit.config import load_config

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")
RECIPES = Path(__file__).parents[2] / "configs" / "imagenet256"
NAMES = ("dit_moe_s2", "promoe_b2", "dsmoe_s_e16")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(("n01440764", "n01443537")):
        (root / "imagenet" / "train" / wnid).mkdir(parents=True)
        for i in range(4):  # photos larger than 2 × 64: ADM's crop halves them first
            arr = (rng.random((150 + 10 * i, 180, 3)) * 120 + 60 * c).astype(np.uint8)
            Image.fromarray(arr).save(root / "imagenet" / "train" / wnid / f"{wnid}_{i}.JPEG")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                  layers_per_block=1, norm_num_groups=4, sample_size=64)
    vae.save_pretrained(root / "sd-vae-ft-ema")
    out = root / "latents"
    assert cli_main(["extract", "-c", str(RECIPES / "dit_moe_s2.yaml"), "--out", str(out), "--workers", "1",
                     "--no-progress", "--set", "data.name=folder", f"data.path={root / 'imagenet' / 'train'}",
                     "data.image_size=64", f"codec.path={root / 'sd-vae-ft-ema'}"]) == 0
    return root


def test_the_recipes_load_as_their_papers_presets():
    for name in NAMES:
        cfg = load_config(RECIPES / f"{name}.yaml")
        assert (cfg.data.name, cfg.codec.name, cfg.model.in_channels, cfg.model.image_size) == ("latents", "diffusers", 4, 32)
        assert cfg.data.crop == "adm" and cfg.model.num_classes == 1000


@pytest.mark.parametrize("name", NAMES)
def test_extract_train_sample_with_each_recipe(store, tmp_path, name):
    run = tmp_path / name
    common = [f"codec.path={store / 'sd-vae-ft-ema'}", "model.image_size=8", "model.depth=2", "model.width=64",
              "model.heads=2", "sample.steps=2",
              "sample.per_class=1", "train.device=cpu", "train.threads=1"]
    assert cli_main(["train", "-c", str(RECIPES / f"{name}.yaml"), "--no-progress", "--set", *common,
                     f"data.path={store / 'latents'}", "data.workers=1", "model.num_classes=2", "train.steps=2",
                     "train.batch_size=4", f"train.out_dir={run}", "train.log_every=1", "train.warmup_steps=1",
                     "diagnostics.every=1"]) == 0
    npz = tmp_path / "s.npz"
    assert cli_main(["sample", "--run", str(run), "--npz", str(npz)]) == 0
    assert np.load(npz)["images"].shape == (2, 3, 64, 64)  # decoded through the VAE to RGB

"""Every YAML in configs/ resolves, builds its model and runs one forward/backward at its real shape."""

from pathlib import Path

import pytest
import torch

from moedit.config import load_config
from moedit.models import build_model

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_builds_and_runs(path):
    # shrink depth/width only for the GPU-sized config so the test stays fast on CPU
    overrides = ["model.depth=2", "model.width=64", "model.heads=2"] if "dit_moe" in path.stem else []
    cfg = load_config(path, overrides)
    model = build_model(cfg.model)
    m = cfg.model
    x = torch.randn(2, *model.input_shape())  # images, or clips for a video config
    out = model(x, torch.rand(2), torch.randint(0, m.num_classes, (2,)))
    assert out.shape == x.shape
    loss = out.square().mean() + sum(model.aux_losses().values())
    loss.backward()
    assert set(model.aux_losses()) <= set(cfg.train.aux_weights)  # the trainer can weigh every aux loss


def test_configs_exist():
    assert {"quickstart", "deepseek_style", "ddpm_mnist", "dit_moe_s2"} <= {p.stem for p in CONFIGS}


def test_every_router_has_a_tiny_config():
    from moedit.moe.routers import ROUTERS

    by_router = {load_config(p).model.moe.router.name for p in CONFIGS if load_config(p).model.moe is not None}
    assert set(ROUTERS) <= by_router


def test_router_configs_differ_from_the_quickstart_only_in_routing():
    base = load_config(CONFIGS[0].parent / "quickstart.yaml")
    for path in CONFIGS:
        if path.stem.startswith("router_"):
            cfg = load_config(path)
            assert (cfg.train.steps, cfg.train.batch_size, cfg.train.lr) == (base.train.steps, base.train.batch_size, base.train.lr)
            assert (cfg.model.width, cfg.model.depth, cfg.data) == (base.model.width, base.model.depth, base.data)
            assert cfg.train.out_dir != base.train.out_dir  # a variant never writes into the quickstart's run


AUTOENCODER_CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "autoencoder").glob("*.yaml"))


@pytest.mark.parametrize("path", AUTOENCODER_CONFIGS, ids=[p.stem for p in AUTOENCODER_CONFIGS])
def test_autoencoder_configs_build_and_reconstruct_at_their_shape(path):
    from moedit.codecs.autoencoder_net import KLAutoencoder
    from moedit.train.autoencoder import load_autoencoder_config

    cfg = load_autoencoder_config(path)
    assert cfg.data.name == path.stem and cfg.train.out_dir == f"runs/autoencoder_{path.stem}"
    x = torch.randn(2, cfg.model.in_channels, 28, 28)
    recon, mean, _ = KLAutoencoder(cfg.model)(x)
    assert recon.shape == x.shape and mean.shape == (2, cfg.model.latent_channels, 7, 7)

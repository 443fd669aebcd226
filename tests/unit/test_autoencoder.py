"""moedit's KL autoencoder (codecs/autoencoder_net.py) and its codec (codecs/autoencoder.py): shapes, the
KL term against torch.distributions, the exported files round trip into a codec whose encode / decode are
the scale-shift formulas of docs/LATENT.md, and every damaged or missing file is a clear CodecError."""

from __future__ import annotations

import json

import pytest
import torch

from moedit.codecs import CodecError, build_codec
from moedit.codecs.autoencoder import RECORD_NAME, WEIGHTS_NAME, export_autoencoder, update_record
from moedit.codecs.autoencoder_net import AutoencoderSpec, KLAutoencoder, kl_to_standard_normal
from moedit.config import CodecConfig, ConfigError, from_dict
from moedit.data import make_synthetic
from moedit.train.autoencoder import latent_statistics, load_autoencoder_config

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = AutoencoderSpec(in_channels=1, latent_channels=3, channels=[8, 8, 16], groups=4)


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = KLAutoencoder(SPEC).eval()
    export_autoencoder(tmp_path, model, scale=0.7, shift=0.2, extra={"data": {"name": "synthetic"}})
    return tmp_path, model


def test_shapes_follow_the_levels():
    model = KLAutoencoder(SPEC)
    x = torch.randn(2, 1, 28, 28)
    mean, logvar = model.moments(x)
    assert SPEC.factor == 4 and mean.shape == logvar.shape == (2, 3, 7, 7)
    recon, mean2, _ = model(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and torch.equal(mean, mean2)
    assert KLAutoencoder(AutoencoderSpec(channels=[8], groups=4)).moments(x)[0].shape == (2, 4, 28, 28)


def test_spec_problems_name_the_key():
    assert any("groups=3" in p for p in AutoencoderSpec(channels=[8, 16], groups=3).problems())
    assert any("channels=[]" in p for p in AutoencoderSpec(channels=[]).problems())
    with pytest.raises(ValueError, match="latent_channels=0"):
        KLAutoencoder(AutoencoderSpec(latent_channels=0))


def test_kl_matches_torch_distributions():
    mean, logvar = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(kl_to_standard_normal(mean, logvar), expected)


def test_exported_files_round_trip_into_the_codec(exported):
    folder, model = exported
    codec = build_codec(CodecConfig(name="autoencoder", path=str(folder)))
    assert (codec.scale, codec.shift) == (0.7, 0.2)
    assert codec.latent_shape(1, 28) == (3, 7) and codec.pixel_shape(3, 7) == (1, 28)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        mean, logvar = model.moments(x)
        torch.testing.assert_close(codec.encode(x, sample=False), (mean - 0.2) * 0.7)
        z = torch.randn(2, 3, 7, 7)
        torch.testing.assert_close(codec.decode(z), model.decode(z / 0.7 + 0.2).clamp(-1, 1))
        torch.testing.assert_close(codec.moments(x)[1], logvar)
        drawn = codec.encode(x, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(drawn, (mean - 0.2) * 0.7)  # a posterior sample
    record = json.loads((folder / RECORD_NAME).read_text())
    assert record["spec"]["channels"] == [8, 8, 16] and record["factor"] == 4
    assert record["weights_sha256"][:16] in codec.signature()
    over = build_codec(CodecConfig(name="autoencoder", path=str(folder), scale=2.0))
    assert over.scale == 2.0 and over.shift == 0.2
    update_record(folder / RECORD_NAME, reconstruction={"psnr_db": 30.0})
    assert build_codec(CodecConfig(name="autoencoder", path=str(folder))).record["reconstruction"]["psnr_db"] == 30.0


def test_damaged_or_missing_files_are_clear_errors(exported, tmp_path_factory):
    folder, _ = exported
    with pytest.raises(CodecError, match="is not a folder"):
        build_codec(CodecConfig(name="autoencoder", path=str(folder / "nowhere")))
    with pytest.raises(CodecError, match="ships no autoencoder 'cifar'.*moedit:mnist"):
        build_codec(CodecConfig(name="autoencoder", path="moedit:cifar"))
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(CodecError, match="has no autoencoder.json.*finishes"):
        build_codec(CodecConfig(name="autoencoder", path=str(empty)))
    weights = folder / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CodecError, match="does not match the sha256"):
        build_codec(CodecConfig(name="autoencoder", path=str(folder)))
    (folder / RECORD_NAME).write_text('{"format": "something else"}')
    with pytest.raises(CodecError, match="not a moedit autoencoder record"):
        build_codec(CodecConfig(name="autoencoder", path=str(folder)))
    (folder / RECORD_NAME).write_text("{not json")
    with pytest.raises(CodecError, match="cannot be read"):
        build_codec(CodecConfig(name="autoencoder", path=str(folder)))


def test_the_codec_refuses_data_it_cannot_take(exported):
    codec = build_codec(CodecConfig(name="autoencoder", path=str(exported[0])))
    with pytest.raises(CodecError, match="3-channel images.*takes 1"):
        codec.check_pixels(3, 28)
    with pytest.raises(CodecError, match="multiple of 4"):
        codec.check_pixels(1, 30)


def test_config_errors():
    with pytest.raises(ConfigError, match="codec.name=autoencoder needs codec.path.*moedit:mnist"):
        from_dict({"codec": {"name": "autoencoder"}})
    with pytest.raises(ConfigError, match="codec.name=autoencoder or diffusers"):
        from_dict({"codec": {"path": "moedit:mnist"}})
    with pytest.raises(ConfigError, match="unknown config key train.kl"):
        load_autoencoder_config(None, ["train.kl=1"])
    with pytest.raises(ConfigError, match="train.loss='l3'.*l1, mse"):
        load_autoencoder_config(None, ["train.loss=l3"])
    with pytest.raises(ConfigError, match="model.groups=3 must divide"):
        load_autoencoder_config(None, ["model.groups=3"])


def test_latent_statistics_normalise_the_latents():
    torch.manual_seed(0)
    model = KLAutoencoder(SPEC).eval()
    data = make_synthetic(num=64, image_size=28, seed=0)
    stats = latent_statistics(model, data, count=64, seed=0, device=torch.device("cpu"))
    with torch.no_grad():
        mean, logvar = model.moments(data.batch(range(64))[0])
    sample = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    z = (sample - stats["shift"]) * stats["scale"]  # what the diffusion model sees: unit scale
    assert abs(float(z.mean())) < 0.05 and float(z.std()) == pytest.approx(1.0, abs=0.05)
    assert stats["images"] == 64

"""The autoencoders moedit ships (`moedit:mnist`, `moedit:fashion_mnist`): their records say how they were
made and what they measured, they load with their checked weights, and on the first 500 test images they
reconstruct as the record says (PSNR within 1 dB of the recorded 10,000-image mean, the shipped LeNet's
accuracy within the 1-point bar of the originals', give or take 500 images' sampling error)."""

from __future__ import annotations

import pytest
import torch

from moedit.codecs import build_codec
from moedit.codecs.autoencoder import SHIPPED
from moedit.config import CodecConfig, DataConfig
from moedit.data import DatasetError, build_dataset
from moedit.eval.reconstruction import evaluate_reconstruction

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", SHIPPED)
def test_the_record_says_how_it_was_made_and_that_it_meets_the_bar(name):
    codec = build_codec(CodecConfig(name="autoencoder", path=f"moedit:{name}"))
    record = codec.record
    assert record["command"].startswith(f"python scripts/train_autoencoder.py --dataset {name}")
    assert record["data"]["name"] == name and record["torch"] and record["train_seconds"] > 0
    quality = record["reconstruction"]
    assert quality["images"] == 10_000 and quality["accuracy_drop_points"] <= 1.0
    assert codec.latent_shape(1, 28) == (record["spec"]["latent_channels"], 7) and codec.scale == record["scale"]


@pytest.mark.parametrize("name", SHIPPED)
def test_reconstructions_of_test_images_match_the_record(name):
    try:
        data = build_dataset(DataConfig(name=name, split="test"))
    except DatasetError as exc:
        pytest.skip(f"{name} is not installed: {exc}")
    codec = build_codec(CodecConfig(name="autoencoder", path=f"moedit:{name}"))
    report, recon = evaluate_reconstruction(codec, data, 500, name)
    recorded = codec.record["reconstruction"]
    assert recon.shape == (500, 1, 28, 28) and recon.dtype == torch.uint8
    assert abs(report["psnr_db"] - recorded["psnr_db"]) < 1.0
    assert report["accuracy_drop_points"] <= 3.0  # 1 point on 10,000 images; 500 add sampling error

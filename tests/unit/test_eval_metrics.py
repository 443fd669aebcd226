"""Evaluation metrics (moedit.eval.metrics) against closed forms and slow reference loops: Fréchet
distance of known Gaussians, KID's unbiasedness, k-NN precision / recall on constructed sets, accuracy,
and the errors a user can cause."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from moedit.eval.metrics import (
    class_accuracy,
    feature_stats,
    frechet_distance,
    kid,
    mmd2_unbiased,
    precision_recall,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))  # sign fix makes Q uniformly (Haar) distributed


def random_covariance(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- feature_stats / FD


def test_feature_stats_matches_numpy_for_numpy_and_torch_inputs():
    x = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    for feats in (x, torch.from_numpy(x)):
        mu_D, sigma_DD = feature_stats(feats)
        assert mu_D.dtype == sigma_DD.dtype == torch.float64
        np.testing.assert_allclose(mu_D.numpy(), x.astype(np.float64).mean(0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(sigma_DD.numpy(), np.cov(x.astype(np.float64), rowvar=False), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n, d", [(400, 16), (20, 64)])  # the second has a singular covariance (N < D)
def test_identical_sets_have_zero_frechet_distance(n, d):
    x = np.random.default_rng(1).standard_normal((n, d)) * 3.0 + 5.0
    mu_D, sigma_DD = feature_stats(x)
    fd = frechet_distance(mu_D, sigma_DD, mu_D, sigma_DD)
    assert 0.0 <= fd < 1e-9 * float(sigma_DD.trace())


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    a, b = rng.uniform(0.1, 4.0, 8), rng.uniform(0.1, 4.0, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_commuting_non_diagonal_closed_form():
    # a common rotation of two diagonal covariances: dense matrices, but the same answer Σ(√a − √b)²
    rng = np.random.default_rng(3)
    q = random_orthogonal(16, rng)
    a, b = rng.uniform(0.01, 9.0, 16), rng.uniform(0.01, 9.0, 16)
    mu = rng.standard_normal(16)
    fd = frechet_distance(q @ mu, q @ np.diag(a) @ q.T, np.zeros(16), q @ np.diag(b) @ q.T)
    assert fd == pytest.approx(np.sum(mu**2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-9)


def test_frechet_distance_non_commuting_2x2_closed_form():
    # for 2×2, Tr (Σ1Σ2)^½ = √λ1 + √λ2 = √(tr(Σ1Σ2) + 2√(det Σ1 · det Σ2))
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    trace_sqrt = np.sqrt(np.trace(s1 @ s2) + 2.0 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_when_available():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(4)
    s1, s2 = random_covariance(32, rng), random_covariance(32, rng)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    trace_sqrt = np.trace(linalg.sqrtm(s1 @ s2)).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_large_samples_approaches_the_gaussians():
    rng = np.random.default_rng(5)
    d, n = 4, 40_000
    mu1, mu2 = np.zeros(d), np.array([1.0, -1.0, 0.5, 0.0])
    s1, s2 = random_covariance(d, rng), random_covariance(d, rng)
    x1 = rng.multivariate_normal(mu1, s1, size=n)
    x2 = rng.multivariate_normal(mu2, s2, size=n)
    exact = frechet_distance(mu1, s1, mu2, s2)
    assert exact > 1.0
    assert frechet_distance(*feature_stats(x1), *feature_stats(x2)) == pytest.approx(exact, rel=0.05)


def test_frechet_distance_bad_inputs_raise():
    mu_D, sigma_DD = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        feature_stats(np.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        feature_stats(np.array([[0.0, 1.0], [np.nan, 2.0]]))
    with pytest.raises(ValueError, match="feature widths"):
        frechet_distance(mu_D, sigma_DD, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"must be \(3, 3\)"):
        frechet_distance(mu_D, np.eye(2), mu_D, sigma_DD)
    with pytest.raises(ValueError, match="not a covariance"):
        frechet_distance(mu_D, np.diag([1.0, -1.0, 1.0]), mu_D, sigma_DD)
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(mu_D, np.array([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]]), mu_D, sigma_DD)


# ----------------------------------------------------------------------------- KID


def slow_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² written out pair by pair: the reference for the matrix version."""
    d = x.shape[1]

    def k(u, v):
        return (float(np.dot(u, v)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2.0 * xy


def test_mmd2_unbiased_matches_pairwise_loop():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((7, 3)) + 0.3
    assert mmd2_unbiased(x, y) == pytest.approx(slow_mmd2_unbiased(x, y), rel=1e-12)
    assert mmd2_unbiased(torch.from_numpy(x), y) == pytest.approx(slow_mmd2_unbiased(x, y), rel=1e-12)


def test_mmd2_is_unbiased_where_the_plain_mean_is_not():
    # fresh draws of two sets from one distribution: the true MMD² is 0
    gen = torch.Generator().manual_seed(7)
    m, d, draws = 10, 3, 400
    unbiased, biased = [], []
    for _ in range(draws):
        x = torch.randn(m, d, generator=gen, dtype=torch.float64)
        y = torch.randn(m, d, generator=gen, dtype=torch.float64)
        unbiased.append(mmd2_unbiased(x, y))
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        biased.append(float(kxx.mean() + kyy.mean() - 2 * kxy.mean()))  # keeps the i = j terms
    unbiased, biased = np.array(unbiased), np.array(biased)
    se = unbiased.std(ddof=1) / np.sqrt(draws)
    assert abs(unbiased.mean()) < 4 * se
    assert biased.mean() > 10 * se  # the diagonal's O(1/m) bias, far outside the noise


def test_kid_of_identical_sets_is_near_zero_and_of_shifted_sets_is_not():
    x = np.random.default_rng(8).standard_normal((200, 8))
    # whole set against itself: the two sets are not independent, so the estimate is not exactly 0 but
    # -(2/n)(mean k(x_i, x_i) - mean_{i≠j} k(x_i, x_j)), an O(1/n) amount
    k_nn = (x @ x.T / 8 + 1) ** 3
    diag, off = np.mean(np.diag(k_nn)), (k_nn.sum() - np.trace(k_nn)) / (200 * 199)
    whole = kid(x, x, subsets=3, subset_size=200)  # every subset is the whole set
    assert whole.mean == pytest.approx(-2.0 / 200 * (diag - off), rel=1e-10) and whole.std < 1e-10
    same = kid(x, x, subsets=20, subset_size=50)
    far = kid(x, x + 1.0, subsets=20, subset_size=50)
    assert abs(same.mean) < 2 * same.std
    assert far.mean > 3 * far.std and far.mean > 50 * abs(same.mean)


def test_kid_is_seeded_and_reports_its_settings():
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((120, 4)), rng.standard_normal((90, 4)) + 0.2
    first, again = kid(a, b, subsets=5, subset_size=40, seed=1), kid(a, b, subsets=5, subset_size=40, seed=1)
    assert first == again
    assert kid(a, b, subsets=5, subset_size=40, seed=2).mean != first.mean
    assert first.as_dict().keys() == {"mean", "std", "subsets", "subset_size"}
    assert (first.subsets, first.subset_size) == (5, 40)


def test_kid_bad_inputs_raise():
    a, b = np.zeros((30, 4)), np.zeros((20, 4))
    with pytest.raises(ValueError, match=r"feats_b has only 20 samples; pass subset_size<=20"):
        kid(a, b, subset_size=25)
    with pytest.raises(ValueError, match="feature widths"):
        kid(a, np.zeros((30, 5)), subset_size=10)
    with pytest.raises(ValueError, match="subset_size >= 2"):
        kid(a, b, subset_size=1)
    with pytest.raises(ValueError, match="subsets >= 1"):
        kid(a, b, subsets=0, subset_size=10)


# ----------------------------------------------------------------------------- precision / recall


def slow_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al.'s definition with full distance matrices and a sort per point."""

    def radii(x):
        full = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.array([np.sort(np.delete(row, i))[k - 1] for i, row in enumerate(full)])

    cross = np.linalg.norm(fake[:, None] - real[None], axis=-1)  # (F, R)
    precision = np.mean((cross <= radii(real)[None]).any(1))
    recall = np.mean((cross <= radii(fake)[:, None]).any(0))
    return float(precision), float(recall)


# block_elems: one row per block; 7 to 9 rows per block, some blocks partial; everything in one block
@pytest.mark.parametrize("k, block_elems", [(1, 7), (3, 7), (1, 420), (3, 420), (5, 420), (3, 1 << 24)])
def test_precision_recall_matches_slow_reference(k, block_elems):
    rng = np.random.default_rng(10)
    real = rng.standard_normal((60, 5))
    fake = rng.standard_normal((45, 5)) * 1.5 + 0.7  # overlapping, so both numbers are fractional
    got = precision_recall(real, fake, k=k, block_elems=block_elems)
    want = slow_precision_recall(real, fake, k)
    assert (got.precision, got.recall) == pytest.approx(want, abs=1e-12)
    assert 0.0 < got.precision < 1.0  # a fractional answer, so a miscounted point would show


def test_precision_recall_of_identical_and_of_far_apart_sets():
    x = np.random.default_rng(11).standard_normal((300, 8)) + 50.0  # large offset: the centring matters
    same = precision_recall(x, x.copy())
    assert (same.precision, same.recall, same.k) == (1.0, 1.0, 3)
    apart = precision_recall(x, x + 100.0)
    assert (apart.precision, apart.recall) == (0.0, 0.0)


def test_fake_set_on_one_mode_has_high_precision_and_low_recall():
    rng = np.random.default_rng(12)
    centres = 10.0 * np.eye(4)  # four well-separated modes
    real = np.concatenate([c + rng.standard_normal((200, 4)) for c in centres])
    fake = centres[0] + rng.standard_normal((200, 4))  # fresh samples, but only from the first mode
    result = precision_recall(real, fake, k=3)
    assert result.precision > 0.9
    assert 0.1 < result.recall <= 0.25


def test_precision_recall_bad_inputs_raise():
    real = np.zeros((10, 4))
    with pytest.raises(ValueError, match="fake_ND has 3 samples but .* needs at least 4"):
        precision_recall(real, np.zeros((3, 4)), k=3)
    with pytest.raises(ValueError, match="feature widths"):
        precision_recall(real, np.zeros((10, 5)))
    with pytest.raises(ValueError, match="k must be >= 1"):
        precision_recall(real, real, k=0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        precision_recall(np.zeros((2, 3, 4)), real)


# ----------------------------------------------------------------------------- class accuracy


def test_class_accuracy_known_answer():
    logits = np.array([[5.0, 0, 0], [0, 2, 1], [0, 0, 3], [1, 4, 0]])
    assert class_accuracy(logits, np.array([0, 1, 1, 1])) == 0.75
    assert class_accuracy(torch.from_numpy(logits).float(), torch.tensor([0, 1, 2, 1])) == 1.0


def test_class_accuracy_bad_inputs_raise():
    logits = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        class_accuracy(logits, np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        class_accuracy(logits, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer class indices"):
        class_accuracy(logits, np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        class_accuracy(np.full((4, 3), np.nan), np.zeros(4, dtype=np.int64))

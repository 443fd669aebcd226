"""Sample-quality metrics on feature matrices: Fréchet distance, KID, k-NN precision / recall, accuracy.

Every function takes features of shape (N, D), one row per image (a classifier's penultimate layer,
Inception's pool layer), as numpy arrays or torch tensors, and computes in float64 on the device of
its first argument. Nothing here extracts features or looks at images. Which features each number is
reported on, and at which N, is fixed by docs/EVALUATION.md.

**Fréchet distance** (Dowson & Landau 1982; as FID: Heusel et al. 2017, arXiv 1706.08500). Fit a
Gaussian (μ, Σ) to each set, Σ the unbiased (N − 1) covariance, and take the squared 2-Wasserstein
distance between the two Gaussians:

    FD = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½)

Σ₁Σ₂ is not symmetric, so its square root is never formed. With A = Σ₁^½ Σ₂^½ (both factors from
symmetric eigendecompositions), A Aᵀ = Σ₁^½ Σ₂ Σ₁^½ has the eigenvalues of Σ₁Σ₂ (XY and YX share
eigenvalues), so Tr (Σ₁Σ₂)^½ = Σᵢ σᵢ(A), the nuclear norm of A. Singular values of A keep the small
terms to full precision, where eigenvalues of A Aᵀ would square the spread of the spectrum first.
Eigenvalues of Σ that rounding made slightly negative are clamped to 0. FD grows as N shrinks (the
noise in the sample covariances adds to it), so compare values only at equal N.

**KID** (Bińkowski et al. 2018, arXiv 1801.01401): squared MMD under the cubic polynomial kernel
k(x, y) = (xᵀy / D + 1)³, estimated without bias from x₁..x_m and y₁..y_n:

    MMD²ᵤ = Σ_{i≠j} k(xᵢ, xⱼ) / (m(m−1)) + Σ_{i≠j} k(yᵢ, yⱼ) / (n(n−1)) − 2 Σ_{i,j} k(xᵢ, yⱼ) / (mn)

The within-set sums leave out i = j: keeping k(xᵢ, xᵢ) (the V-statistic) adds a positive O(1/m)
bias, which is why FD misleads at small N and KID does not. Being unbiased, a single estimate can be
negative. Reported as the mean and the spread (std, ddof 0) of the estimate over `subsets` random
subsets of `subset_size` rows drawn without replacement from each set; the standard error of the mean
is std / √subsets.

**Precision / recall** (Kynkäänniemi et al. 2019, arXiv 1904.06991): a set's manifold is the union
of balls around its points, the radius of point φ being the distance to its k-th nearest neighbour
in its own set, φ itself excluded. precision = share of fake points inside the real manifold (are
samples realistic?); recall = share of real points inside the fake manifold (is the data covered?).

**Class accuracy**: top-1 accuracy of a classifier's logits on images generated for given labels;
it catches ignored labels and mode collapse that a distribution distance can hide.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

Array = np.ndarray | torch.Tensor

# Pairwise distances are formed a block of rows at a time, at most this many float64 entries per block
# (2^24 × 8 B = 128 MiB, plus a 16 MiB mask), so 10k × 10k sets never hold a full distance matrix.
DIST_BLOCK_ELEMS = 1 << 24
# A covariance eigenvalue below −PSD_TOL × (largest |eigenvalue|) is beyond rounding: the matrix is wrong.
PSD_TOL = 1e-6
SYMMETRY_TOL = 1e-6


@dataclass(frozen=True)
class KIDResult:
    mean: float
    std: float  # spread of one subset's estimate (ddof 0), not the standard error of the mean
    subsets: int
    subset_size: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- input checks


def _tensor(x: Array, name: str, ndim: int, device: torch.device | None = None) -> torch.Tensor:
    """x as a finite float64 tensor with `ndim` dims, or a ValueError that names the fix."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != ndim:
        if ndim == 2:
            need = "(N, D), one row per sample; flatten each sample's features (x.reshape(len(x), -1))"
        else:
            need = "(D,); pass the mean that feature_stats returns"
        raise ValueError(f"{name} must have shape {need}; got {tuple(t.shape)}")
    t = t.detach().to(device=device if device is not None else t.device, dtype=torch.float64)
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(
            f"{name} holds {bad} NaN/inf entries; the features (or the samples they came from) diverged: "
            "check the sampler output before evaluating"
        )
    return t


def _features(x: Array, name: str, min_rows: int, why: str, device: torch.device | None = None) -> torch.Tensor:
    x_ND = _tensor(x, name, 2, device)
    if x_ND.shape[0] < min_rows:
        raise ValueError(
            f"{name} has {x_ND.shape[0]} samples but {why} needs at least {min_rows}; evaluate more samples"
        )
    if x_ND.shape[1] < 1:
        raise ValueError(f"{name} has 0 feature columns; pass the feature extractor's output, shape (N, D)")
    return x_ND


def _same_width(a_ND: torch.Tensor, b_ND: torch.Tensor, names: str) -> None:
    if a_ND.shape[-1] != b_ND.shape[-1]:
        raise ValueError(
            f"{names} have different feature widths ({a_ND.shape[-1]} vs {b_ND.shape[-1]}); "
            "both must come from the same feature extractor"
        )


# ----------------------------------------------------------------------------- Fréchet distance


def feature_stats(feats_ND: Array) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ_D, Σ_DD): the row mean and unbiased (N − 1) covariance, float64. Σ is singular when N ≤ D."""
    x_ND = _features(feats_ND, "feats_ND", 2, "a covariance")
    mu_D = x_ND.mean(dim=0)
    xc_ND = x_ND - mu_D
    sigma_DD = xc_ND.T @ xc_ND / (x_ND.shape[0] - 1)
    return mu_D, 0.5 * (sigma_DD + sigma_DD.T)  # exactly symmetric, whatever the matmul's rounding


def _gaussian(mu: Array, sigma: Array, tag: str, device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    mu_D = _tensor(mu, f"mu{tag}", 1, device)
    sigma_DD = _tensor(sigma, f"sigma{tag}", 2, mu_D.device)
    d = mu_D.shape[0]
    if d == 0:
        raise ValueError(f"mu{tag} is empty; pass the (μ, Σ) that feature_stats returns for a non-empty feature matrix")
    if sigma_DD.shape != (d, d):
        raise ValueError(
            f"sigma{tag} must be ({d}, {d}) to match mu{tag}, got {tuple(sigma_DD.shape)}; "
            "pass the pair feature_stats returns"
        )
    scale = float(sigma_DD.abs().max())
    if float((sigma_DD - sigma_DD.T).abs().max()) > SYMMETRY_TOL * scale:
        raise ValueError(f"sigma{tag} is not symmetric, so it is not a covariance; pass the Σ from feature_stats")
    return mu_D, 0.5 * (sigma_DD + sigma_DD.T)


def _psd_sqrt(sigma_DD: torch.Tensor, name: str) -> torch.Tensor:
    """Σ^½ of a symmetric PSD matrix via its eigendecomposition; rounding-level negatives become 0."""
    w_D, v_DD = torch.linalg.eigh(sigma_DD)
    top = float(w_D.abs().max())
    if float(w_D.min()) < -PSD_TOL * top:
        raise ValueError(
            f"{name} has eigenvalue {float(w_D.min()):.3g} (largest {top:.3g}): it is not a covariance matrix; "
            "pass the Σ from feature_stats"
        )
    return (v_DD * w_D.clamp_min(0.0).sqrt()) @ v_DD.T


def frechet_distance(mu1_D: Array, sigma1_DD: Array, mu2_D: Array, sigma2_DD: Array) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), the trace term as the nuclear norm of Σ₁^½ Σ₂^½."""
    mu1_D, sigma1_DD = _gaussian(mu1_D, sigma1_DD, "1")
    mu2_D, sigma2_DD = _gaussian(mu2_D, sigma2_DD, "2", mu1_D.device)
    _same_width(mu1_D, mu2_D, "mu1 and mu2")
    root1_DD = _psd_sqrt(sigma1_DD, "sigma1")
    root2_DD = _psd_sqrt(sigma2_DD, "sigma2")
    trace_sqrt = torch.linalg.svdvals(root1_DD @ root2_DD).sum()
    fd = (mu1_D - mu2_D).square().sum() + sigma1_DD.trace() + sigma2_DD.trace() - 2.0 * trace_sqrt
    # FD is a squared distance; a negative value can only be rounding around 0
    return max(float(fd), 0.0)


# ----------------------------------------------------------------------------- KID


def polynomial_kernel(x_MD: torch.Tensor, y_ND: torch.Tensor) -> torch.Tensor:
    """k_MN[i, j] = (xᵢᵀyⱼ / D + 1)³, KID's kernel (dividing by D keeps it scale-free across widths)."""
    return (x_MD @ y_ND.T / x_MD.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x_MD: torch.Tensor, y_ND: torch.Tensor) -> torch.Tensor:
    m, n = x_MD.shape[0], y_ND.shape[0]
    k_xx_MM = polynomial_kernel(x_MD, x_MD)
    k_yy_NN = polynomial_kernel(y_ND, y_ND)
    # the diagonal k(x, x) is dropped: it is what makes the plain mean biased upwards
    within_x = (k_xx_MM.sum() - k_xx_MM.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy_NN.sum() - k_yy_NN.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2.0 * polynomial_kernel(x_MD, y_ND).mean()


def mmd2_unbiased(x_MD: Array, y_ND: Array) -> float:
    """One unbiased MMD² estimate between two whole sets (sizes may differ, each ≥ 2)."""
    x_MD = _features(x_MD, "x_MD", 2, "an unbiased MMD² estimate")
    y_ND = _features(y_ND, "y_ND", 2, "an unbiased MMD² estimate", x_MD.device)
    _same_width(x_MD, y_ND, "x_MD and y_ND")
    return float(_mmd2_unbiased(x_MD, y_ND))


def kid(feats_a: Array, feats_b: Array, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KIDResult:
    """KID: unbiased MMD² (cubic kernel), mean and std over `subsets` random subsets of each set."""
    if subsets < 1 or subset_size < 2:
        raise ValueError(
            f"kid needs subsets >= 1 and subset_size >= 2, got subsets={subsets}, subset_size={subset_size}"
        )
    a_ND = _features(feats_a, "feats_a", 2, "KID")
    b_ND = _features(feats_b, "feats_b", 2, "KID", a_ND.device)
    _same_width(a_ND, b_ND, "feats_a and feats_b")
    smallest = min(a_ND.shape[0], b_ND.shape[0])
    if smallest < subset_size:
        which = "feats_a" if a_ND.shape[0] == smallest else "feats_b"
        raise ValueError(
            f"KID subset_size={subset_size} but {which} has only {smallest} samples; "
            f"pass subset_size<={smallest} or evaluate at least {subset_size} samples per set"
        )
    # a CPU generator: the same seed picks the same subsets on every device
    gen = torch.Generator().manual_seed(seed)
    est_S = torch.empty(subsets, dtype=torch.float64)
    for s in range(subsets):
        idx_a = torch.randperm(a_ND.shape[0], generator=gen)[:subset_size].to(a_ND.device)
        idx_b = torch.randperm(b_ND.shape[0], generator=gen)[:subset_size].to(a_ND.device)
        est_S[s] = _mmd2_unbiased(a_ND[idx_a], b_ND[idx_b]).cpu()
    return KIDResult(float(est_S.mean()), float(est_S.std(correction=0)), subsets, subset_size)


# ----------------------------------------------------------------------------- precision / recall


def _sq_dists(a_RD: torch.Tensor, b_ND: torch.Tensor) -> torch.Tensor:
    """‖aᵢ − bⱼ‖² = ‖aᵢ‖² + ‖bⱼ‖² − 2 aᵢᵀbⱼ; rounding can dip below 0, hence the clamp."""
    d2_RN = a_RD @ b_ND.T
    # in place: one (R, N) buffer per block instead of three temporaries
    d2_RN.mul_(-2.0).add_(a_RD.square().sum(1, keepdim=True)).add_(b_ND.square().sum(1))
    return d2_RN.clamp_min_(0.0)


def _block_rows(cols: int, block_elems: int) -> int:
    return max(1, block_elems // max(cols, 1))


def _kth_neighbour_sq_dist(x_ND: torch.Tensor, k: int, block_elems: int) -> torch.Tensor:
    """r²_N: squared distance from each row to its k-th nearest other row (itself excluded)."""
    n = x_ND.shape[0]
    r2_N = torch.empty(n, dtype=x_ND.dtype, device=x_ND.device)
    rows = _block_rows(n, block_elems)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        d2_RN = _sq_dists(x_ND[start:stop], x_ND)
        # masking self explicitly: its computed distance need not be exactly 0, nor the smallest with duplicates
        local_R = torch.arange(stop - start, device=x_ND.device)
        d2_RN[local_R, local_R + start] = float("inf")
        r2_N[start:stop] = d2_RN.topk(k, dim=1, largest=False).values[:, -1]
    return r2_N


def precision_recall(
    real_ND: Array, fake_ND: Array, k: int = 3, *, block_elems: int = DIST_BLOCK_ELEMS
) -> PrecisionRecall:
    """k-NN manifold precision (fake inside real) and recall (real inside fake), Kynkäänniemi et al. 2019.

    Distances are formed `block_elems` float64 entries at a time; the cross distances are computed once
    and serve both directions.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 (the paper uses 3), got {k}")
    why = f"the k-th nearest neighbour with k={k}"
    real_ND = _features(real_ND, "real_ND", k + 1, why)
    fake_ND = _features(fake_ND, "fake_ND", k + 1, why, real_ND.device)
    _same_width(real_ND, fake_ND, "real_ND and fake_ND")
    # distances do not change under a common shift, and the matmul expansion loses digits when the
    # norms dwarf the distances: centring both sets on the real mean keeps the norms small
    shift_D = real_ND.mean(dim=0)
    real_ND, fake_ND = real_ND - shift_D, fake_ND - shift_D
    r2_real_R = _kth_neighbour_sq_dist(real_ND, k, block_elems)
    r2_fake_F = _kth_neighbour_sq_dist(fake_ND, k, block_elems)
    fake_covered_F = torch.zeros(fake_ND.shape[0], dtype=torch.bool, device=real_ND.device)
    real_covered_R = torch.zeros(real_ND.shape[0], dtype=torch.bool, device=real_ND.device)
    rows = _block_rows(real_ND.shape[0], block_elems)
    for start in range(0, fake_ND.shape[0], rows):
        d2_BR = _sq_dists(fake_ND[start : start + rows], real_ND)
        fake_covered_F[start : start + rows] = (d2_BR <= r2_real_R).any(dim=1)
        real_covered_R |= (d2_BR <= r2_fake_F[start : start + rows, None]).any(dim=0)
    return PrecisionRecall(float(fake_covered_F.double().mean()), float(real_covered_R.double().mean()), k)


# ----------------------------------------------------------------------------- class accuracy


def class_accuracy(logits_NC: Array, labels_N: Array) -> float:
    """Top-1 accuracy: share of rows whose largest logit is at the row's label."""
    logits_NC = _tensor(logits_NC, "logits_NC", 2)
    labels_N = labels_N if isinstance(labels_N, torch.Tensor) else torch.as_tensor(np.asarray(labels_N))
    n, c = logits_NC.shape
    if labels_N.shape != (n,):
        raise ValueError(
            f"labels_N must have shape ({n},) to match logits_NC {tuple(logits_NC.shape)}, "
            f"got {tuple(labels_N.shape)}; pass one class index per generated sample"
        )
    if labels_N.is_floating_point() or labels_N.is_complex() or labels_N.dtype == torch.bool:
        raise ValueError(f"labels_N must hold integer class indices, got {labels_N.dtype}; pass labels.long()")
    if n == 0:
        raise ValueError("class_accuracy got 0 samples; generate at least one per class")
    lo, hi = int(labels_N.min()), int(labels_N.max())
    if lo < 0 or hi >= c:
        raise ValueError(f"labels_N must lie in [0, {c}) for {c} logits per row, got {lo}..{hi}")
    return float((logits_NC.argmax(dim=1) == labels_N.to(logits_NC.device)).double().mean())

"""Evaluation of generated samples (docs EVAL.md): metrics on feature matrices.

`metrics` holds the pure functions (Fréchet distance, KID, k-NN precision / recall, class accuracy);
they take features, never images, so the same code serves the domain classifier's features and
Inception's.
"""

from __future__ import annotations

from moedit.eval.features import (
    FeatureClassifierError,
    LeNetClassifier,
    extract,
    load_feature_classifier,
)
from moedit.eval.metrics import (
    KIDResult,
    PrecisionRecall,
    class_accuracy,
    feature_stats,
    frechet_distance,
    kid,
    mmd2_unbiased,
    polynomial_kernel,
    precision_recall,
)

__all__ = [
    "FeatureClassifierError",
    "KIDResult",
    "LeNetClassifier",
    "PrecisionRecall",
    "class_accuracy",
    "extract",
    "feature_stats",
    "frechet_distance",
    "kid",
    "load_feature_classifier",
    "mmd2_unbiased",
    "polynomial_kernel",
    "precision_recall",
]

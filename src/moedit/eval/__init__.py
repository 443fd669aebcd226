"""Evaluation of generated samples (docs/EVALUATION.md): metrics on feature matrices.

`metrics` holds the pure functions (Fréchet distance, KID, k-NN precision / recall, class accuracy);
they take features, never images, so the same code serves the domain classifier's features and
Inception's. `evaluate_run` is the whole protocol for a run directory (sampling in `sampling`).
"""

from __future__ import annotations

from moedit.eval.evaluate import (
    DEFAULT_METRICS,
    METRICS,
    EvalContext,
    evaluate_run,
    open_run,
    register_metric,
    score_images,
)
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
from moedit.eval.sampling import EvalError, EvalSettings, batch_seed, class_balanced_labels

__all__ = [
    "DEFAULT_METRICS",
    "EvalContext",
    "EvalError",
    "EvalSettings",
    "FeatureClassifierError",
    "KIDResult",
    "LeNetClassifier",
    "METRICS",
    "PrecisionRecall",
    "batch_seed",
    "class_accuracy",
    "class_balanced_labels",
    "evaluate_run",
    "extract",
    "feature_stats",
    "frechet_distance",
    "kid",
    "load_feature_classifier",
    "mmd2_unbiased",
    "open_run",
    "polynomial_kernel",
    "precision_recall",
    "register_metric",
    "score_images",
]

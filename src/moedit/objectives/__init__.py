"""Training objectives. Each has `loss(model_fn, x0_BCHW, y_B, generator=None, pass_target=False) -> (loss, info)`
(pass_target: call model_fn(..., target=training_target) for per-layer regularisation heads),
`interpolate`, `target`, a `prediction_kind` the samplers check, and never imports the model."""

from __future__ import annotations

from moedit.config import ObjectiveConfig
from moedit.objectives.ddpm import DDPM
from moedit.objectives.rectified_flow import RectifiedFlow

OBJECTIVES = {"rectified_flow": RectifiedFlow, "ddpm": DDPM}


def build_objective(cfg: ObjectiveConfig) -> RectifiedFlow | DDPM:
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"objective.name={cfg.name!r} is unknown; choose one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[cfg.name](cfg)

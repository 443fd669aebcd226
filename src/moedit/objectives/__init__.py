"""Training objectives: each has loss(model_fn, x0_BCHW, y_B) -> (loss, info) and never imports the model."""

from __future__ import annotations

from moedit.config import ObjectiveConfig
from moedit.objectives.ddpm import DDPM
from moedit.objectives.rectified_flow import RectifiedFlow

OBJECTIVES = {"rectified_flow": RectifiedFlow, "ddpm": DDPM}


def build_objective(cfg: ObjectiveConfig):
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"objective {cfg.name!r} is unknown; choose one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[cfg.name](cfg)

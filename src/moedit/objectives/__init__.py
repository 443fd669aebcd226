"""Training objectives, one per file, each an `Objective` (base.py: the shared regression loss
`loss(model_fn, x0_BCHW, y_B, generator=None, pass_target=False) -> (loss, info)`) with its own
`training_target`, `interpolate`, `target` and a `prediction_kind` the samplers check; none imports the model."""

from __future__ import annotations

from moedit.config import ObjectiveConfig
from moedit.objectives.base import Objective
from moedit.objectives.ddpm import DDPM
from moedit.objectives.rectified_flow import RectifiedFlow

OBJECTIVES = {"rectified_flow": RectifiedFlow, "ddpm": DDPM}


def build_objective(cfg: ObjectiveConfig) -> Objective:
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"objective.name={cfg.name!r} is unknown; choose one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[cfg.name](cfg)

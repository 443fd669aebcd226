"""Samplers: each has sample(model_fn, noise_BCHW, y_B, steps, progress) -> x0_BCHW (float32)."""

from __future__ import annotations

from moedit.samplers.ddim import DDIMSampler
from moedit.samplers.ddpm import DDPMSampler
from moedit.samplers.euler import EulerSampler
from moedit.samplers.heun import HeunSampler

# sampler name -> (class, the objective it integrates)
SAMPLERS = {
    "euler": (EulerSampler, "velocity"),
    "heun": (HeunSampler, "velocity"),
    "ddpm": (DDPMSampler, "epsilon"),
    "ddim": (DDIMSampler, "epsilon"),
}


def build_sampler(name: str, objective):
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is unknown; choose one of: {', '.join(SAMPLERS)}")
    cls, kind = SAMPLERS[name]
    if objective is not None and objective.prediction_kind != kind:
        fits = [n for n, (_, k) in SAMPLERS.items() if k == objective.prediction_kind]
        raise ValueError(f"sampler {name!r} does not fit a {objective.prediction_kind}-prediction objective; "
                         f"choose one of: {', '.join(fits)}")
    return cls(objective)

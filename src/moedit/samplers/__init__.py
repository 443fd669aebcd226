"""Samplers: each has `sample(model_fn, noise_BCHW, y_B, steps, progress=False) -> x0_BCHW` (float32).

euler and heun integrate a velocity (rectified flow); ddpm and ddim denoise with an ε-prediction (DDPM).
"""

from __future__ import annotations

from moedit.samplers.ddim import DDIMSampler
from moedit.samplers.ddpm import DDPMSampler
from moedit.samplers.euler import EulerSampler
from moedit.samplers.heun import HeunSampler

# sampler name -> (class, the objective.prediction_kind it needs)
SAMPLERS = {
    "euler": (EulerSampler, "velocity"),
    "heun": (HeunSampler, "velocity"),
    "ddpm": (DDPMSampler, "epsilon"),
    "ddim": (DDIMSampler, "epsilon"),
}


def samplers_for(objective) -> list[str]:
    return [name for name, (_, kind) in SAMPLERS.items() if kind == objective.prediction_kind]


def build_sampler(name: str, objective, **options):
    """The sampler `name` for `objective`; options go to its constructor (e.g. eta=0.5 for ddim)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is unknown; choose one of: {', '.join(SAMPLERS)}")
    cls, kind = SAMPLERS[name]
    if objective is None:
        if kind != "velocity":  # the DDPM chain needs the objective's ᾱ schedule
            raise ValueError(f"sampler {name!r} needs the DDPM objective it samples; pass it as `objective`")
    elif objective.prediction_kind != kind:
        raise ValueError(f"sampler {name!r} does not fit a {objective.prediction_kind}-prediction objective "
                         f"({type(objective).__name__}); choose one of: {', '.join(samplers_for(objective))}")
    return cls(objective, **options)

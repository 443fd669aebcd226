"""Classifier-free guidance as a wrapper around model_fn (Ho & Salimans, arXiv 2207.12598):

    f̃(x, t, y) = f(x, t, ∅) + s·(f(x, t, y) − f(x, t, ∅))

The conditional and unconditional halves run in one batched call. With an interval [t_lo, t_hi]
(Kynkäänniemi et al., arXiv 2404.07724) guidance applies only where t_lo ≤ t ≤ t_hi and the plain
conditional prediction is used elsewhere. s = 1 returns model_fn unchanged (no extra batch).
"""

from __future__ import annotations

import torch


def classifier_free_guidance(model_fn, scale: float, null_label: int, interval: tuple[float, float] | None = None):
    if scale == 1.0:
        return model_fn

    def guided(x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
        B = x_BCHW.shape[0]
        y_null = torch.full_like(y_B, null_label)
        out = model_fn(torch.cat([x_BCHW, x_BCHW]), torch.cat([t_B, t_B]), torch.cat([y_B, y_null]))
        cond, uncond = out[:B], out[B:]
        guided_out = uncond + scale * (cond - uncond)
        if interval is None:
            return guided_out
        inside_B = (t_B >= interval[0]) & (t_B <= interval[1])
        return torch.where(inside_B.view(-1, *([1] * (x_BCHW.ndim - 1))), guided_out, cond)

    return guided

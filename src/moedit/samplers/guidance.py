"""Classifier-free guidance as a wrapper around model_fn (Ho & Salimans, arXiv 2207.12598 eq. 6):

    f̃(x, t, y) = f(x, t, ∅) + s·(f(x, t, y) − f(x, t, ∅))

for any prediction f (velocity or ε: the combination is linear, so it means the same for both). The
conditional and unconditional halves run in ONE model call on a doubled batch whose second half has
the null label ∅. With an interval [t_lo, t_hi] (guidance interval, Kynkäänniemi et al., arXiv
2404.07724) guidance applies only to samples with t_lo ≤ t ≤ t_hi, the others get the plain
conditional prediction; when no sample of a call is inside, the unconditional half is skipped.
s = 1 returns model_fn itself (no extra batch). The output is float32.

`channels` = n guides only the first n channels and keeps the conditional prediction in the others:
facebookresearch/DiT's sampling guides 3 of its 4 latent channels (its `forward_with_cfg`; the published
FIDs were made so), so n = 3 reproduces it for an imported DiT checkpoint. The default guides all.
"""

from __future__ import annotations

import torch


def classifier_free_guidance(model_fn, scale: float, null_label: int,
                             interval: tuple[float, float] | None = None, channels: int | None = None):
    if interval is not None:
        t_lo, t_hi = interval
        if not t_lo <= t_hi:
            raise ValueError(f"sample.cfg_interval=[{t_lo}, {t_hi}] must have t_lo <= t_hi (times in [0, 1])")
    if scale == 1.0:
        return model_fn

    def guided(x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
        inside_B = None
        if interval is not None:
            inside_B = (t_B >= interval[0]) & (t_B <= interval[1])
            if not bool(inside_B.any()):  # a host sync per step, cheap next to the forward it saves
                return model_fn(x_BCHW, t_B, y_B).float()
        B = x_BCHW.shape[0]
        y_null_B = torch.full_like(y_B, null_label)
        out_BCHW = model_fn(torch.cat([x_BCHW, x_BCHW]), torch.cat([t_B, t_B]), torch.cat([y_B, y_null_B]))
        # float32: cond − uncond is a small difference of large values that bf16 would quantise
        cond_BCHW, uncond_BCHW = out_BCHW[:B].float(), out_BCHW[B:].float()
        guided_BCHW = uncond_BCHW + scale * (cond_BCHW - uncond_BCHW)
        if channels is not None:
            guided_BCHW = torch.cat([guided_BCHW[:, :channels], cond_BCHW[:, channels:]], dim=1)
        if inside_B is None:
            return guided_BCHW
        return torch.where(inside_B.view(-1, *([1] * (x_BCHW.ndim - 1))), guided_BCHW, cond_BCHW)

    return guided

"""Inference thresholds kept as an exponential moving average of per-step batch values.

Race-DiT's τ̂ (docs/ROUTING_MATH.md §4.4) and DiffMoE's θ_e (§4.3) are learned the same way: during training a
router observes the batch value of its threshold at every forward (τ_batch, or each expert's C-th
largest predictor probability); after each optimizer step the values observed over the step are
averaged — summed across data-parallel ranks by the caller's `reduce_fn` — and folded in once:

    v ← mean_step                      at the first update (first="take": Race-DiT's τ̂)
    v ← β · v + (1 − β) · mean_step    afterwards, and from the start with first="blend" (DiffMoE's θ_e,
                                       which starts at 0 and always blends, as DiffMoE's code)

so every rank holds the same threshold. Nothing is observed in eval(); the threshold is a buffer,
saved with the model and copied into the EMA model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moedit.moe.replay import replaying


class StepThreshold(nn.Module):
    def __init__(self, size: int, decay: float, initial: float = 0.0, first: str = "take"):
        super().__init__()
        if first not in ("take", "blend"):
            raise ValueError(f"first={first!r}: the first update either takes the step's value or blends it in")
        self.decay, self.first = decay, first
        self.register_buffer("value_X", torch.full((size,), float(initial)))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        # what the current optimizer step observed; zero between steps, so not saved
        self.register_buffer("step_sum_X", torch.zeros(size), persistent=False)
        self.register_buffer("step_count", torch.zeros(()), persistent=False)
        self._observed = 0  # host-side count, so that update() needs no device sync to skip

    @torch.no_grad()
    def observe(self, batch_value_X: torch.Tensor) -> None:
        if replaying():  # activation checkpointing's second forward: observed once already (moe/replay.py)
            return
        self.step_sum_X += batch_value_X.detach().float().reshape(self.step_sum_X.shape)
        self.step_count += 1
        self._observed += 1

    @torch.no_grad()
    def update(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if self._observed == 0:
            return
        packed = torch.cat([self.step_sum_X, self.step_count[None]])
        if reduce_fn is not None:
            packed = reduce_fn(packed)
        mean_X = packed[:-1] / packed[-1]
        blended_X = self.decay * self.value_X + (1 - self.decay) * mean_X
        if self.first == "blend":
            self.value_X.copy_(blended_X)
        else:
            self.value_X.copy_(torch.where(self.updates == 0, mean_X, blended_X))
        self.updates += 1
        self.step_sum_X.zero_()
        self.step_count.zero_()
        self._observed = 0

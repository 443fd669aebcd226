"""bf16 update underflow: how much of each optimizer step the stored weights actually took
(docs/ROUTING_MATH.md §7.4, the "bf16 trap", arXiv 2605.19378).

bfloat16 keeps 8 significant bits, so a weight w (a bf16 value, 2^k ≤ |w| < 2^(k+1)) can only move in
steps of ulp(w) = 2^(k−7). Storing w + Δw rounds to the nearest bf16 value, which is w itself when

    |Δw| < ½·ulp(w)        (≤ at a tie, which goes to the even mantissa; ¼·ulp(w) when Δw points
                            towards zero from a power of two, where the grid below is twice as fine)

so such an update is *lost*: the optimizer meant to move the weight and nothing happened. Adam's
step is at most ≈ lr, so at DiT's lr = 1e-4 every weight with |w| ≥ 2^-5 ≈ 0.031 (½·ulp = 1.2e-4)
loses every step. A router's logits are differences of such weights, so when its updates are lost the
routing stops adapting (docs/PRECISION.md measures it on the quickstart).

Definitions, per parameter group (`param_group`: router, prototypes, experts, rest) and pooled over
the elements of every measured step since the last read:

    Δw          = w_intended − w_old: the update the optimizer computed, in float32 (for bf16-stored
                  weights the optimizer's float32 work copy, train/bf16.py; otherwise the new weights)
    moved       = elements with Δw ≠ 0. A zero update is neither lost nor kept: it is counted apart
                  (`update_zero/<group>` = zero / all elements) and left out of the fractions below.
    bf16_lost   = moved elements with bf16(bf16(w_old) + Δw) = bf16(w_old), / moved: the fraction
                  that bf16 storage with round-to-nearest-even *would* lose. It is the exact form of
                  the ½-ulp test above (sum formed in float32), and the same formula whatever the
                  weights are really stored in, so a float32 run can be checked before switching.
    update_lost = moved elements whose stored value did not change (w_new = w_old), / moved: what
                  the real storage lost (0 for float32 weights, whose Δw is the change itself; equal
                  to bf16_lost under bf16 round-to-nearest; random under stochastic rounding).
    update_kept = Σ sign(Δw)·(w_new − w_old) / Σ |Δw| over moved elements: the share of the intended
                  update the stored weights realised (1 in float32; < 1 when updates are lost; ≈ 1
                  in expectation under stochastic rounding even though most single steps are lost).

Cost at a measured step: one copy of the parameters before the optimizer step and a few
elementwise passes after it; the counts stay on the device until `read()` (one sync per group).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

GROUPS = ("router", "prototypes", "experts", "rest")


def param_group(name: str) -> str:
    """The group of a parameter by its name in the model: ProMoE's `prototypes_ED`; anything under a
    `.router.` (gates, selection biases, race's target heads, DiffMoE's capacity predictors); routed
    and shared experts (`.moe.experts.`, `.moe.shared.`); everything else (attention, adaLN, embeddings)."""
    dotted = "." + name
    if dotted.endswith(".prototypes_ED"):
        return "prototypes"
    if ".router." in dotted:
        return "router"
    if ".moe.experts." in dotted or ".moe.shared." in dotted:
        return "experts"
    return "rest"


def bf16_ulp(w: torch.Tensor) -> torch.Tensor:
    """ulp(w) = 2^(⌊log2|w|⌋ − 7): the bf16 spacing above |w| (2^-133, the subnormal step, at 0)."""
    _, exponent = torch.frexp(w.float())  # |w| = m·2^exponent, m ∈ [0.5, 1)
    step = (exponent - 8).clamp_min(-133)
    step = torch.where(w == 0, torch.full_like(step, -133), step)
    return torch.ldexp(torch.ones_like(w, dtype=torch.float32), step)


def bf16_lost_mask(w_old: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """True where Δw ≠ 0 but storing bf16(w_old) + Δw in bf16 (round to nearest even) gives back bf16(w_old)."""
    w_bf16 = w_old.to(torch.bfloat16)
    return (dw != 0) & ((w_bf16.float() + dw.float()).to(torch.bfloat16) == w_bf16)


def update_counts(w_old: torch.Tensor, w_intended: torch.Tensor, w_new: torch.Tensor) -> torch.Tensor:
    """(moved, zero, lost_bf16, lost, kept_num, kept_den) of one tensor, float64, on its device."""
    dw = w_intended.float() - w_old.float()
    moved = dw != 0
    lost = moved & (w_new == w_old)
    realised = (w_new.float() - w_old.float()) * dw.sign()
    return torch.stack([
        moved.sum(dtype=torch.float64),
        (~moved).sum(dtype=torch.float64),
        bf16_lost_mask(w_old, dw).sum(dtype=torch.float64),
        lost.sum(dtype=torch.float64),
        realised.sum(dtype=torch.float64),
        dw.abs().sum(dtype=torch.float64),
    ])


def counts_to_metrics(group: str, counts: list[float]) -> dict[str, float]:
    moved, zero, lost_bf16, lost, kept_num, kept_den = counts
    out = {f"update_zero/{group}": zero / max(moved + zero, 1.0)}
    if moved > 0:  # no element moved: the fractions are undefined, so they are left out
        out[f"bf16_lost/{group}"] = lost_bf16 / moved
        out[f"update_lost/{group}"] = lost / moved
        out[f"update_kept/{group}"] = kept_num / kept_den
    return out


class PrecisionMonitor:
    """Measures every `every`-th optimizer step (0 = never): call `before_step(step)` just before
    `optimizer.step()`, `after_step()` just after it, and `read()` when logging.

    `intended(p)` gives the float32 value the optimizer computed for parameter p; by default p itself
    (float32 storage). A `Bf16StorageOptimizer` provides its work copies (`intended_value`).
    """

    def __init__(self, model: nn.Module, every: int,
                 intended: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.every = every
        self.params = [(param_group(n), p) for n, p in model.named_parameters() if p.requires_grad]
        self.intended = intended or (lambda p: p)
        self._old: list[torch.Tensor] | None = None
        self._totals: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        if self.every > 0 and step % self.every == 0:
            self._old = [p.detach().clone() for _, p in self.params]

    @torch.no_grad()
    def after_step(self) -> None:
        if self._old is None:
            return
        for (group, p), w_old in zip(self.params, self._old):
            counts = update_counts(w_old, self.intended(p), p.detach())
            self._totals[group] = self._totals[group] + counts if group in self._totals else counts
        self._old = None

    def read(self) -> dict[str, float]:
        """The metrics pooled over the steps measured since the last read ({} if none), then reset."""
        out: dict[str, float] = {}
        for group in GROUPS:
            if group in self._totals:
                out.update(counts_to_metrics(group, self._totals[group].tolist()))
        self._totals = {}
        return out

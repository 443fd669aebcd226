"""Parameter storage in bfloat16 and the remedies for the bf16 trap (docs/ROUTING_MATH.md §7.4,
docs/PRECISION.md).

`train.param_dtype` says what the parameters are *stored* in; `train.precision` what the forward
computes in (autocast):

- `fp32` (default): float32 parameters are the master weights; under precision=bf16 autocast makes
  a bf16 copy of each weight for its matmul, and the optimizer adds every update to the float32 value,
  so nothing is lost however small it is.
- `bf16`: the parameters themselves are bfloat16 (half the weight memory, no per-op casts). Buffers
  (selection biases, EMA thresholds) stay float32: they are updated by tiny steps too. Each optimizer
  step runs in float32 on a work copy (`Bf16StorageOptimizer`): w32 = float(w), AdamW on w32 with
  float32 moments, then w ← round(w32). Round to nearest loses every |Δw| < ½·ulp(w)
  (diagnostics/precision.py). Two remedies, combinable:
    · `router_fp32` (default true): router and prototype parameters stay float32 (they are tiny);
    · `stochastic_rounding`: w ← SR(w32), which is unbiased, E[SR(x)] = x, so an update of a tenth of
      an ulp moves the weight by one ulp one step in ten: the drift survives in expectation.

The AdamW moments are float32 in both storages [choice]: bf16 moments would add a second trap (the
second moment's (1 − β2)·g² increments vanish the same way), and the experiment isolates the weights.
The work copy is rewritten from the stored weights at every step, so unlike a master weight it
carries nothing between steps. Gradients of bf16 weights are bf16 (also across grad_accum micro-steps).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moedit.config import ConfigError, TrainConfig
from moedit.diagnostics.precision import param_group

_ROUTING_GROUPS = ("router", "prototypes")


def store_parameters(model: nn.Module, cfg: TrainConfig, amp_dtype: torch.dtype | None) -> None:
    """Cast the parameters (not the buffers) to `cfg.param_dtype` in place, keeping router and
    prototype parameters float32 when `cfg.router_fp32`. Call before building the optimizer and EMA."""
    if cfg.param_dtype == "fp32":
        return
    if amp_dtype != torch.bfloat16:
        raise ConfigError(
            f"train.param_dtype=bf16 needs bf16 compute, but train.precision={cfg.precision} resolves to float32 "
            "on this device (auto is float32 on CPU); set train.precision=bf16, or train.param_dtype=fp32"
        )
    for name, param in model.named_parameters():
        if cfg.router_fp32 and param_group(name) in _ROUTING_GROUPS:
            continue
        param.data = param.data.to(torch.bfloat16)


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 → bfloat16, rounding up or down at random with P(up) = (x − down) / ulp, so E[SR(x)] = x.

    bf16 is the top 16 bits of the float32 pattern. Adding a uniform integer r ∈ [0, 2^16) to the
    pattern and clearing the low 16 bits carries into the kept bits exactly when r ≥ 2^16 − low, i.e.
    with probability low / 2^16 (the magnitude grows: the sign bit is separate). The cleared pattern is
    a bf16 value, so the final cast is exact. inf stays inf; NaN is passed through the plain cast.
    """
    bits = x.float().contiguous().view(torch.int32)
    r = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + r) & -65536).view(torch.float32)  # -65536 == 0xFFFF0000 as int32
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


class Bf16StorageOptimizer:
    """Runs a float32 optimizer for low-precision parameters, then rounds back into their storage.

    Other parameters (float32: the router under `router_fp32`) are handed to the inner optimizer as they are.
    Each bf16 parameter gets a float32 work tensor w32 that stands in for it inside the inner optimizer
    (so the moments and the state dict are float32 and keyed like a plain AdamW's); `step()` copies the
    weights and gradients in, steps, and writes back rounded to nearest or stochastically.

    Stochastic rounding draws from a generator seeded by (seed, rounding_step); the step count lives
    in the first param group, so it is saved in checkpoints (exact resume), and every data-parallel
    rank draws the same bits (replicas stay identical).
    """

    def __init__(self, groups: list[dict], make_inner: Callable[[list[dict]], torch.optim.Optimizer],
                 stochastic: bool = False, seed: int = 0):
        self.stochastic, self.seed = stochastic, seed
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._work_of: dict[int, torch.Tensor] = {}
        inner_groups = []
        for group in groups:
            params = [self._work_for(p) if p.dtype == torch.bfloat16 else p for p in group["params"]]
            inner_groups.append({**group, "params": params})
        self.inner = make_inner(inner_groups)
        self.inner.param_groups[0].setdefault("rounding_step", 0)

    def _work_for(self, param: torch.Tensor) -> torch.Tensor:
        work = param.detach().float().clone()
        self.pairs.append((param, work))
        self._work_of[id(param)] = work
        return work

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def intended_value(self, param: torch.Tensor) -> torch.Tensor:
        """The float32 value the last step computed for `param` (before rounding into its storage)."""
        return self._work_of.get(id(param), param)

    @torch.no_grad()
    def step(self) -> None:
        for param, work in self.pairs:
            work.copy_(param)  # exact: every bf16 value is a float32 value
            work.grad = param.grad.float() if param.grad is not None else None
        self.inner.step()
        generator = self._generator() if self.stochastic else None
        for param, work in self.pairs:
            if work.grad is None:
                continue  # no gradient: the inner optimizer left it alone
            param.copy_(stochastic_round_bf16(work, generator) if self.stochastic else work)
            work.grad = None
        self.inner.param_groups[0]["rounding_step"] += 1

    def _generator(self) -> torch.Generator:
        device = self.pairs[0][1].device if self.pairs else torch.device("cpu")
        step = self.inner.param_groups[0]["rounding_step"]
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for param, _ in self.pairs:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)
        self.inner.param_groups[0].setdefault("rounding_step", 0)

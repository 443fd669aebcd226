"""The contract every router keeps, as a base class: what the rest of moedit asks a router instead of
branching on its name.

A router is built as `cls(width, num_experts, cfg, target_dim=...)` (`target_dim`: the patchified
training target's width p²·C, for routers with a target head) and returns a `Routing` from
`forward(x_ND, ctx)`. Besides, it states in class attributes and class methods:

- DEFAULTS: values for the RouterConfig fields left null (gate, score, threshold_decay);
- AUX_LOSSES: the auxiliary losses it may emit, by name, with the default weight of each (the trainer
  weighs them; `train.aux_weights` overrides). One name means one loss: two routers that emit the same
  name must give it the same default weight (the registry checks). The model sums each loss over
  its MoE layers, as the peers do, so a published weight means what its paper says;
- AUX_MEAN_OVER_LAYERS: the losses among them that their paper defines as a mean over the MoE layers
  instead (Race's per-layer regularisation), which the model averages;
- EXTRA_EXPERTS: routed experts it adds beyond model.moe.num_experts (ProMoE's unconditional one);
- experts_per_token(cfg): the average number of routed experts a token runs through, for activated
  parameter counts (k for token choice, the capacity factor for capacity routers);
- conversion_exactness(moe, slices, zero_gate): whether a dense→MoE conversion with this router
  reproduces the dense model to float tolerance, and why (docs/ROUTING_MATH.md §6; docs/CONVERT.md);
- describe(cfg): its settings in one line, for logs;
- config_warnings(moe): settings that run but probably do not do what was meant, printed at the start;
- wants_target: whether its forward uses the training target (Race's per-layer regularisation head);
- after_optimizer_step(reduce_fn): statistics taken over an optimizer step (a selection bias, an EMA
  threshold), reduced across data-parallel ranks by `reduce_fn`.

A new router is one file with a subclass of `Router` plus one line in the registry
(`moe/routers/__init__.py`); nothing outside knows its name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from moedit.config import MoEConfig, RouterConfig


class Router(nn.Module):
    DEFAULTS: ClassVar[dict] = {}
    AUX_LOSSES: ClassVar[dict[str, float]] = {}
    AUX_MEAN_OVER_LAYERS: ClassVar[frozenset[str]] = frozenset()
    EXTRA_EXPERTS: ClassVar[int] = 0

    @classmethod
    def experts_per_token(cls, cfg: RouterConfig) -> float:
        """Average routed experts per token (token choice: k)."""
        return cfg.top_k

    @classmethod
    def conversion_exactness(cls, moe: MoEConfig, slices: int, zero_gate: bool) -> tuple[bool, str]:
        """(exact, reason) for a dense FFN converted into `moe` with experts made of `slices` hidden slices
        (1: full copies) and, if `zero_gate`, a zeroed gate head. Routers that cannot be exact say why."""
        return False, f"router {cls.__name__} states no exactness rule; assume it is not exact"

    @classmethod
    def describe(cls, cfg: RouterConfig) -> str:
        return f"top_k={cfg.top_k} score={cfg.score}"

    @classmethod
    def config_warnings(cls, moe: MoEConfig) -> list[str]:
        """Settings that run but probably do not do what was meant (e.g. a weight that cannot train);
        the trainer prints each once at the start."""
        return []

    @property
    def wants_target(self) -> bool:
        return False

    def after_optimizer_step(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Nothing to update by default."""

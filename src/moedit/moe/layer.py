"""The MoE feed-forward layer: router → Routing → dispatch → routed experts (+ shared experts).

    y_i = Σ_{(i,e,w) ∈ routing} w · Expert_e(x_i) + Σ_s Shared_s(x_i)

The layer keeps the last `Routing` it produced (`last_routing`) so the trainer can read the named
auxiliary losses and the diagnostics can read loads and scores without a second forward; a forward
replayed by activation checkpointing (moe/replay.py) leaves it as the first forward set it.

`dispatch_fn` executes the routing: `moe.dispatch.dispatch` on one process; expert parallelism
(distributed/expert_parallel.py) replaces it with an exchange of rows between the ranks that hold the
experts, behind the same call.
"""

from __future__ import annotations

import torch
from torch import nn

from moedit.config import MoEConfig
from moedit.moe.dispatch import dispatch
from moedit.moe.experts import StackedExperts
from moedit.moe.replay import replaying
from moedit.moe.routers import build_router, extra_experts
from moedit.moe.routing import Routing, RoutingContext


def expert_hidden(width: int, ratio: float) -> int:
    return max(1, int(round(ratio * width)))


class MoELayer(nn.Module):
    def __init__(self, width: int, cfg: MoEConfig, ffn_kind: str = "mlp", target_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.router = build_router(width, cfg.num_experts, cfg.router, target_dim=target_dim)
        # routed experts: the configured ones plus any the router adds (ProMoE's unconditional expert)
        num_routed = cfg.num_experts + extra_experts(cfg.router.name)
        self.experts = StackedExperts(num_routed, width, expert_hidden(width, cfg.expert_ratio), ffn_kind,
                                       cfg.expert_layout)
        self.shared: StackedExperts | None = None
        if cfg.num_shared > 0:
            shared_ratio = cfg.shared_ratio if cfg.shared_ratio is not None else cfg.expert_ratio
            self.shared = StackedExperts(cfg.num_shared, width, expert_hidden(width, shared_ratio), ffn_kind,
                                          cfg.expert_layout)
        self.last_routing: Routing | None = None
        self.dispatch_fn = dispatch

    def forward(self, x_BLD: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        B, L, D = x_BLD.shape
        x_ND = x_BLD.reshape(B * L, D)
        routing = self.router(x_ND, ctx)
        y_ND = self.dispatch_fn(x_ND, routing, self.experts, self.cfg.backend)
        if self.shared is not None:
            y_ND = y_ND + self.shared.forward_all(x_ND).to(y_ND.dtype)
        if not replaying():
            self.last_routing = routing
        return y_ND.view(B, L, D)

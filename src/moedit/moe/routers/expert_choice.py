"""Expert choice per sample — `expert_choice` (EC-DiT, Sun et al., arXiv 2410.02098 §3.1; expert
choice routing, Zhou et al., arXiv 2202.09368).

Within each sample b (L tokens), every expert picks its C highest-scoring tokens along the sequence:

    S = gate(x) ∈ R^{N×E},  s = score(S) (softmax over experts by default)
    C = clamp(⌊capacity · L / E⌋, 1, L)           capacity defaults to top_k (experts per token on average)
    T_{b,e} = top-C_{i ∈ sample b} s_{i,e},       w_{i,e} = s_{i,e}  for i ∈ T_{b,e}

A token gets 0..E experts; every expert gets exactly C tokens per sample, so no balance loss is
needed (`z` is still returned, weight 0 by default). Train and eval route identically, and because
the competition is inside one sample, a sample's routing never depends on the rest of the batch
(CFG's doubled batch included).
"""

from __future__ import annotations

import torch

from moedit.config import MoEConfig, RouterConfig
from moedit.moe.gates import Gate, score
from moedit.moe.losses import router_z_loss
from moedit.moe.routers.base import Router
from moedit.moe.routing import Routing, RoutingContext


def expert_capacity(capacity: float, pool: int, num_experts: int) -> int:
    """C = ⌊capacity · pool / E⌋, at least 1 and at most the pool."""
    return max(1, min(pool, int(capacity * pool / num_experts)))


class ExpertChoiceRouter(Router):
    DEFAULTS = {"gate": "linear", "score": "softmax"}
    AUX_LOSSES = {"z": 0.0}

    @classmethod
    def experts_per_token(cls, cfg: RouterConfig) -> float:
        """The capacity factor: C = capacity·L/E tokens per expert is capacity experts per token on average."""
        return cfg.capacity if cfg.capacity is not None else cfg.top_k

    @classmethod
    def conversion_exactness(cls, moe: MoEConfig, slices: int, zero_gate: bool) -> tuple[bool, str]:
        r, E = moe.router, moe.num_experts
        capacity = r.capacity if r.capacity is not None else r.top_k
        if capacity < E:
            return False, (f"expert choice with capacity {capacity:g} < num_experts={E} gives a token 0..E experts, "
                           "so its weights need not sum to 1")
        if r.score != "softmax":
            return False, f"every expert takes every token, but {r.score} scores over all experts need not sum to 1"
        if slices > 1 and not (zero_gate and E == slices):
            return False, f"slices need equal weights 1/{slices} on exactly {slices} experts: use --zero-gates and E = S"
        return True, "capacity = num_experts: every expert takes every token and the softmax over all experts sums to 1"

    def __init__(self, width: int, num_experts: int, cfg: RouterConfig, target_dim: int | None = None):
        super().__init__()
        self.num_experts, self.cfg = num_experts, cfg
        self.gate = Gate(width, num_experts, cfg)

    def forward(self, x_ND: torch.Tensor, ctx: RoutingContext) -> Routing:
        B, L, E = ctx.batch, ctx.seq_len, self.num_experts
        C = expert_capacity(self.cfg.capacity or self.cfg.top_k, L, E)
        logits_NE = self.gate(x_ND, ctx)
        scores_NE = score(logits_NE, self.cfg.score)
        scores_BEL = scores_NE.view(B, L, E).transpose(1, 2)
        pick_BEC = scores_BEL.detach().topk(C, dim=-1).indices  # token position within its sample
        weight_BEC = scores_BEL.gather(-1, pick_BEC)
        token_BEC = pick_BEC + (torch.arange(B, device=x_ND.device) * L)[:, None, None]
        expert_BEC = torch.arange(E, device=x_ND.device)[None, :, None].expand(B, E, C)
        expert_M = expert_BEC.reshape(-1)
        return Routing.from_assignments(token_BEC.reshape(-1), expert_M, weight_BEC.reshape(-1), B * L, E,
                                        {"z": router_z_loss(logits_NE)}, scores_NE)

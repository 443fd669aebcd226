"""Batch-level global token pool with a capacity predictor — `diffmoe` (DiffMoE, Shi et al.,
arXiv 2503.14487 §3.2-3.3).

Training (`train()`): the pool is all N tokens of the local batch. With s = softmax(gate(x)):

    C = clamp(⌊capacity · N / E⌋, 1, N)        capacity defaults to top_k
    T_e = top-C_{i ∈ [N]} s_{i,e},  M_{i,e} = [i ∈ T_e],  w_{i,e} = s_{i,e}

A capacity predictor P (2-layer MLP D→D→E with SiLU between, as DiffMoE's code, on the *detached*
tokens, so it never steers the backbone) learns the selection: aux `capacity` = BCE-with-logits(P(x), M).
Each expert keeps a threshold θ_e that starts at 0 and blends in 5% (decay 0.95) of the C-th largest
σ(P(x))_{·,e} of each training step, as DiffMoE's code does at each training forward
(moe/threshold.py: once per optimizer step, from the step's mean over micro-batches and data-parallel
ranks — the same update with one micro-batch on one process).

Inference (`eval()`), dynamic and batch-independent: expert e takes every token whose predicted
probability exceeds its threshold, M_{i,e} = [σ(P(x_i))_e > θ_e], with the gate score as weight.
[choice] The paper ranks tokens by gate score inside a predicted per-batch capacity; a per-token
threshold is the form that keeps a sample's output independent of its batch (CFG doubles the batch),
so it is the default. Compute per sample varies with the input. Before the first optimizer step θ_e = 0
(every token to every expert, as DiffMoE's untrained threshold).

`capacity_inference: topk` is DiffMoE's released inference instead, for its checkpoints (moedit import):
expert e takes k_e = |{i : σ(P(x_i))_e > θ_e}| tokens, the k_e with the highest gate scores s_ie, from
the pool of one forward call; conditional and null-label samples form separate pools, as DiffMoE's
sampler runs them in separate calls while moedit's guidance runs them in one. A sample's routing then
depends on the other samples of its pool.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moedit.config import MoEConfig, RouterConfig
from moedit.moe.gates import Gate, linear_f32, score
from moedit.moe.losses import router_z_loss
from moedit.moe.routers.base import Router
from moedit.moe.routers.expert_choice import expert_capacity
from moedit.moe.routing import Routing, RoutingContext
from moedit.moe.threshold import StepThreshold


class CapacityPredictor(nn.Module):
    def __init__(self, width: int, hidden: int, num_experts: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, num_experts)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        # float32 outside autocast, like the gate; detached input: the BCE trains the predictor only
        with torch.autocast(x_ND.device.type, enabled=False):
            return linear_f32(self.fc2, F.silu(linear_f32(self.fc1, x_ND.detach())))


class DiffMoERouter(Router):
    DEFAULTS = {"gate": "linear", "score": "softmax", "threshold_decay": 0.95}
    AUX_LOSSES = {"z": 0.0, "capacity": 1.0}  # DiffMoE's capacity-predictor BCE at weight 1

    @classmethod
    def experts_per_token(cls, cfg: RouterConfig) -> float:
        """The capacity factor (training: C = capacity·N/E tokens per expert from the global pool)."""
        return cfg.capacity if cfg.capacity is not None else cfg.top_k

    @classmethod
    def conversion_exactness(cls, moe: MoEConfig, slices: int, zero_gate: bool) -> tuple[bool, str]:
        if slices == 1 and moe.router.score == "softmax":
            return True, ("θ_e starts at 0, so right after conversion every token takes every expert (σ(P) > 0) "
                          "with softmax weights summing to 1; once training raises θ_e a token gets 0..E experts")
        return False, ("at inference DiffMoE's capacity predictor gives a token 0..E experts (all of them only "
                       "while θ_e = 0), and with slices or non-softmax scores their weights need not sum to 1")

    def __init__(self, width: int, num_experts: int, cfg: RouterConfig, target_dim: int | None = None):
        super().__init__()
        self.num_experts, self.cfg = num_experts, cfg
        self.gate = Gate(width, num_experts, cfg)
        self.predictor = CapacityPredictor(width, cfg.predictor_hidden or width, num_experts)
        self.threshold = StepThreshold(num_experts, cfg.threshold_decay, initial=0.0, first="blend")

    def forward(self, x_ND: torch.Tensor, ctx: RoutingContext) -> Routing:
        N, E = x_ND.shape[0], self.num_experts
        logits_NE = self.gate(x_ND, ctx)
        scores_NE = score(logits_NE, self.cfg.score)
        pred_logits_NE = self.predictor(x_ND)
        aux = {"z": router_z_loss(logits_NE)}
        if self.training:
            C = expert_capacity(self.cfg.capacity or self.cfg.top_k, N, E)
            token_CE = scores_NE.detach().topk(C, dim=0).indices
            mask_NE = torch.zeros_like(scores_NE).scatter_(0, token_CE, 1.0)
            aux["capacity"] = F.binary_cross_entropy_with_logits(pred_logits_NE, mask_NE)
            self.threshold.observe(torch.sigmoid(pred_logits_NE.detach()).topk(C, dim=0).values[-1])
            token_M = token_CE.reshape(-1)
            expert_M = torch.arange(E, device=x_ND.device).repeat(C)
        else:
            above_NE = torch.sigmoid(pred_logits_NE) > self.threshold.value_X
            if self.cfg.capacity_inference == "topk":
                above_NE = pooled_topk(above_NE, scores_NE.detach(), ctx.null_tokens_N(x_ND.device))
            token_M, expert_M = above_NE.nonzero(as_tuple=True)
        return Routing.from_assignments(token_M, expert_M, scores_NE[token_M, expert_M], N, E, aux, scores_NE)

    def after_optimizer_step(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.threshold.update(reduce_fn)


def pooled_topk(above_NE: torch.Tensor, scores_NE: torch.Tensor, pool_N: torch.Tensor) -> torch.Tensor:
    """DiffMoE's inference choice (module docstring): in each pool, expert e keeps its k_e best-scored
    tokens, k_e = the pool's tokens in `above_NE[:, e]`. Ranks instead of a topk per expert: no host sync
    per expert (the at most two pools cost one)."""
    chosen_NE = torch.zeros_like(above_NE)
    for pool in pool_N.unique().tolist():
        rows_P = (pool_N == pool).nonzero().squeeze(1)
        s_PE = scores_NE[rows_P]
        order_PE = s_PE.argsort(dim=0, descending=True)
        rank_PE = torch.empty_like(order_PE)
        positions_PE = torch.arange(len(rows_P), device=s_PE.device)[:, None].expand_as(order_PE)
        rank_PE.scatter_(0, order_PE, positions_PE)
        chosen_NE[rows_P] = rank_PE < above_NE[rows_P].sum(0)
    return chosen_NE

"""Expert Race — `race` (Race-DiT, Yuan et al., arXiv 2503.16057 §4-6).

Tokens and experts compete in one race over all N·E scores of the local batch:

    S = gate(x) ∈ R^{N×E}  (2-layer MLP gate by default: D→D, GELU, gating head →E)
    K = N · k,   τ = K-th largest entry of S,   M_{i,e} = [S_{i,e} ≥ τ]   (exactly K assignments)
    w_{i,e} = G(S_{i,e}),  G = identity (default) | sigmoid | softmax   (`score`)

A token may get 0..E experts and an expert any number of tokens.

Modes. `train()`: the batch race above; τ_batch is observed into an EMA threshold
τ̂ ← β·τ̂ + (1−β)·τ_batch once per optimizer step (β = 0.99 [choice]; τ_batch averaged across
data-parallel ranks; moe/threshold.py). `eval()`: M = [S ≥ τ̂], so a sample's routing does not depend
on the rest of the batch (CFG doubles it); with `ema_threshold: false` eval runs the batch race
instead (the paper's ablation without the threshold; then routing does depend on the batch).

Auxiliary losses (unweighted):
- `similarity` (§5), with P = softmax(S), P' = PᵀP, M' = MᵀM (co-selection counts, no gradient):
      W_ee = E·M'_ee / Σ_j M'_jj,   W_ef = (E²−E)·M'_ef / Σ_{j≠l} M'_jl   (e ≠ f)
      L_sim = (1/N) Σ_{e,f} W_ef · P'_ef          ([choice]: the exact normalisation is not public)
- `plr`, per-layer regularisation (§6): a target head H (gate features → p²·C) predicts the
  training target (velocity or noise, patchified) that the objective passes to the model:
      L_PLR = mean_l ‖H_l(h_l) − target‖²   (the paper's mean over MoE layers l: AUX_MEAN_OVER_LAYERS)
  Only emitted when the forward was given a target (training); `target_head: false` removes the head.
- `z`, the router z-loss (weight 0 by default).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moedit.config import MoEConfig, RouterConfig
from moedit.moe.gates import Gate, linear_f32, score
from moedit.moe.losses import router_z_loss
from moedit.moe.routers.base import Router
from moedit.moe.routing import Routing, RoutingContext
from moedit.moe.threshold import StepThreshold


def race_mask(logits_NE: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global top-K of all N·E scores: (token_M, expert_M) with M = K, and τ (the K-th largest)."""
    top = logits_NE.detach().flatten().topk(K)
    E = logits_NE.shape[1]
    return torch.stack([top.indices // E, top.indices % E]), top.values[-1]


def router_similarity(logits_NE: torch.Tensor, mask_NE: torch.Tensor) -> torch.Tensor:
    """L_sim of the module docstring; mask_NE is the 0/1 selection M."""
    N, E = logits_NE.shape
    with torch.autocast(logits_NE.device.type, enabled=False):  # E×E products in float32 under bf16
        p_NE = torch.softmax(logits_NE.float(), dim=-1)
        co_prob_EE = p_NE.T @ p_NE
        co_sel_EE = (mask_NE.T.float() @ mask_NE.float()).detach()
    diag = torch.eye(E, dtype=torch.bool, device=logits_NE.device)
    on_diag = co_sel_EE.diagonal().sum().clamp_min(1.0)
    off_diag = co_sel_EE.masked_fill(diag, 0.0).sum().clamp_min(1.0)
    weight_EE = torch.where(diag, E * co_sel_EE / on_diag, (E * E - E) * co_sel_EE / off_diag)
    return (weight_EE * co_prob_EE).sum() / N


class RaceRouter(Router):
    DEFAULTS = {"gate": "mlp", "score": "identity", "threshold_decay": 0.99}
    # Race-DiT does not publish these weights: [choice] 0.01 for the similarity loss (like the balance loss it
    # replaces) and 0.1 for the per-layer regularisation
    AUX_LOSSES = {"similarity": 0.01, "z": 0.0, "plr": 0.1}
    AUX_MEAN_OVER_LAYERS = frozenset({"plr"})  # the similarity loss is summed over layers, like a balance loss

    @classmethod
    def conversion_exactness(cls, moe: MoEConfig, slices: int, zero_gate: bool) -> tuple[bool, str]:
        return False, ("at inference race keeps every expert whose score passes the threshold τ̂ (0..E experts, "
                       "weights G(S)); no configuration is exact")

    @property
    def wants_target(self) -> bool:
        return self.target_head is not None

    def __init__(self, width: int, num_experts: int, cfg: RouterConfig, target_dim: int | None = None):
        super().__init__()
        self.num_experts, self.cfg = num_experts, cfg
        self.gate = Gate(width, num_experts, cfg)
        self.target_head = None
        if cfg.target_head and target_dim is not None:
            self.target_head = nn.Linear(self.gate.feature_dim, target_dim)
        self.threshold = StepThreshold(1, cfg.threshold_decay)

    def forward(self, x_ND: torch.Tensor, ctx: RoutingContext) -> Routing:
        N, E = x_ND.shape[0], self.num_experts
        features_NF, logits_NE = self.gate.forward_features(x_ND, ctx)
        weights_NE = score(logits_NE, self.cfg.score)
        if self.training or not self.cfg.ema_threshold:
            (token_M, expert_M), tau = race_mask(logits_NE, N * self.cfg.top_k)
            if self.training:
                self.threshold.observe(tau)
        else:
            token_M, expert_M = (logits_NE.detach() >= self.threshold.value_X).nonzero(as_tuple=True)
        mask_NE = torch.zeros_like(logits_NE, dtype=torch.bool)
        mask_NE[token_M, expert_M] = True
        aux = {"similarity": router_similarity(logits_NE, mask_NE), "z": router_z_loss(logits_NE)}
        if self.target_head is not None and ctx.target_BLP is not None:
            with torch.autocast(x_ND.device.type, enabled=False):
                predicted_NP = linear_f32(self.target_head, features_NF)
            target_NP = ctx.target_BLP.reshape(N, -1).float()
            aux["plr"] = (predicted_NP - target_NP).square().mean()
        return Routing.from_assignments(token_M, expert_M, weights_NE[token_M, expert_M], N, E, aux, weights_NE)

    def after_optimizer_step(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.threshold.update(reduce_fn)

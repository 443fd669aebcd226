"""ProMoE two-step routing — `promoe` (Wei et al., arXiv 2510.24711 §3.2-3.3).

Step 1, conditional routing (hard, not learned): every token of a sample whose label is the null
label (dropped for classifier-free guidance in training, or the unconditional half of a CFG batch at
sampling) goes with weight 1 to the dedicated unconditional expert, index E (this router adds one
expert: `EXTRA_EXPERTS = 1`, so the layer holds E + 1 routed experts).

Step 2, prototypical routing of the other (conditional) tokens over E learnable prototypes
C ∈ R^{E×D}, C ~ N(0, 0.02²):

    s_{i,e} = cos(x_i, C_e),   K_i = top-k_e s_{i,e} (k = 1 in the paper),   w_{i,e} = G(s_{i,e})

with G = identity by default (`score`), no renormalisation. The layer's shared expert (model.moe.
num_shared, 1 in the paper) sees every token. No balance loss.

Routing contrastive loss `contrastive` (§3.3), conditional tokens only: with T_e the tokens routed
to e, m_e = mean_{i∈T_e} x_i (not detached) and V the experts with T_e ≠ ∅,

    L_RCL = (1/|V|) Σ_{e∈V} −log( exp(cos(C_e, m_e)/τ) / Σ_{f∈V} exp(cos(C_e, m_f)/τ) ),  τ = 0.07

and L_RCL = 0 when |V| < 2. Train and eval route identically: routing depends on each sample's own
label and tokens only, never on the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moedit.config import MoEConfig, RouterConfig
from moedit.moe.gates import score
from moedit.moe.routers.base import Router
from moedit.moe.routing import Routing, RoutingContext, count_ids


def routing_contrastive(prototypes_ED: torch.Tensor, x_ND: torch.Tensor, token_M: torch.Tensor,
                        expert_M: torch.Tensor, tau: float, keep_M: torch.Tensor | None = None) -> torch.Tensor:
    """L_RCL of the module docstring over the assignments (token_M, expert_M) of conditional tokens;
    `keep_M` (0/1 per assignment) leaves some out without indexing them away (no host sync)."""
    E = prototypes_ED.shape[0]
    x_MD = x_ND[token_M].float()
    if keep_M is not None:
        x_MD = x_MD * keep_M[:, None]
    sums_ED = torch.zeros_like(prototypes_ED).float().index_add(0, expert_M, x_MD)
    counts_E = count_ids(expert_M, E, keep_M).float()
    used_E = counts_E > 0
    means_ED = sums_ED / counts_E.clamp_min(1.0)[:, None]
    with torch.autocast(x_ND.device.type, enabled=False):  # cosines / τ=0.07 need float32 under bf16
        cos_EE = F.normalize(prototypes_ED.float(), dim=-1) @ F.normalize(means_ED, dim=-1).T
    logits_EE = (cos_EE / tau).masked_fill(~used_E[None, :], -1e9)  # only non-empty experts compete
    per_row_E = F.cross_entropy(logits_EE, torch.arange(E, device=x_ND.device), reduction="none")
    num_used = used_E.sum()
    loss = (per_row_E * used_E).sum() / num_used.clamp_min(1)
    return torch.where(num_used >= 2, loss, torch.zeros_like(loss))


class ProMoERouter(Router):
    DEFAULTS = {"score": "identity"}
    AUX_LOSSES = {"contrastive": 1.0}  # ProMoE's routing contrastive loss at weight 1, per MoE block
    EXTRA_EXPERTS = 1
    no_weight_decay = ("prototypes_ED",)

    @classmethod
    def conversion_exactness(cls, moe: MoEConfig, slices: int, zero_gate: bool) -> tuple[bool, str]:
        r, E = moe.router, moe.num_experts
        if slices > 1:
            return False, "null-label tokens run one slice (the unconditional expert), not the whole dense FFN"
        if r.score == "softmax" and r.top_k == E:
            return True, ("null-label tokens go to the unconditional expert (a copy) with weight 1; conditional "
                          "tokens keep every prototype's softmax weight, which sums to 1")
        return False, (f"null-label tokens are exact (unconditional expert, weight 1), but conditional tokens get "
                       f"weight {r.score}(cos(x, C_e)) on their top-{r.top_k} prototype(s), not renormalised, so it "
                       f"does not sum to 1 (exact only with score softmax and top_k = num_experts = {E})")

    def __init__(self, width: int, num_experts: int, cfg: RouterConfig, target_dim: int | None = None):
        super().__init__()
        self.num_experts, self.cfg = num_experts, cfg
        self.prototypes_ED = nn.Parameter(torch.randn(num_experts, width) * cfg.prototype_std)

    def forward(self, x_ND: torch.Tensor, ctx: RoutingContext) -> Routing:
        N, E, k = x_ND.shape[0], self.num_experts, self.cfg.top_k
        with torch.autocast(x_ND.device.type, enabled=False):  # routing math in float32
            cos_NE = F.normalize(x_ND.float(), dim=-1) @ F.normalize(self.prototypes_ED.float(), dim=-1).T
        weights_NE = score(cos_NE, self.cfg.score)
        uncond_N = ctx.null_tokens_N(x_ND.device)
        if k == 1:
            return self._route_top1(x_ND, cos_NE, weights_NE, uncond_N)
        return self._route(x_ND, cos_NE, weights_NE, uncond_N, k)

    def _route_top1(self, x_ND, cos_NE, weights_NE, uncond_N) -> Routing:
        """k = 1 (the paper's setting): one assignment per token in token order, chosen with torch.where
        instead of splitting the tokens with nonzero(): the same routing without a host synchronisation.
        Agrees with `_route` (tests/unit/test_routers_known_answers.py)."""
        N, E = x_ND.shape[0], self.num_experts
        top_N = cos_NE.detach().argmax(-1)
        expert_M = torch.where(uncond_N, E, top_N)
        weight_M = torch.where(uncond_N, 1.0, weights_NE.gather(1, top_N[:, None]).squeeze(1))
        contrastive = routing_contrastive(self.prototypes_ED, x_ND, torch.arange(N, device=x_ND.device), top_N,
                                          self.cfg.contrastive_tau, keep_M=(~uncond_N).float())
        return Routing.from_assignments(torch.arange(N, device=x_ND.device), expert_M, weight_M, N, E + 1,
                                        {"contrastive": contrastive}, weights_NE, per_token=1)

    def _route(self, x_ND, cos_NE, weights_NE, uncond_N, k: int) -> Routing:
        """Any k: conditional and unconditional tokens split by nonzero() (one host sync per layer)."""
        N, E = x_ND.shape[0], self.num_experts
        cond_token_C = (~uncond_N).nonzero().squeeze(1)
        uncond_token_U = uncond_N.nonzero().squeeze(1)
        expert_CK = cos_NE.detach()[cond_token_C].topk(k, dim=-1).indices
        cond_token_M = cond_token_C.repeat_interleave(k)
        cond_expert_M = expert_CK.reshape(-1)
        token_M = torch.cat([cond_token_M, uncond_token_U])
        expert_M = torch.cat([cond_expert_M, torch.full_like(uncond_token_U, E)])
        weight_M = torch.cat([weights_NE[cond_token_M, cond_expert_M],
                              torch.ones(uncond_token_U.shape[0], device=x_ND.device)])
        contrastive = routing_contrastive(self.prototypes_ED, x_ND, cond_token_M, cond_expert_M,
                                          self.cfg.contrastive_tau)
        return Routing.from_assignments(token_M, expert_M, weight_M, N, E + 1, {"contrastive": contrastive}, weights_NE)

"""ProMoE with expert choice — `promoe_ec` (Wei et al., arXiv 2510.24711; the expert-choice model of
ali-vilab/ProMoE, `ProMoE_EC` in its configs).

Step 1, conditional routing, as in `promoe`: every token of a null-label sample goes with weight 1 to
the unconditional expert, index E (`EXTRA_EXPERTS = 1`).

Step 2, prototypical routing by expert choice inside each conditional sample b (L tokens): over E
learnable prototypes C ∈ R^{E×D},

    s_{b,e,i} = G(cos(x_{b,i}, C_e)),   G over the sample's tokens i: identity (default) | sigmoid |
                                        softmax along the sequence (not over experts)
    C_tok = clamp(⌊top_k · L / E⌋, 1, L),   T_{b,e} = top-C_tok_i s_{b,e,i},   w_{b,e,i} = s_{b,e,i} for i ∈ T_{b,e}

so every expert takes exactly C_tok tokens of every conditional sample and a token gets 0..E experts;
no renormalisation. The layer's shared expert sees every token.

Routing contrastive loss `contrastive`, per conditional sample: m_{b,e} = mean_{i∈T_{b,e}} x_{b,i} (not
detached), and with every expert non-empty by construction,

    L_RCL = (1/(|B_c|·E)) Σ_{b∈B_c} Σ_e −log( exp(cos(C_e, m_{b,e})/τ) / Σ_f exp(cos(C_e, m_{b,f})/τ) )

(0 when E < 2 or no sample is conditional). This is the token-choice model's loss (`promoe`) taken per
sample instead of over the batch, as ProMoE's expert-choice code computes it. Routing depends on each
sample's own label and tokens only: train and eval route identically and never by the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moedit.config import RouterConfig
from moedit.moe.gates import score
from moedit.moe.routers.expert_choice import expert_capacity
from moedit.moe.routers.promoe import ProMoERouter
from moedit.moe.routing import Routing, RoutingContext


def per_sample_contrastive(prototypes_ED: torch.Tensor, x_ND: torch.Tensor, token_bEC: torch.Tensor,
                           tau: float) -> torch.Tensor:
    """L_RCL of the module docstring; token_bEC: the tokens each expert took in each conditional sample."""
    b, E = token_bEC.shape[:2]
    if b == 0 or E < 2:
        return prototypes_ED.sum() * 0.0  # zero, still connected to the prototypes
    means_bED = x_ND[token_bEC].float().mean(2)
    with torch.autocast(x_ND.device.type, enabled=False):  # cosines / τ=0.07 need float32 under bf16
        cos_bEE = torch.einsum("id,bjd->bij", F.normalize(prototypes_ED.float(), dim=-1),
                               F.normalize(means_bED, dim=-1))
    labels_bE = torch.arange(E, device=x_ND.device).expand(b, E)
    return F.cross_entropy((cos_bEE / tau).reshape(b * E, E), labels_bE.reshape(-1))


class ProMoEExpertChoiceRouter(ProMoERouter):
    """ProMoE's conditional + prototypical routing with expert choice per sample (module docstring)."""

    @classmethod
    def conversion_exactness(cls, moe, slices: int, zero_gate: bool) -> tuple[bool, str]:
        return False, ("conditional tokens get 0..E experts, each weighted by G(cos(x, C_e)) without "
                       "renormalisation, so the weights need not sum to 1 (null-label tokens are exact)")

    @classmethod
    def describe(cls, cfg: RouterConfig) -> str:
        return f"expert choice, {cfg.top_k} experts per token on average, score={cfg.score} over the sample's tokens"

    def forward(self, x_ND: torch.Tensor, ctx: RoutingContext) -> Routing:
        B, L, E, N = ctx.batch, ctx.seq_len, self.num_experts, x_ND.shape[0]
        per_expert = expert_capacity(self.cfg.top_k, L, E)
        with torch.autocast(x_ND.device.type, enabled=False):  # routing math in float32
            cos_NE = F.normalize(x_ND.float(), dim=-1) @ F.normalize(self.prototypes_ED.float(), dim=-1).T
        weights_BEL = score(cos_NE.view(B, L, E).transpose(1, 2), self.cfg.score)  # G along the sequence
        uncond_N = ctx.null_tokens_N(x_ND.device)
        cond_b = (~uncond_N.view(B, L)[:, 0]).nonzero().squeeze(1)  # one host sync per layer, as promoe's k > 1
        weights_bEL = weights_BEL[cond_b]
        pick_bEC = weights_bEL.detach().topk(per_expert, dim=-1).indices  # token positions within the sample
        token_bEC = pick_bEC + (cond_b * L)[:, None, None]
        expert_bEC = torch.arange(E, device=x_ND.device)[None, :, None].expand_as(pick_bEC)
        uncond_token_U = uncond_N.nonzero().squeeze(1)
        token_M = torch.cat([token_bEC.reshape(-1), uncond_token_U])
        expert_M = torch.cat([expert_bEC.reshape(-1), torch.full_like(uncond_token_U, E)])
        weight_M = torch.cat([weights_bEL.gather(-1, pick_bEC).reshape(-1),
                              torch.ones(uncond_token_U.shape[0], device=x_ND.device)])
        contrastive = per_sample_contrastive(self.prototypes_ED, x_ND, token_bEC, self.cfg.contrastive_tau)
        scores_NE = weights_BEL.transpose(1, 2).reshape(N, E)
        return Routing.from_assignments(token_M, expert_M, weight_M, N, E + 1, {"contrastive": contrastive}, scores_NE)

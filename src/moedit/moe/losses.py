"""Auxiliary routing losses (docs/ROUTING_MATH.md §5). Each is returned unweighted, by name, by the router
that uses it; the trainer applies `train.aux_weights[name]` and logs every term separately."""

from __future__ import annotations

import torch

from moedit.moe.routing import count_ids


def switch_balance(logits_NE: torch.Tensor, expert_M: torch.Tensor) -> torch.Tensor:
    """Switch/GShard balance loss L = E · Σ_e f_e · P̄_e (Fedus et al., arXiv 2101.03961, eq. 4).

    f_e: fraction of assignments that went to e (not differentiable); P̄_e: mean softmax probability.
    Equals 1 under perfect balance, E when everything goes to one expert.
    """
    num_experts = logits_NE.shape[-1]
    f_E = count_ids(expert_M, num_experts).float() / max(expert_M.numel(), 1)
    p_mean_E = torch.softmax(logits_NE.float(), dim=-1).mean(dim=0)
    return num_experts * torch.sum(f_E * p_mean_E)


def router_z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """Router z-loss mean_i (logsumexp_e S_ie)² (Zoph et al., ST-MoE, arXiv 2202.08906, eq. 5)."""
    return torch.logsumexp(logits_NE.float(), dim=-1).square().mean()

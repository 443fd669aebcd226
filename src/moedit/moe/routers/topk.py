"""Token-choice top-k routing — `topk` (docs/ROUTING_MATH.md §4.1).

Each token i keeps its k highest-scoring experts:

    S = gate(x) ∈ R^{N×E},  s = score(S) ∈ {softmax, sigmoid, identity}
    K_i = top-k_e (s_ie + b_e),     w_ie = scale · s_ie / (Σ_{f∈K_i} s_if if renormalised else 1)

renormalised = normalize and k > 1, as DiT-MoE (arXiv 2407.11633) and DSMoE (arXiv 2512.01252) do: one
renormalised weight would be the constant `scale`, through which the gate gets no gradient from the
output (it would learn only from auxiliary losses). `normalize_top1: true` renormalises a single weight
anyway — [choice] kept for one reason: it makes a top-1 dense→MoE conversion exact (weight ≡ 1); the
trainer warns that the gate then cannot learn from the output.

b ∈ R^E is the optional selection-only bias of DeepSeek-V3's auxiliary-loss-free balancing
(Wang et al., arXiv 2408.15664; DeepSeek-V3, arXiv 2412.19437 §2.1.2): it changes which experts are
chosen, never the weights. After each optimizer step, with load_e counted over every micro-batch of
the step (and summed across data-parallel ranks by the caller's `reduce_fn`):

    b_e ← b_e + γ · sign(mean_f load_f − load_e)

Group-limited routing (DeepSeek-V3 §2.1.2, `num_groups` > 1): the E experts form G equal groups, a
group scores the sum of its two best (biased) selection scores (its best, for groups of one), and
each token chooses its k experts inside its `top_groups` best groups only.

Auxiliary losses (unweighted): `balance` (Switch, arXiv 2101.03961) and `z` (ST-MoE, arXiv 2202.08906).
Train and eval route identically. DiT-MoE (arXiv 2407.11633) is softmax top-2 with balance 0.01;
the DeepSeek preset is sigmoid + bias + normalize + scale 2.5 with SwiGLU and a shared expert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moedit.config import MoEConfig, RouterConfig
from moedit.moe.gates import Gate, score
from moedit.moe.losses import router_z_loss, switch_balance
from moedit.moe.routers.base import Router
from moedit.moe.replay import replaying
from moedit.moe.routing import Routing, RoutingContext, count_ids


class TopKRouter(Router):
    DEFAULTS = {"gate": "linear", "score": "softmax"}
    # Switch balance 0.01 as in DiT-MoE's released code (its paper's text says 0.005, docs/PRESETS.md);
    # the z-loss is off unless asked for
    AUX_LOSSES = {"balance": 0.01, "z": 0.0}

    @classmethod
    def conversion_exactness(cls, moe: MoEConfig, slices: int, zero_gate: bool) -> tuple[bool, str]:
        return topk_exactness(moe, slices, zero_gate)

    @classmethod
    def describe(cls, cfg: RouterConfig) -> str:
        return f"top_k={cfg.top_k} score={cfg.score} normalize={cfg.normalize}"

    @classmethod
    def config_warnings(cls, moe: MoEConfig) -> list[str]:
        r = moe.router
        if r.top_k == 1 and r.normalize and r.normalize_top1:
            return ["model.moe.router.normalize_top1=true renormalises the single kept weight to the constant "
                    f"scale={r.scale:g}: the gate gets no gradient from the output and learns only through "
                    "auxiliary losses (set it false unless you need an exact top-1 conversion)"]
        if r.top_k == 1 and r.normalize:
            return ["model.moe.router.normalize=true has no effect with top_k=1 (as in DiT-MoE and DSMoE): the "
                    "weight stays the gate's score, so the gate learns from the output"]
        return []

    def __init__(self, width: int, num_experts: int, cfg: RouterConfig, target_dim: int | None = None):
        super().__init__()
        self.num_experts, self.cfg = num_experts, cfg
        self.gate = Gate(width, num_experts, cfg)
        if cfg.selection_bias:
            self.register_buffer("bias_E", torch.zeros(num_experts))
            # assignments counted over the current optimizer step; not saved (zero between steps)
            self.register_buffer("step_load_E", torch.zeros(num_experts), persistent=False)

    def forward(self, x_ND: torch.Tensor, ctx: RoutingContext) -> Routing:
        N, E, k = x_ND.shape[0], self.num_experts, self.cfg.top_k
        logits_NE = self.gate(x_ND, ctx)
        scores_NE = score(logits_NE, self.cfg.score)
        select_NE = scores_NE.detach()
        if self.cfg.selection_bias:
            select_NE = select_NE + self.bias_E
        if self.cfg.num_groups > 1:
            select_NE = limit_to_groups(select_NE, self.cfg.num_groups, self.cfg.top_groups)
        expert_NK = select_NE.topk(k, dim=-1).indices
        weight_NK = scores_NE.gather(1, expert_NK)
        if renormalises(self.cfg):
            weight_NK = weight_NK / weight_NK.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        weight_NK = weight_NK * self.cfg.scale
        expert_M = expert_NK.reshape(-1)
        load_E = count_ids(expert_M, E)
        if self.cfg.selection_bias and self.training and not replaying():  # counted once per forward
            self.step_load_E += load_E.to(self.step_load_E.dtype)
        return Routing(
            token_M=torch.arange(N, device=x_ND.device).repeat_interleave(k),
            expert_M=expert_M,
            weight_M=weight_NK.reshape(-1),
            num_tokens=N,
            num_experts=E,
            aux={"balance": switch_balance(logits_NE, expert_M), "z": router_z_loss(logits_NE)},
            scores_NE=scores_NE.detach(),
            stats={"load_E": load_E},
            per_token=k,
        )

    @torch.no_grad()
    def after_optimizer_step(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Auxiliary-loss-free bias update from the loads counted over the step just taken."""
        if not self.cfg.selection_bias:
            return
        load_E = reduce_fn(self.step_load_E.clone()) if reduce_fn is not None else self.step_load_E
        self.bias_E += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.step_load_E.zero_()


def renormalises(cfg: RouterConfig) -> bool:
    """Whether the kept weights are divided by their sum (module docstring: not for a single one)."""
    return cfg.normalize and (cfg.top_k > 1 or cfg.normalize_top1)


def limit_to_groups(select_NE: torch.Tensor, num_groups: int, top_groups: int) -> torch.Tensor:
    """Selection scores with every expert outside the token's `top_groups` best groups set to -inf."""
    N, E = select_NE.shape
    grouped_NGe = select_NE.view(N, num_groups, E // num_groups)
    best = min(2, grouped_NGe.shape[-1])
    group_score_NG = grouped_NGe.topk(best, dim=-1).values.sum(-1)
    keep_NG = torch.zeros_like(group_score_NG, dtype=torch.bool)
    keep_NG.scatter_(1, group_score_NG.topk(top_groups, dim=-1).indices, True)
    return grouped_NGe.masked_fill(~keep_NG[..., None], float("-inf")).view(N, E)


# ----------------------------------------------------------------------------- dense→MoE exactness


_EPS = 1e-9  # |Σw − 1| below this counts as exactly one


def _constant_score(score: str, num_experts: int) -> float:
    """The score every expert gets from a zero gate head."""
    return {"softmax": 1.0 / num_experts, "sigmoid": 0.5, "identity": 0.0}[score]


def _kept_weight_sum(moe: MoEConfig, zero_gate: bool) -> tuple[float | None, str]:
    """Σ of one token's routed weights for topk when it is the same for every token, else None."""
    r, E, k = moe.router, moe.num_experts, moe.router.top_k
    if zero_gate:
        c = _constant_score(r.score, E)
        w = 1.0 / k if (renormalises(r) and c > 0) else c
        return r.scale * k * w, f"a zero gate makes every {r.score} score {c:g}, so each kept weight is {r.scale * w:g}"
    if r.score == "identity":
        return None, "identity scores can be negative and the renormaliser is clamped at 1e-9"
    if renormalises(r):
        return r.scale, "the kept top-k weights are renormalised to sum to 1" + (
            f", then multiplied by router.scale={r.scale:g}" if r.scale != 1.0 else "")
    if r.score == "softmax" and k == E:
        return r.scale, "every expert is kept and the softmax over all experts sums to 1"
    if r.score == "softmax":
        return None, (f"softmax top-{k} of {E} without renormalisation keeps only part of the probability "
                      "mass (Σw < 1); set router.normalize=true for an exact conversion")
    return None, "independent sigmoid scores do not sum to 1; set router.normalize=true"


def topk_exactness(moe: MoEConfig, slices: int, zero_gate: bool) -> tuple[bool, str]:
    total, why = _kept_weight_sum(moe, zero_gate)
    k, E = moe.router.top_k, moe.num_experts
    if slices == 1:
        exact = total is not None and abs(total - 1.0) < _EPS
        return exact, f"{why}; the routed weights sum to {total:g}" if total is not None else why
    if not (E == slices and k == E):
        return False, (f"a token keeps {k} of {E} experts holding {slices} slices, so it need not hold every "
                       f"slice exactly once; exact needs num_experts = top_k = {slices}")
    if not zero_gate:
        return False, ("the slices' weights vary from token to token; a split reproduces the dense FFN only with "
                       f"every weight exactly 1/{slices}: convert with a zero gate head (--zero-gates)")
    exact = total is not None and abs(total - 1.0) < _EPS
    return exact, f"{why}; every token holds all {slices} slices with weights summing to {total:g}"

"""When does a dense→MoE conversion reproduce the dense model exactly? (docs/ROUTING_MATH.md §6, docs/CONVERT.md)

After conversion every routed expert is the dense FFN f, or — fine-grained targets — one of S hidden
slices of it scaled by S: with f(x) = Σ_s f_s(x) + b2 over S = H_dense / H_e slices,

    Expert_e(x) = S · f_{e mod S}(x) + b2

and the MoE block computes y = Σ_{(e, w) routed} w · Expert_e(x) + Σ Shared(x). So, with shared experts
exactly zero (the verification init):

- full copies (S = 1): y = (Σ w) · f(x): exact iff every token's routed weights sum to one;
- slices (S > 1): y = f(x) iff every token holds each slice once with weight exactly 1/S, which needs
  E = S experts, all of them kept, and weights that do not depend on the token — only a zero gate head
  (`gate_init="zero"`: uniform scores) gives that.

Each router states its rule (`conversion_exactness` in its file, moe/routers/); with a random gate:
- topk: Σ w = scale · (1 if normalize else Σ_{kept} score). Exact for normalize with softmax or sigmoid
  scores and scale 1, and for softmax without normalize when top_k = num_experts (all the mass kept).
  Identity scores can be negative, and the renormaliser is clamped at 1e-9: not exact.
- expert_choice: a token gets 0..E experts; exact only when every expert takes every token
  (capacity = num_experts, so C = L) and the softmax over all experts sums to one.
- diffmoe: at inference the capacity predictor gives a token 0..E experts: never exact.
- race: at inference a token keeps every expert whose score passes τ̂ (0..E experts, weights G(S)): never exact.
- promoe: null-label tokens go to the unconditional expert with weight 1 — exact when it is a full copy;
  conditional tokens get G(cos) over their top-k prototypes (no renormalisation): exact only for softmax
  with top_k = num_experts. With the paper's identity top-1 the weight is a cosine, so only
  the null-label samples are exact.
With a zero gate head every score is a constant c (softmax 1/E, sigmoid 1/2, identity 0) and the kept
weights are c, or 1/k renormalised, so Σ w is known exactly.
"""

from __future__ import annotations

from moedit.config import MoEConfig
from moedit.moe.routers import router_class


def routing_exactness(moe: MoEConfig, slices: int, zero_gate: bool = False,
                      shared_zero: bool = True) -> tuple[bool, str]:
    """(exact, reason): whether the converted MoE model must equal the dense one to float tolerance. The
    per-router rule is the router's own (`Router.conversion_exactness`)."""
    if moe.num_shared > 0 and not shared_zero:
        return False, "shared experts hold noise (the training init); verification needs them exactly zero"
    return router_class(moe.router.name).conversion_exactness(moe, slices, zero_gate)

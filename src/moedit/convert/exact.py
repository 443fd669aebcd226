"""When does a dense→MoE conversion reproduce the dense model exactly? (ROUTERS.md §6, docs/CONVERT.md)

After conversion every routed expert is the dense FFN f, or — fine-grained targets — one of S hidden
slices of it scaled by S: with f(x) = Σ_s f_s(x) + b2 over S = H_dense / H_e slices,

    Expert_e(x) = S · f_{e mod S}(x) + b2

and the MoE block computes y = Σ_{(e, w) routed} w · Expert_e(x) + Σ Shared(x). So, with shared experts
exactly zero (the verification init):

- full copies (S = 1): y = (Σ w) · f(x): exact iff every token's routed weights sum to one;
- slices (S > 1): y = f(x) iff every token holds each slice once with weight exactly 1/S, which needs
  E = S experts, all of them kept, and weights that do not depend on the token — only a zero gate head
  (`gate_init="zero"`: uniform scores) gives that.

Per router, with a random gate:
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

_EPS = 1e-9


def _constant_score(score: str, num_experts: int) -> float:
    """The score every expert gets from a zero gate head."""
    return {"softmax": 1.0 / num_experts, "sigmoid": 0.5, "identity": 0.0}[score]


def _kept_weight_sum(moe: MoEConfig, zero_gate: bool) -> tuple[float | None, str]:
    """Σ of one token's routed weights for topk when it is the same for every token, else None."""
    r, E, k = moe.router, moe.num_experts, moe.router.top_k
    if zero_gate:
        c = _constant_score(r.score, E)
        w = 1.0 / k if (r.normalize and c > 0) else c
        return r.scale * k * w, f"a zero gate makes every {r.score} score {c:g}, so each kept weight is {r.scale * w:g}"
    if r.score == "identity":
        return None, "identity scores can be negative and the renormaliser is clamped at 1e-9"
    if r.normalize:
        return r.scale, "the kept top-k weights are renormalised to sum to 1" + (
            f", then multiplied by router.scale={r.scale:g}" if r.scale != 1.0 else "")
    if r.score == "softmax" and k == E:
        return r.scale, "every expert is kept and the softmax over all experts sums to 1"
    if r.score == "softmax":
        return None, (f"softmax top-{k} of {E} without renormalisation keeps only part of the probability "
                      "mass (Σw < 1); set router.normalize=true for an exact conversion")
    return None, "independent sigmoid scores do not sum to 1; set router.normalize=true"


def _topk(moe: MoEConfig, slices: int, zero_gate: bool) -> tuple[bool, str]:
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


def _expert_choice(moe: MoEConfig, slices: int, zero_gate: bool) -> tuple[bool, str]:
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


def _never(reason: str):
    return lambda moe, slices, zero_gate: (False, reason)


def _promoe(moe: MoEConfig, slices: int, zero_gate: bool) -> tuple[bool, str]:
    r, E = moe.router, moe.num_experts
    if slices > 1:
        return False, "null-label tokens run one slice (the unconditional expert), not the whole dense FFN"
    if r.score == "softmax" and r.top_k == E:
        return True, ("null-label tokens go to the unconditional expert (a copy) with weight 1; conditional "
                      "tokens keep every prototype's softmax weight, which sums to 1")
    return False, (f"null-label tokens are exact (unconditional expert, weight 1), but conditional tokens get "
                   f"weight {r.score}(cos(x, C_e)) on their top-{r.top_k} prototype(s), not renormalised, so it "
                   f"does not sum to 1 (exact only with score softmax and top_k = num_experts = {E})")


_RULES = {
    "topk": _topk,
    "expert_choice": _expert_choice,
    "diffmoe": _never("at inference DiffMoE's capacity predictor gives a token 0..E experts whose softmax "
                      "weights need not sum to 1; no configuration is exact"),
    "race": _never("at inference race keeps every expert whose score passes the threshold τ̂ (0..E experts, "
                   "weights G(S)); no configuration is exact"),
    "promoe": _promoe,
}


def routing_exactness(moe: MoEConfig, slices: int, zero_gate: bool = False,
                      shared_zero: bool = True) -> tuple[bool, str]:
    """(exact, reason): whether the converted MoE model must equal the dense one to float tolerance."""
    if moe.num_shared > 0 and not shared_zero:
        return False, "shared experts hold noise (the training init); verification needs them exactly zero"
    rule = _RULES.get(moe.router.name)
    if rule is None:
        return False, f"router {moe.router.name!r} has no exactness rule; assume it is not exact"
    return rule(moe, slices, zero_gate)

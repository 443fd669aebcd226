"""One MoE layer, forward + backward: moedit's dispatch against the dense FFN and the loops peers use.

    useful FLOPs (fwd + bwd) = 3 · 2 · M · D · H · 2,   M = T · k assignments (two matrices per GELU expert)

The dense FFN of hidden H on all T tokens does 3 · 2 · T · D · H · 2: its TFLOP/s is the ceiling an
MoE layer is measured against ("ratio to dense"). Implementations, all on the same stacked weights:

- dense        : one FFN (x W1 + b1 → GELU → W2 + b2) on every token;
- index_loop   : a Python loop over experts, each finding its rows with nonzero(), gathering them,
                 running, and index_add_-ing the weighted result back (the loop of most paper code);
- mask_loop    : the boolean-mask loop of the DiT-MoE code: every token repeated k times,
                 y[mask_e] = expert_e(x[mask_e]) for each e, then the k copies weighted and summed;
- moedit_loop / moedit_grouped : `moe.dispatch` with backend loop / grouped. The routing is token
                 choice (k per token, token-major, `per_token` set), so grouped takes its permutation
                 path (rows moved by permutations, combined by a reshape-and-sum);
- moedit_grouped_scatter : grouped on the same assignments without `per_token`: the general path
                 (gather by token index, weighted index_add_ combine) every variable-count router takes.
- moedit_fused / moedit_fused_scatter : backend fused (Triton one-pass gather and combine; CUDA only),
                 on the token-major routing and on the general one (which it first sorts by token);
- moedit_grouped_col / moedit_fused_col : the same on experts stored column-major (`expert_layout:
                 col`), the layout question of the grouped product.

Routing is top-k of random logits; "skewed" adds a bias to the first E/8 experts so that the most
loaded expert holds about 3× the mean load (the achieved max/mean is reported). Before timing, every
implementation's output is compared with a float32 per-expert reference on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from moedit.bench.timing import Timing, time_call
from moedit.moe.dispatch import dispatch
from moedit.moe.experts import StackedExperts
from moedit.moe.routing import Routing

IMPLEMENTATIONS = ("dense", "index_loop", "mask_loop", "moedit_loop", "moedit_grouped", "moedit_grouped_scatter",
                   "moedit_grouped_col", "moedit_fused", "moedit_fused_scatter", "moedit_fused_col")


def runnable(names: tuple[str, ...], device: torch.device) -> tuple[tuple[str, ...], str | None]:
    """The implementations that can run on `device` and, if any were left out, why."""
    from moedit.moe.glue_triton import unavailable_reason

    reason = unavailable_reason(device)
    if reason is None:
        return names, None
    return tuple(n for n in names if "fused" not in n), reason


def column_major_copy(experts: StackedExperts) -> StackedExperts:
    col = StackedExperts(experts.num_experts, experts.width, experts.hidden, experts.kind, layout="col")
    col = col.to(device=experts.w1_EDH.device, dtype=experts.w1_EDH.dtype)
    col.load_state_dict(experts.state_dict())
    return col
SKEW_BIAS = 1.6  # logit bias of the favoured eighth of experts: max/mean load ≈ 3 at E 8–64, top-2


@dataclass(frozen=True)
class LayerCase:
    name: str
    experts: int
    hidden: int
    top_k: int
    tokens: int
    width: int


def dit_cases() -> list[LayerCase]:
    """The DiT-XL shapes of the project's performance plan (D 1152, H 4608; fine-grained H 576)."""
    cases = [LayerCase(f"E{E} top-2 T{T // 1024}k", E, 4608, 2, T, 1152) for T in (32768, 8192) for E in (8, 16, 32, 64)]
    return cases + [LayerCase(f"fine E64 top-8 H576 T{T // 1024}k", 64, 576, 8, T, 1152) for T in (32768, 8192)]


def cpu_cases() -> list[LayerCase]:
    """Shapes a 2-core CPU times in seconds: the quickstart's layer (D 128, 64 images × 49 tokens)."""
    return [LayerCase("E8 top-2 H256", 8, 256, 2, 3136, 128), LayerCase("E16 top-2 H256", 16, 256, 2, 3136, 128),
            LayerCase("fine E32 top-8 H64", 32, 64, 8, 3136, 128), LayerCase("fine E64 top-8 H32", 64, 32, 8, 3136, 128)]


def make_routing(T: int, E: int, k: int, skewed: bool, gen: torch.Generator, device: torch.device) -> Routing:
    logits_TE = torch.randn(T, E, generator=gen)
    if skewed:
        logits_TE[:, : max(1, E // 8)] += SKEW_BIAS
    expert_TK = logits_TE.topk(k, dim=-1).indices
    weight_M = torch.rand(T * k, generator=gen).to(device).requires_grad_(True)
    return Routing(torch.arange(T, device=device).repeat_interleave(k), expert_TK.reshape(-1).to(device), weight_M, T, E,
                   per_token=k)


def index_loop(x_TD: torch.Tensor, routing: Routing, experts: StackedExperts) -> torch.Tensor:
    out_TD = torch.zeros_like(x_TD)
    for e, weights in enumerate(experts.per_expert(x_TD.dtype)):
        rows_R = (routing.expert_M == e).nonzero().squeeze(1)  # host sync per expert, as peers do
        if rows_R.numel() == 0:
            continue
        token_R = routing.token_M[rows_R]
        y_RD = experts.apply(experts.kind, weights, x_TD[token_R])
        out_TD = out_TD.index_add(0, token_R, y_RD * routing.weight_M[rows_R, None].to(y_RD.dtype))
    return out_TD


def mask_loop(x_TD: torch.Tensor, routing: Routing, experts: StackedExperts, k: int) -> torch.Tensor:
    """Token choice only (exactly k assignments per token, in token order), as the DiT-MoE code assumes."""
    x_MD = x_TD.repeat_interleave(k, dim=0)
    y_MD = torch.empty_like(x_MD)
    for e, weights in enumerate(experts.per_expert(x_TD.dtype)):
        mask_M = routing.expert_M == e
        y_MD[mask_M] = experts.apply(experts.kind, weights, x_MD[mask_M])
    weight_TK = routing.weight_M.view(-1, k).to(y_MD.dtype)
    return (y_MD.view(-1, k, x_TD.shape[1]) * weight_TK[..., None]).sum(1)


def dense_ffn(x_TD: torch.Tensor, w1_DH: torch.Tensor, b1_H: torch.Tensor, w2_HD: torch.Tensor,
              b2_D: torch.Tensor) -> torch.Tensor:
    return torch.addmm(b2_D, F.gelu(torch.addmm(b1_H, x_TD, w1_DH), approximate="tanh"), w2_HD)


def reference(x_TD: torch.Tensor, routing: Routing, experts: StackedExperts) -> torch.Tensor:
    """Float32 per-expert loop: what every implementation must match."""
    ref = StackedExperts(experts.num_experts, experts.width, experts.hidden, experts.kind).to(x_TD.device)
    ref.load_state_dict({k: v.float() for k, v in experts.state_dict().items()})
    fp32 = Routing(routing.token_M, routing.expert_M, routing.weight_M.detach().float(), routing.num_tokens,
                   routing.num_experts)  # no per_token: the general loop
    return dispatch(x_TD.detach().float(), fp32, ref, "loop")


def implementation(name: str, experts: StackedExperts, dense: tuple[torch.Tensor, ...], k: int
                   ) -> Callable[[torch.Tensor, Routing], torch.Tensor]:
    if name == "dense":
        return lambda x, r: dense_ffn(x, *dense)
    if name == "index_loop":
        return lambda x, r: index_loop(x, r, experts)
    if name == "mask_loop":
        return lambda x, r: mask_loop(x, r, experts, k)
    if name.endswith("_col"):
        return implementation(name.removesuffix("_col"), column_major_copy(experts), dense, k)
    if name in ("moedit_loop", "moedit_grouped", "moedit_fused"):
        backend = name.removeprefix("moedit_")
        return lambda x, r: dispatch(x, r, experts, backend)
    if name in ("moedit_grouped_scatter", "moedit_fused_scatter"):
        backend = name.removeprefix("moedit_").removesuffix("_scatter")
        return lambda x, r: dispatch(x, replace(r, per_token=None), experts, backend)
    raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(IMPLEMENTATIONS)}")


def useful_flops(case: LayerCase, routed: bool) -> float:
    rows = case.tokens * (case.top_k if routed else 1)
    return 3 * 2 * rows * case.width * case.hidden * 2


def run_case(case: LayerCase, skewed: bool, device: torch.device, dtype: torch.dtype, names: tuple[str, ...],
             repeats: int, seed: int = 0) -> list[dict]:
    """Time each implementation on one shape and routing; rows carry ms, TFLOP/s, peak MiB, error."""
    gen = torch.Generator().manual_seed(seed)
    experts = StackedExperts(case.experts, case.width, case.hidden).to(device=device, dtype=dtype)
    D, H = case.width, case.hidden
    dense = tuple(t.to(device=device, dtype=dtype).requires_grad_(True) for t in
                  (torch.randn(D, H, generator=gen) / D**0.5, torch.zeros(H), torch.randn(H, D, generator=gen) / H**0.5,
                   torch.zeros(D)))
    routing = make_routing(case.tokens, case.experts, case.top_k, skewed, gen, device)
    xs = [torch.randn(case.tokens, D, generator=gen).to(device=device, dtype=dtype).requires_grad_(True) for _ in range(2)]
    load_E = routing.load_E().float()
    expected_TD = reference(xs[0], routing, experts)
    rows = []
    for name in names:
        row = {"case": case.name, "routing": "skewed" if skewed else "random", "impl": name, "E": case.experts,
               "k": case.top_k, "T": case.tokens, "D": D, "H": H,
               "max_over_mean_load": (load_E.max() / load_E.mean()).item()}
        try:
            row.update(_measure(name, case, experts, dense, routing, xs, expected_TD, dtype, device, repeats))
        except Exception as exc:  # one broken or out-of-memory implementation must not lose the others' rows
            row.update({"ms": None, "tflops": None, "peak_mib": None, "rel_error": None,
                        "failed": f"{type(exc).__name__}: {exc}"[:400]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    dense_tflops = next((r["tflops"] for r in rows if r["impl"] == "dense"), None)
    for r in rows:
        r["ratio_to_dense"] = r["tflops"] / dense_tflops if dense_tflops and r["tflops"] else None
    return rows


def _measure(name: str, case: LayerCase, experts: StackedExperts, dense: tuple[torch.Tensor, ...], routing: Routing,
             xs: list[torch.Tensor], expected_TD: torch.Tensor, dtype: torch.dtype, device: torch.device,
             repeats: int) -> dict:
    """Check one implementation against the float32 reference, then time it (raises if it disagrees)."""
    fn = implementation(name, experts, dense, case.top_k)
    err = None
    if name != "dense":
        err = (fn(xs[0], routing).float() - expected_TD).abs().max().item() / expected_TD.abs().max().item()
        if err > (2e-2 if dtype == torch.bfloat16 else 1e-4):
            raise AssertionError(f"disagrees with the float32 reference: relative error {err:.2e}")

    def step(i: int) -> None:
        y_TD = fn(xs[i % len(xs)], routing)
        y_TD.backward(torch.ones_like(y_TD))

    t: Timing = time_call(step, device, repeats)
    flops = useful_flops(case, routed=name != "dense")
    return {"ms": t.median_ms, "tflops": flops / (t.median_ms * 1e-3) / 1e12, "peak_mib": t.peak_mib, "rel_error": err}

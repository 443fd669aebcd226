"""Execute any `Routing` through stacked experts: y_i = Σ_{(i,e,w)} w · Expert_e(x_i).

Backends (interchangeable; tests check they agree in forward and gradients):
- `loop`    : sort assignments by expert, run each non-empty expert on its slice with plain matmuls.
              The reference path, and the faster one on CPU for large batches.
- `grouped` : same sort, then one `F.grouped_mm` per matrix with int32 cumulative offsets; on
              sm90/sm100 GPUs with bf16 this is a single fused kernel per matrix.
- `fused`   : `grouped`'s products with the glue in Triton kernels (moe/glue_triton.py): one pass
              gathers and casts the rows, one applies bias and GELU (or SwiGLU's silu(a)·b) between
              the products, one adds the output bias, weights and sums the rows per token; their
              backwards are single passes and segment sums (no atomics). CUDA; on CPU only under
              Triton's interpreter. Taken only when named, until GPU measurements say otherwise.
- `auto`    : `grouped` on CUDA. On CPU, by the mean number of rows each expert receives: `grouped`
              below CPU_GROUPED_BELOW rows (one call beats a Python loop of tiny matmuls: sampling,
              small batches), `loop` above it (grouped_mm loops over groups internally on CPU and its
              extra passes then cost more than the loop's overhead). Measured for D 128, E 8–64,
              top-2/8 by benchmarks/dispatch_cpu.py (docs/PERFORMANCE.md). `loop` wherever
              grouped_mm's 16-byte row alignment does not hold.
Both combine with a weighted `index_add_`, so a token with no assignment gets exactly zero here and
keeps only its residual path. Weights are applied in float32 before casting back.

When the routing says every token has exactly k assignments in token-major order (`per_token`: token
choice, top-1 ProMoE), `grouped` moves rows only by permutations instead: the tokens are repeated k
times and permuted into expert order, the outputs permuted back and combined as a (N, k, D) weighted
sum. A permutation written with index_copy has a plain gather as its backward, so neither direction
accumulates into shared rows (no atomics on a GPU, and the result is deterministic).
"""

from __future__ import annotations

import torch

from moedit.moe.experts import StackedExperts
from moedit.moe.routing import Routing

BACKENDS = ("auto", "loop", "grouped", "fused")
# On CPU the loop won 7 of the 8 measured cases at 392–784 rows per expert (the eighth within 5%);
# grouped won all 16 at 12–98 on its permutation path and 15 on its scatter path (the 16th within 7%)
# (benchmarks/results/dispatch_cpu.json, docs/PERFORMANCE.md); the switch sits between the two.
CPU_GROUPED_BELOW = 256


def resolve_backend(backend: str, device: torch.device, rows_per_expert: float | None = None) -> str:
    """The backend that runs; `rows_per_expert` (assignments / experts, a host-side shape, no sync)
    lets `auto` choose by the shape on CPU, and without it `auto` means `loop` there."""
    if backend not in BACKENDS:
        raise ValueError(f"MoE backend {backend!r} is unknown; choose one of: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "grouped"
    return "grouped" if rows_per_expert is not None and rows_per_expert < CPU_GROUPED_BELOW else "loop"


def _compute_dtype(x_ND: torch.Tensor) -> torch.dtype:
    # grouped_mm is not on autocast's op list, so follow autocast by hand: experts run in the
    # autocast dtype (bf16 on CUDA) like every other matmul of the model.
    if torch.is_autocast_enabled(x_ND.device.type):
        return torch.get_autocast_dtype(x_ND.device.type)
    return x_ND.dtype


def _sort_by_expert(routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    order_M = torch.argsort(routing.expert_M, stable=True)
    counts_E = routing.load_E()
    return routing.token_M[order_M], routing.expert_M[order_M], routing.weight_M[order_M], counts_E


def _combine(y_MD: torch.Tensor, token_M: torch.Tensor, weight_M: torch.Tensor, x_ND: torch.Tensor) -> torch.Tensor:
    weighted_MD = (y_MD.float() * weight_M.float()[:, None]).to(x_ND.dtype)
    out_ND = torch.zeros_like(x_ND)
    return out_ND.index_add_(0, token_M, weighted_MD)


def dispatch_loop(x_ND: torch.Tensor, routing: Routing, experts: StackedExperts) -> torch.Tensor:
    if routing.token_M.numel() == 0:
        return torch.zeros_like(x_ND)
    token_M, _, weight_M, counts_E = _sort_by_expert(routing)
    xc_MD = x_ND.to(_compute_dtype(x_ND))[token_M]
    y_MD = experts.forward_chunks(xc_MD, counts_E.tolist())
    return _combine(y_MD, token_M, weight_M, x_ND)


def dispatch_grouped(x_ND: torch.Tensor, routing: Routing, experts: StackedExperts) -> torch.Tensor:
    if routing.token_M.numel() == 0:
        return torch.zeros_like(x_ND)
    token_M, expert_M, weight_M, counts_E = _sort_by_expert(routing)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    xc_MD = x_ND.to(_compute_dtype(x_ND))[token_M]
    y_MD = experts.forward_grouped(xc_MD, expert_M, offs_E)
    return _combine(y_MD, token_M, weight_M, x_ND)


def _permute(x_MD: torch.Tensor, dest_M: torch.Tensor) -> torch.Tensor:
    """out[dest_M[i]] = x_MD[i] for a permutation dest_M; its backward is grad.index_select(0, dest_M)."""
    return torch.index_copy(torch.empty_like(x_MD), 0, dest_M, x_MD)


def _expert_order(routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """order_M: sorted row p holds assignment order_M[p]; slot_M its inverse (assignment → sorted row);
    offs_E: int32 cumulative ends of each expert's rows, as grouped_mm takes them."""
    order_M = torch.argsort(routing.expert_M, stable=True)
    slot_M = torch.empty_like(order_M).index_copy_(0, order_M, torch.arange(order_M.numel(), device=order_M.device))
    offs_E = torch.cumsum(routing.load_E(), 0).to(torch.int32)
    return order_M, slot_M, offs_E


def dispatch_grouped_fixed(x_ND: torch.Tensor, routing: Routing, experts: StackedExperts) -> torch.Tensor:
    """`grouped` for routings with exactly k = routing.per_token assignments per token, token-major."""
    N, k = routing.num_tokens, routing.per_token
    if N == 0 or k == 0:
        return torch.zeros_like(x_ND)
    order_M, slot_M, offs_E = _expert_order(routing)
    xs_MD = _permute(x_ND.to(_compute_dtype(x_ND)).repeat_interleave(k, dim=0), slot_M)
    ys_MD = experts.forward_grouped(xs_MD, routing.expert_M[order_M], offs_E)
    y_NKD = _permute(ys_MD, order_M).float().view(N, k, -1)
    return (y_NKD * routing.weight_M.float().view(N, k, 1)).sum(1).to(x_ND.dtype)


def _token_major(routing: Routing, slot_M: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The assignments as a token-major CSR: (ptr_N1, tok_J, pos_J, weight_J, expert_J), pos_J the sorted row."""
    N, device = routing.num_tokens, routing.token_M.device
    if routing.per_token is not None:  # token-major already, k per token
        ptr_N1 = torch.arange(N + 1, device=device) * routing.per_token
        return ptr_N1, routing.token_M, slot_M, routing.weight_M, routing.expert_M
    by_token_M = torch.argsort(routing.token_M, stable=True)
    ptr_N1 = torch.zeros(N + 1, dtype=torch.long, device=device)
    torch.cumsum(routing.experts_per_token_N(), 0, out=ptr_N1[1:])
    return (ptr_N1, routing.token_M[by_token_M], slot_M[by_token_M], routing.weight_M[by_token_M],
            routing.expert_M[by_token_M])


def dispatch_fused(x_ND: torch.Tensor, routing: Routing, experts: StackedExperts) -> torch.Tensor:
    """`grouped` with Triton's one-pass gather, activation and combine (any routing, token-major or not);
    GELU experts' output bias is added inside the combine, in float32."""
    from moedit.moe import glue_triton  # Triton is optional: imported only where this backend runs

    if routing.token_M.numel() == 0:
        return torch.zeros_like(x_ND)
    order_M, slot_M, offs_E = _expert_order(routing)
    ptr_N1, tok_J, pos_J, weight_J, expert_J = _token_major(routing, slot_M)
    expert_M = routing.expert_M[order_M]
    xs_MD = glue_triton.gather_rows(x_ND, routing.token_M[order_M], ptr_N1, pos_J, _compute_dtype(x_ND))
    fold_b2 = experts.kind == "mlp"
    ys_MD = experts.forward_grouped(xs_MD, expert_M, offs_E, bias_gelu=glue_triton.bias_gelu,
                                    swiglu=glue_triton.swiglu, add_b2=not fold_b2)
    bias = dict(b_ED=experts.b2_ED, expert_J=expert_J, expert_M=expert_M) if fold_b2 else {}
    return glue_triton.combine_rows(ys_MD, weight_J, tok_J, pos_J, ptr_N1, x_ND.dtype, **bias)


_IMPLS = {"loop": dispatch_loop, "grouped": dispatch_grouped, "fused": dispatch_fused}


def grouped_aligned(x_ND: torch.Tensor, experts: StackedExperts) -> bool:
    """grouped_mm needs every row stride to be a multiple of 16 bytes (width and hidden width)."""
    itemsize = torch.empty((), dtype=_compute_dtype(x_ND)).element_size()
    return (experts.width * itemsize) % 16 == 0 and (experts.hidden * itemsize) % 16 == 0


def dispatch(x_ND: torch.Tensor, routing: Routing, experts: StackedExperts, backend: str = "auto") -> torch.Tensor:
    if routing.num_tokens != x_ND.shape[0]:
        raise ValueError(f"routing covers {routing.num_tokens} tokens but x has {x_ND.shape[0]}")
    name = resolve_backend(backend, x_ND.device, routing.token_M.shape[0] / max(routing.num_experts, 1))
    if name == "fused":
        from moedit.moe.glue_triton import unavailable_reason

        if (reason := unavailable_reason(x_ND.device)) is not None:
            raise ValueError(reason)
    if name in ("grouped", "fused") and not grouped_aligned(x_ND, experts):
        if backend != "auto":
            raise ValueError(
                f"the {name} MoE backend needs the model width ({experts.width}) and expert hidden width "
                f"({experts.hidden}) to be multiples of 8 (bf16) or 4 (fp32); change them or use backend loop/auto"
            )
        name = "loop"
    if name == "grouped" and routing.per_token is not None:
        return dispatch_grouped_fixed(x_ND, routing, experts)
    return _IMPLS[name](x_ND, routing, experts)

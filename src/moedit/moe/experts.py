"""Experts stored stacked, one tensor per matrix with the expert index first, so that a grouped
matrix product can run all of them at once (docs/ROUTING_MATH.md §1).

- `mlp`  : y = w2ᵀ·GELU_tanh(w1ᵀ·x + b1) + b2, with w1_EDH, b1_EH, w2_EHD, b2_ED
- `swiglu`: y = w2ᵀ·(silu(wgᵀ·x) ⊙ wuᵀ·x), with wg_EDH, wu_EDH, w2_EHD, no biases

Expert e computes exactly what models/ffn.py's dense FFN of the same kind and width computes with
fc1.weight = w1[e]ᵀ, etc.; that identity is what dense→MoE conversion relies on.

`layout` says how each expert's matrices lie in memory, never their shape or names: `row` stores
w1_EDH row-major per expert (contiguous), `col` stores it column-major per expert (strides (D·H, 1, D):
the nn.Linear order, which is how a grouped product's kernel may prefer to read its second operand).
Parameters, gradients (autograd gives a parameter's gradient its strides), optimizer state and
checkpoints (written contiguous, loaded by copy) are the same in either layout, so a checkpoint loads
into a model of either layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


LAYOUTS = ("row", "col")
KINDS = ("mlp", "swiglu")  # the FFN kinds an expert can be (models/ffn.py has these and dense-only ones)


def _stacked(E: int, rows: int, cols: int, layout: str) -> nn.Parameter:
    """An (E, rows, cols) parameter, each expert's matrix row-major (`row`) or column-major (`col`)."""
    return nn.Parameter(torch.empty(E, rows, cols) if layout == "row" else torch.empty(E, cols, rows).transpose(1, 2))


def sum_per_expert(g_MX: torch.Tensor, expert_M: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E, X) sums of the rows of each expert, by one matrix product onehot_EM · g_MX: indexing's
    backward (index_put) accumulates M rows into E targets one after another, a product reduces them
    in parallel and in a fixed order. F.one_hot with a given class count reads nothing back on CUDA."""
    return F.one_hot(expert_M, num_experts).T.to(g_MX.dtype) @ g_MX


class _ExpertRows(torch.autograd.Function):
    """b_EX[expert_M] with the gradient summed per expert by `sum_per_expert`."""

    @staticmethod
    def forward(ctx, b_EX: torch.Tensor, expert_M: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(expert_M)
        ctx.num_experts = b_EX.shape[0]
        return b_EX[expert_M]

    @staticmethod
    def backward(ctx, g_MX: torch.Tensor):
        (expert_M,) = ctx.saved_tensors
        return sum_per_expert(g_MX, expert_M, ctx.num_experts), None


def expert_rows(b_EX: torch.Tensor, expert_M: torch.Tensor) -> torch.Tensor:
    """Each row's expert's bias: b_EX[expert_M], its gradient reduced per expert by a matrix product."""
    return _ExpertRows.apply(b_EX, expert_M)


class StackedExperts(nn.Module):
    no_weight_decay = ("b1_EH", "b2_ED")  # stacked biases: 2-D tensors that are still biases

    def __init__(self, num_experts: int, width: int, hidden: int, kind: str = "mlp", layout: str = "row"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"expert kind {kind!r} is unknown; choose one of: {', '.join(KINDS)}")
        if layout not in LAYOUTS:
            raise ValueError(f"expert weight layout {layout!r} is unknown; choose {' or '.join(LAYOUTS)}")
        self.num_experts, self.width, self.hidden, self.kind, self.layout = num_experts, width, hidden, kind, layout
        E, D, H = num_experts, width, hidden
        self.w1_EDH = _stacked(E, D, H, layout)
        self.w2_EHD = _stacked(E, H, D, layout)
        if kind == "mlp":
            self.b1_EH = nn.Parameter(torch.zeros(E, H))
            self.b2_ED = nn.Parameter(torch.zeros(E, D))
        else:
            self.wu_EDH = _stacked(E, D, H, layout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # xavier-uniform per expert, as DiT initialises its dense FFN
        bound = math.sqrt(6.0 / (self.width + self.hidden))
        for p in (self.w1_EDH, self.w2_EHD) + ((self.wu_EDH,) if self.kind == "swiglu" else ()):
            nn.init.uniform_(p, -bound, bound)
        if self.kind == "mlp":
            nn.init.zeros_(self.b1_EH)
            nn.init.zeros_(self.b2_ED)

    def _weights(self, dtype: torch.dtype, full: bool = False) -> list[torch.Tensor]:
        """The matrices this process computes with. Under expert parallelism (distributed/expert_parallel.py)
        each stacked parameter is a DTensor split along the expert axis: the local experts are its local
        part (`to_local`, differentiable), and the rows given to the products below are the ones routed
        to those experts. `full`: every expert instead (`full_tensor`, a collective every rank of the
        mesh must join), for diagnostics outside the forward. Duck-typed, so that moe/ stays free of
        torch.distributed."""
        names = ("w1_EDH", "w2_EHD") + (("wu_EDH",) if self.kind == "swiglu" else ("b1_EH", "b2_ED"))
        tensors = [getattr(self, n) for n in names]
        if full:
            return [(t.full_tensor() if hasattr(t, "full_tensor") else t).to(dtype) for t in tensors]
        return [(t.to_local() if hasattr(t, "to_local") else t).to(dtype) for t in tensors]

    def per_expert(self, dtype: torch.dtype, full: bool = False) -> list[tuple[torch.Tensor, ...]]:
        """Each expert's matrices as views. One unbind per stacked tensor: indexing w[e] per expert
        instead makes every expert's backward write a full (E, ·, ·) zero gradient (O(E²) traffic)."""
        return list(zip(*(w.unbind(0) for w in self._weights(dtype, full))))

    @staticmethod
    def apply(kind: str, weights: tuple[torch.Tensor, ...], x_TD: torch.Tensor) -> torch.Tensor:
        """One expert on its T tokens: the reference every other path is checked against."""
        if kind == "mlp":
            w1, w2, b1, b2 = weights
            return torch.addmm(b2, F.gelu(torch.addmm(b1, x_TD, w1), approximate="tanh"), w2)
        w1, w2, wu = weights
        return (F.silu(x_TD @ w1) * (x_TD @ wu)) @ w2

    def forward_expert(self, e: int, x_TD: torch.Tensor) -> torch.Tensor:
        return self.apply(self.kind, self.per_expert(x_TD.dtype)[e], x_TD)

    def forward_chunks(self, x_MD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows sorted by expert, counts[e] rows for expert e: a plain loop of per-expert matmuls."""
        weights = self.per_expert(x_MD.dtype)
        outs = [self.apply(self.kind, weights[e], x_TD)
                for e, x_TD in enumerate(x_MD.split(counts)) if counts[e] > 0]
        return torch.cat(outs) if outs else x_MD.new_zeros(0, self.width)

    def forward_grouped(self, x_MD: torch.Tensor, expert_M: torch.Tensor, offs_E: torch.Tensor,
                        bias_gelu: Callable[..., torch.Tensor] | None = None,
                        swiglu: Callable[..., torch.Tensor] | None = None, add_b2: bool = True) -> torch.Tensor:
        """All experts at once on rows already sorted by expert; offs_E are int32 cumulative ends.
        Fused kernels, where given, replace the activations: `bias_gelu(z_MH, b1_EH, expert_M)` computes
        GELU_tanh(z + b1[expert]), `swiglu(a_MH, b_MH)` computes silu(a)·b. Without `add_b2` the output
        bias is left to the caller (the fused combine adds it while it sums)."""
        if self.kind == "mlp":
            w1, w2, b1, b2 = self._weights(x_MD.dtype)
            z_MH = F.grouped_mm(x_MD, w1, offs=offs_E)
            if bias_gelu is not None:
                h_MH = bias_gelu(z_MH, b1, expert_M)
            else:
                h_MH = F.gelu(z_MH + expert_rows(b1, expert_M), approximate="tanh")
            y_MD = F.grouped_mm(h_MH, w2, offs=offs_E)
            return y_MD + expert_rows(b2, expert_M) if add_b2 else y_MD
        w1, w2, wu = self._weights(x_MD.dtype)
        a_MH, b_MH = F.grouped_mm(x_MD, w1, offs=offs_E), F.grouped_mm(x_MD, wu, offs=offs_E)
        h_MH = swiglu(a_MH, b_MH) if swiglu is not None else F.silu(a_MH) * b_MH
        return F.grouped_mm(h_MH, w2, offs=offs_E)

    def forward_all(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Sum of every expert on every token (shared experts)."""
        weights = self.per_expert(x_ND.dtype)
        out_ND = self.apply(self.kind, weights[0], x_ND)
        for e in range(1, self.num_experts):
            out_ND = out_ND + self.apply(self.kind, weights[e], x_ND)
        return out_ND

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, width={self.width}, hidden={self.hidden}, kind={self.kind}, "
                f"layout={self.layout}")

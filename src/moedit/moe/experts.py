"""Experts stored stacked, one tensor per matrix with the expert index first, so that a grouped
matrix product can run all of them at once (ROUTERS.md §1).

- `mlp`  : y = w2ᵀ·GELU_tanh(w1ᵀ·x + b1) + b2, with w1_EDH, b1_EH, w2_EHD, b2_ED
- `swiglu`: y = w2ᵀ·(silu(wgᵀ·x) ⊙ wuᵀ·x), with wg_EDH, wu_EDH, w2_EHD, no biases

Expert e computes exactly what models/ffn.py's dense FFN of the same kind and width computes with
fc1.weight = w1[e]ᵀ, etc.; that identity is what dense→MoE conversion relies on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class StackedExperts(nn.Module):
    def __init__(self, num_experts: int, width: int, hidden: int, kind: str = "mlp"):
        super().__init__()
        if kind not in ("mlp", "swiglu"):
            raise ValueError(f"expert kind {kind!r} is unknown; choose mlp or swiglu")
        self.num_experts, self.width, self.hidden, self.kind = num_experts, width, hidden, kind
        E, D, H = num_experts, width, hidden
        self.w1_EDH = nn.Parameter(torch.empty(E, D, H))
        self.w2_EHD = nn.Parameter(torch.empty(E, H, D))
        if kind == "mlp":
            self.b1_EH = nn.Parameter(torch.zeros(E, H))
            self.b2_ED = nn.Parameter(torch.zeros(E, D))
        else:
            self.wu_EDH = nn.Parameter(torch.empty(E, D, H))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # xavier-uniform per expert, as DiT initialises its dense FFN
        bound = math.sqrt(6.0 / (self.width + self.hidden))
        for p in (self.w1_EDH, self.w2_EHD) + ((self.wu_EDH,) if self.kind == "swiglu" else ()):
            nn.init.uniform_(p, -bound, bound)
        if self.kind == "mlp":
            nn.init.zeros_(self.b1_EH)
            nn.init.zeros_(self.b2_ED)

    def _weights(self, dtype: torch.dtype) -> list[torch.Tensor]:
        names = ("w1_EDH", "w2_EHD") + (("wu_EDH",) if self.kind == "swiglu" else ("b1_EH", "b2_ED"))
        return [getattr(self, n).to(dtype) for n in names]

    def forward_expert(self, e: int, x_TD: torch.Tensor) -> torch.Tensor:
        """Expert e on its T tokens: the reference every other path is checked against."""
        if self.kind == "mlp":
            w1, w2, b1, b2 = self._weights(x_TD.dtype)
            h_TH = F.gelu(x_TD @ w1[e] + b1[e], approximate="tanh")
            return h_TH @ w2[e] + b2[e]
        w1, w2, wu = self._weights(x_TD.dtype)
        return (F.silu(x_TD @ w1[e]) * (x_TD @ wu[e])) @ w2[e]

    def forward_grouped(self, x_MD: torch.Tensor, expert_M: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """All experts at once on rows already sorted by expert; offs_E are int32 cumulative ends."""
        if self.kind == "mlp":
            w1, w2, b1, b2 = self._weights(x_MD.dtype)
            h_MH = F.gelu(F.grouped_mm(x_MD, w1, offs=offs_E) + b1[expert_M], approximate="tanh")
            return F.grouped_mm(h_MH, w2, offs=offs_E) + b2[expert_M]
        w1, w2, wu = self._weights(x_MD.dtype)
        h_MH = F.silu(F.grouped_mm(x_MD, w1, offs=offs_E)) * F.grouped_mm(x_MD, wu, offs=offs_E)
        return F.grouped_mm(h_MH, w2, offs=offs_E)

    def forward_all(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Sum of every expert on every token (shared experts)."""
        out_ND = self.forward_expert(0, x_ND)
        for e in range(1, self.num_experts):
            out_ND = out_ND + self.forward_expert(e, x_ND)
        return out_ND

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, width={self.width}, hidden={self.hidden}, kind={self.kind}"

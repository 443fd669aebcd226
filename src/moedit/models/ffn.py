"""Dense feed-forward networks of a DiT block.

- `mlp`: DiT's Linear(D→H, bias) → GELU(tanh) → Linear(H→D, bias); names fc1/fc2 follow the
  facebookresearch/DiT checkpoint layout so dense checkpoints map onto it directly.
- `swiglu`: down(silu(gate(x)) ⊙ up(x)), no biases (Shazeer, arXiv 2002.05202; DeepSeek-MoE).
- `mlp_silu`: Linear(D→H, bias) → SiLU → Linear(H→D, bias), the dense blocks of EfficientMoE's released
  DSMoE (timm Mlp with act_layer SiLU); dense blocks only (`model.dense_ffn`), no expert kind.
Routed and shared experts (moe/experts.py) compute the `mlp` and `swiglu` functions with stacked weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(h, approximate="tanh")

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x_ND)))


class SiLUMLP(MLP):
    """DSMoE's dense FFN: the MLP with SiLU in place of GELU (same parameter names)."""

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        return F.silu(h)


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x_ND)) * self.up(x_ND))


FFNS = {"mlp": MLP, "swiglu": SwiGLU, "mlp_silu": SiLUMLP}


def build_ffn(kind: str, width: int, hidden: int) -> nn.Module:
    return FFNS[kind](width, hidden)

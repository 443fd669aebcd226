"""Gate networks that turn tokens into expert scores S ∈ R^{N×E} (docs/ROUTING_MATH.md §2).

- linear    : S = x W
- mlp       : S = W2 · GELU(W1 x), hidden width D by default
- cross_attn: the token attends over its sample's conditioning tokens (timestep and class
              embeddings); S = W · [x ; attended]. [choice] arXiv 2605.19378 names this gate without
              its exact form: one multi-head attention read-out, concatenated with x, then linear.
Each gate is a feature map followed by a linear head (`features` then `head`), so a router may read
the features too (race's per-layer regularisation head shares the MLP gate's hidden layer).
Gates always compute in float32, with autocast switched off: router logits in bf16 lose the small
differences that decide top-k, and tiny router updates vanish in bf16 (the "bf16 trap").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moedit.config import RouterConfig
from moedit.moe.routing import RoutingContext


class LinearGate(nn.Module):
    def __init__(self, width: int, num_experts: int, cfg: RouterConfig):
        super().__init__()
        self.feature_dim = width
        self.head = nn.Linear(width, num_experts, bias=False)

    def features(self, x_ND: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        return x_ND


class MLPGate(nn.Module):
    def __init__(self, width: int, num_experts: int, cfg: RouterConfig):
        super().__init__()
        hidden = cfg.gate_hidden or width
        self.feature_dim = hidden
        self.fc1 = nn.Linear(width, hidden)
        self.head = nn.Linear(hidden, num_experts, bias=False)

    def features(self, x_ND: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        return F.gelu(linear_f32(self.fc1, x_ND))


class CrossAttnGate(nn.Module):
    def __init__(self, width: int, num_experts: int, cfg: RouterConfig):
        super().__init__()
        if width % cfg.gate_heads != 0:
            raise ValueError(f"router.gate_heads={cfg.gate_heads} must divide the model width {width}")
        self.heads = cfg.gate_heads
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * width, bias=False)
        self.feature_dim = 2 * width
        self.head = nn.Linear(2 * width, num_experts, bias=False)

    def features(self, x_ND: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        if ctx.cond_BSD is None:
            raise ValueError("the cross_attn gate needs conditioning tokens in RoutingContext.cond_BSD")
        B, L, h = ctx.batch, ctx.seq_len, self.heads
        q_BhLd = linear_f32(self.q, x_ND).view(B, L, h, -1).transpose(1, 2)
        k_BSD, v_BSD = linear_f32(self.kv, ctx.cond_BSD).chunk(2, dim=-1)
        k_BhSd = k_BSD.unflatten(-1, (h, -1)).transpose(1, 2)
        v_BhSd = v_BSD.unflatten(-1, (h, -1)).transpose(1, 2)
        read_BhLd = F.scaled_dot_product_attention(q_BhLd, k_BhSd, v_BhSd)
        read_ND = read_BhLd.transpose(1, 2).reshape(B * L, -1)
        return torch.cat([x_ND, read_ND], dim=-1)


def linear_f32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) in float32 whatever the layer is stored in: with train.param_dtype=bf16 and
    train.router_fp32=false the router's weights are bf16, but its arithmetic stays float32."""
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), layer.weight.float(), bias)


GATES = {"linear": LinearGate, "mlp": MLPGate, "cross_attn": CrossAttnGate}


class Gate(nn.Module):
    """Wraps a gate so it always runs in float32 outside autocast."""

    def __init__(self, width: int, num_experts: int, cfg: RouterConfig):
        super().__init__()
        self.net = GATES[cfg.gate](width, num_experts, cfg)
        self.feature_dim = self.net.feature_dim

    def forward(self, x_ND: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        return self.forward_features(x_ND, ctx)[1]

    def forward_features(self, x_ND: torch.Tensor, ctx: RoutingContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(features_NF, logits_NE), both float32."""
        with torch.autocast(x_ND.device.type, enabled=False):
            features_NF = self.net.features(x_ND.float(), ctx)
            return features_NF, linear_f32(self.net.head, features_NF)


SCORES = {
    "softmax": lambda logits_NE: torch.softmax(logits_NE, dim=-1),
    "sigmoid": torch.sigmoid,
    "identity": lambda logits_NE: logits_NE,
}


def score(logits_NE: torch.Tensor, kind: str) -> torch.Tensor:
    """Score function over experts (docs/ROUTING_MATH.md §3)."""
    if kind not in SCORES:
        raise ValueError(f"score function {kind!r} is unknown; choose one of: {', '.join(SCORES)}")
    return SCORES[kind](logits_NE)

"""Router registry: name -> class. Every router takes (width, num_experts, RouterConfig), returns a
`Routing` from forward(x_ND, ctx), and may define after_optimizer_step(reduce_fn)."""

from __future__ import annotations

from torch import nn

from moedit.config import RouterConfig
from moedit.moe.routers.topk import TopKRouter

ROUTERS: dict[str, type[nn.Module]] = {
    "topk": TopKRouter,
}


def build_router(width: int, num_experts: int, cfg: RouterConfig) -> nn.Module:
    if cfg.name not in ROUTERS:
        raise ValueError(f"router {cfg.name!r} is unknown; choose one of: {', '.join(ROUTERS)}")
    return ROUTERS[cfg.name](width, num_experts, cfg)

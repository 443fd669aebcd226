"""Router registry: name -> class, one line per router.

Every router is built as `cls(width, num_experts, cfg, target_dim=...)`, returns a `Routing` from
`forward(x_ND, ctx)`, and may define `after_optimizer_step(reduce_fn)` (statistics taken over the
step, reduced across data-parallel ranks). Class attributes:
- DEFAULTS: values for the RouterConfig fields left null (gate, score, threshold_decay);
- extra_experts: experts the router adds beyond model.moe.num_experts (ProMoE's unconditional one).
`target_dim` is the patchified training target's width (p²·C), for routers with a target head.
"""

from __future__ import annotations

from torch import nn

from moedit.config import RouterConfig
from moedit.moe.routers.diffmoe import DiffMoERouter
from moedit.moe.routers.expert_choice import ExpertChoiceRouter
from moedit.moe.routers.promoe import ProMoERouter
from moedit.moe.routers.race import RaceRouter
from moedit.moe.routers.topk import TopKRouter

ROUTERS: dict[str, type[nn.Module]] = {
    "topk": TopKRouter,
    "expert_choice": ExpertChoiceRouter,
    "diffmoe": DiffMoERouter,
    "race": RaceRouter,
    "promoe": ProMoERouter,
}


def router_defaults(name: str) -> dict:
    """The router's values for null RouterConfig fields ({} for an unknown name: validate() reports it)."""
    cls = ROUTERS.get(name)
    return dict(getattr(cls, "DEFAULTS", {})) if cls is not None else {}


def extra_experts(name: str) -> int:
    return getattr(ROUTERS[name], "extra_experts", 0)


def build_router(width: int, num_experts: int, cfg: RouterConfig, target_dim: int | None = None) -> nn.Module:
    if cfg.name not in ROUTERS:
        raise ValueError(f"router {cfg.name!r} is unknown; choose one of: {', '.join(ROUTERS)}")
    return ROUTERS[cfg.name](width, num_experts, cfg, target_dim=target_dim)

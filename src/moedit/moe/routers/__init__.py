"""Router registry: name -> class, one line per router (the contract: moe/routers/base.py).

Adding a router: one file with a `Router` subclass, and one line in ROUTERS below. Everything else asks
the class (its defaults, losses, extra experts, experts per token, conversion exactness).
"""

from __future__ import annotations

from moedit.config import RouterConfig
from moedit.moe.routers.base import Router
from moedit.moe.routers.diffmoe import DiffMoERouter
from moedit.moe.routers.expert_choice import ExpertChoiceRouter
from moedit.moe.routers.promoe import ProMoERouter
from moedit.moe.routers.promoe_ec import ProMoEExpertChoiceRouter
from moedit.moe.routers.race import RaceRouter
from moedit.moe.routers.topk import TopKRouter

ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "expert_choice": ExpertChoiceRouter,
    "diffmoe": DiffMoERouter,
    "race": RaceRouter,
    "promoe": ProMoERouter,
    "promoe_ec": ProMoEExpertChoiceRouter,
}


def router_class(name: str) -> type[Router]:
    if name not in ROUTERS:
        raise ValueError(f"router {name!r} is unknown; choose one of: {', '.join(ROUTERS)}")
    return ROUTERS[name]


def router_defaults(name: str) -> dict:
    """The router's values for null RouterConfig fields ({} for an unknown name: validate() reports it)."""
    cls = ROUTERS.get(name)
    return dict(cls.DEFAULTS) if cls is not None else {}


def extra_experts(name: str) -> int:
    return router_class(name).EXTRA_EXPERTS


def default_aux_weights() -> dict[str, float]:
    """Every registered router's auxiliary losses with their default weights. A name two routers share
    is one loss and must have one default weight."""
    weights: dict[str, float] = {}
    for name, cls in ROUTERS.items():
        for loss, weight in cls.AUX_LOSSES.items():
            if weights.setdefault(loss, weight) != weight:
                raise ValueError(f"router {name!r} gives auxiliary loss {loss!r} the default weight {weight}, "
                                 f"another router {weights[loss]}: one name, one loss, one default weight")
    return weights


def build_router(width: int, num_experts: int, cfg: RouterConfig, target_dim: int | None = None) -> Router:
    return router_class(cfg.name)(width, num_experts, cfg, target_dim=target_dim)

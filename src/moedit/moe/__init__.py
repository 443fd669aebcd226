"""Mixture-of-Experts layer, routing contract, routers, dispatch backends and auxiliary losses."""

from moedit.moe.layer import MoELayer
from moedit.moe.routing import Routing, RoutingContext

__all__ = ["MoELayer", "Routing", "RoutingContext"]

"""Activation checkpointing (parallel.activation_checkpointing) changes no gradient and no router state.

A checkpointed block is run twice (forward, then again in backward): every gradient must equal the
plain model's, and the routers' forward-time statistics (Race's and DiffMoE's threshold observations,
top-k's aux-free bias counts, the layer's last routing) must be recorded once, as without it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moedit.config import from_dict
from moedit.distributed.checkpointing import apply_activation_checkpointing
from moedit.models import build_model
from moedit.objectives.rectified_flow import RectifiedFlow

pytestmark = pytest.mark.usefixtures("one_thread")

ROUTERS = {
    "topk_bias": {"name": "topk", "top_k": 2, "selection_bias": True},
    "expert_choice": {"name": "expert_choice"},
    "diffmoe": {"name": "diffmoe"},
    "race": {"name": "race"},
    "promoe": {"name": "promoe", "top_k": 1},
}


def _model(router: dict):
    cfg = from_dict({"model": {"preset": "micro", "image_size": 8, "patch_size": 2,
                               "moe": {"num_experts": 4, "expert_ratio": 1.0, "num_shared": 1, "router": router}}})
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    with torch.no_grad():  # away from adaLN-zero's start, so that every parameter has a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _step(model) -> tuple[dict, dict, list]:
    g = torch.Generator().manual_seed(3)
    x0, y = torch.randn(4, 1, 8, 8, generator=g), torch.randint(10, (4,), generator=g)
    torch.manual_seed(7)  # class dropout draws from the global generator
    loss, _ = RectifiedFlow().loss(model, x0, y, generator=g, pass_target=model.wants_target)
    (loss + sum(model.aux_losses().values())).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = {n: b.clone() for n, b in model.named_buffers()}
    routings = [layer.last_routing.expert_M.clone() for layer in model.moe_layers()]
    return grads, state, routings


@pytest.mark.parametrize("router", list(ROUTERS), ids=list(ROUTERS))
@pytest.mark.parametrize("mode", ["full", "moe_only"])
def test_checkpointing_changes_no_gradient_or_state(router, mode):
    plain = _model(ROUTERS[router])
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed, mode)
    want_grads, want_state, want_routing = _step(plain)
    got_grads, got_state, got_routing = _step(checkpointed)
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=f"{mode}: {name}")
    for name, value in want_state.items():  # step_sum_X / step_count / step_load_E observed once
        torch.testing.assert_close(got_state[name], value, msg=f"{mode}: buffer {name}")
    for got, want in zip(got_routing, want_routing):
        assert torch.equal(got, want)


def test_checkpointing_is_applied_where_asked():
    model = _model(ROUTERS["race"])
    apply_activation_checkpointing(model, "moe_only")
    assert all(getattr(b.moe.forward, "moedit_checkpointed", False) for b in model.blocks)
    assert not any(getattr(b.forward, "moedit_checkpointed", False) for b in model.blocks)
    apply_activation_checkpointing(model, "moe_only")  # idempotent: not wrapped twice
    assert not getattr(model.blocks[0].moe.forward.__wrapped__, "moedit_checkpointed", False)
    with pytest.raises(ValueError, match="unknown"):
        apply_activation_checkpointing(model, "half")

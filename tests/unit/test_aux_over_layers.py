"""The layer convention of the auxiliary losses (docs/ROUTING_MATH.md §5): every peer adds each MoE layer's
loss at the published weight, so moedit sums over layers (`train.aux_over_layers: peers`), except a loss
its paper defines as a mean over layers (Race's per-layer regularisation); `mean` is the old average."""

from __future__ import annotations

import pytest
import torch

from moedit.config import ConfigError, from_dict
from moedit.distributed.setup import ForwardWithAux
from moedit.models import build_model

from model_helpers import wake_up  # tests/model_helpers.py

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(image_size=16, in_channels=1, patch_size=4, width=32, depth=4, heads=2, num_classes=10)


def _model(router: dict, seed: int = 0):
    moe = dict(num_experts=4, expert_ratio=1.0, placement="all", router=router)
    cfg = from_dict({"model": {**BASE, "moe": moe}}).model
    torch.manual_seed(seed)
    return wake_up(build_model(cfg))


def _forward(model, target: bool = False):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 16, 16, generator=gen)
    t, y = torch.rand(3, generator=gen), torch.randint(10, (3,), generator=gen)
    return model(x, t, y, target=torch.randn(3, 1, 16, 16, generator=gen) if target else None)


def _per_layer(model, name: str) -> torch.Tensor:
    return torch.stack([layer.last_routing.aux[name] for layer in model.moe_layers()])


def test_each_loss_is_summed_over_the_moe_layers_as_the_peers_do():
    model = _model({"name": "topk", "top_k": 2})
    _forward(model)
    assert len(model.moe_layers()) == 4
    aux = model.aux_losses()
    for name in ("balance", "z"):
        values = _per_layer(model, name)
        assert values.std() > 0  # four different layers, not one value copied
        torch.testing.assert_close(aux[name], values.sum())
        assert aux[name].requires_grad
    mean = model.aux_losses("mean")  # the old convention, for runs trained with it
    torch.testing.assert_close(mean["balance"], _per_layer(model, "balance").mean())


def test_races_plr_is_the_papers_mean_over_layers_and_its_similarity_loss_a_sum():
    model = _model({"name": "race", "top_k": 2})
    model.train()
    _forward(model, target=True)
    aux = model.aux_losses()
    torch.testing.assert_close(aux["plr"], _per_layer(model, "plr").mean())
    torch.testing.assert_close(aux["similarity"], _per_layer(model, "similarity").sum())


def test_the_step_forward_returns_the_combined_and_the_per_layer_losses():
    model = _model({"name": "topk", "top_k": 2}).eval()  # no label dropout: the two calls see one batch
    gen = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 1, 16, 16, generator=gen), torch.rand(3, generator=gen), torch.randint(10, (3,))
    prediction, aux, by_layer = ForwardWithAux(model)(x, t, y)
    assert prediction.shape == x.shape
    assert sorted(by_layer) == sorted(f"{n}/block{i}" for n in ("balance", "z") for i in range(4))
    torch.testing.assert_close(aux["balance"], sum(by_layer[f"balance/block{i}"] for i in range(4)))
    _, mean, _ = ForwardWithAux(model, "mean")(x, t, y)
    torch.testing.assert_close(mean["balance"], aux["balance"] / 4)


def test_an_unknown_convention_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match=r"train.aux_over_layers='sum'.*peers, mean"):
        from_dict({"train": {"aux_over_layers": "sum"}})
    assert from_dict({}).train.aux_over_layers == "peers"

"""'A new router is one file plus one line in the registry', demonstrated: a toy router written in this
file alone, registered with one line, trained and sampled through the CLI's config path. Nothing else in
moedit is told about it: config validation, the default weight of its auxiliary loss, the parameter
counts, the DDP-safe forward, checkpoints and the conversion check all ask the Router contract."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from moedit.cli.main import main as cli_main
from moedit.config import MoEConfig, RouterConfig, from_dict
from moedit.convert.exact import routing_exactness
from moedit.models.params import count_parameters
from moedit.moe.gates import Gate
from moedit.moe.routers import ROUTERS
from moedit.moe.routers.base import Router
from moedit.moe.routing import Routing, RoutingContext

pytestmark = pytest.mark.usefixtures("one_thread")


class ToyRouter(Router):
    """Top-1 token choice whose weight is the softmax probability of the chosen expert, with a toy
    auxiliary loss (the mean squared logit) that only exists to show a new loss gets its default weight."""

    DEFAULTS = {"gate": "linear", "score": "softmax"}
    AUX_LOSSES = {"toy_logit_l2": 0.001}

    @classmethod
    def experts_per_token(cls, cfg: RouterConfig) -> float:
        return 1.0  # always top-1, whatever top_k says

    def __init__(self, width: int, num_experts: int, cfg: RouterConfig, target_dim: int | None = None):
        super().__init__()
        self.num_experts, self.cfg = num_experts, cfg
        self.gate = Gate(width, num_experts, cfg)

    def forward(self, x_ND: torch.Tensor, ctx: RoutingContext) -> Routing:
        logits_NE = self.gate(x_ND, ctx)
        probs_NE = logits_NE.softmax(-1)
        expert_N = probs_NE.detach().argmax(-1)
        token_N = torch.arange(x_ND.shape[0], device=x_ND.device)
        return Routing.from_assignments(token_N, expert_N, probs_NE[token_N, expert_N], x_ND.shape[0],
                                        self.num_experts, {"toy_logit_l2": logits_NE.square().mean()}, probs_NE)


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(ROUTERS, "toy", ToyRouter)  # the one registry line


def _config(out_dir) -> dict:
    return {
        "seed": 2,
        "model": {"preset": "micro", "image_size": 8, "patch_size": 2,
                  "moe": {"num_experts": 4, "expert_ratio": 1.0, "router": {"name": "toy"}}},
        "data": {"name": "synthetic", "image_size": 8},
        "train": {"out_dir": str(out_dir), "steps": 4, "batch_size": 4, "ckpt_every": 0, "log_every": 2},
        "sample": {"steps": 1, "per_class": 1},
    }


def test_a_toy_router_trains_and_samples_through_the_cli(toy_registered, tmp_path, capsys):
    run = tmp_path / "run"
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(run)))
    assert cli_main(["train", "-c", str(cfg_path), "--no-progress"]) == 0, capsys.readouterr().err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["moe"]["router"]["gate"] == "linear"  # its DEFAULTS filled the null fields
    assert saved["train"]["aux_weights"]["toy_logit_l2"] == 0.001  # its loss got its default weight
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("aux/toy_logit_l2" in row for row in rows)
    assert (run / "checkpoints" / "step_00000004").is_dir() and (run / "routing" / "records.bin").is_file()
    assert cli_main(["sample", "--run", str(run), "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()


def test_the_contract_answers_for_the_toy_router(toy_registered):
    model_cfg = from_dict(_config("unused")).model
    counts = count_parameters(model_cfg)
    per_expert = 2 * 32 * 32 + 32 + 32  # micro width 32, expert hidden 32: two matrices and two biases
    layers = model_cfg.depth
    assert counts.total - counts.activated == layers * (4 - 1) * per_expert  # one expert per token
    exact, reason = routing_exactness(MoEConfig(num_experts=4, router=RouterConfig(name="toy")), slices=1)
    assert not exact and "states no exactness rule" in reason


def test_an_unregistered_router_is_a_config_error(capsys):
    assert cli_main(["train", "--set", "model.moe.router.name=toy", "--dry-run"]) == 2
    assert "model.moe.router.name='toy' is not valid; choose one of: topk" in capsys.readouterr().err

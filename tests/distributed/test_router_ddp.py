"""Router statistics under data parallelism: 2 CPU processes (gloo, torchrun) train tiny MoE-DiTs on
different data. Race's τ̂, DiffMoE's θ_E and top-k's selection bias must end identical on both ranks,
and equal to the values computed from both ranks' observations (docs/ROUTING_MATH.md §4.1, §4.3, §4.4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROUTERS = {
    "race": {"name": "race"},
    "diffmoe": {"name": "diffmoe"},
    "topk": {"name": "topk", "top_k": 1, "selection_bias": True, "bias_update_rate": 0.01},
}
STEPS, MICRO = 3, 2

# Each rank: the same initial model, its own data; gradients averaged by hand (so that the models stay
# identical without DDP's wrapper), then model.after_optimizer_step(all_reduce_sum). Before each hook
# the rank records what it observed over the step.
STATS_SCRIPT = """
import sys, torch, torch.distributed as dist
from moedit.config import default_aux_weights, from_dict
DEFAULT_AUX_WEIGHTS = default_aux_weights()
from moedit.distributed.setup import all_reduce_sum
from moedit.models import build_model
from moedit.objectives.rectified_flow import RectifiedFlow

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ROUTERS, STEPS, MICRO = {routers!r}, {steps}, {micro}


def local_observations(model):
    out = []
    for layer in model.moe_layers():
        r = layer.router
        if hasattr(r, "threshold"):
            out.append((r.threshold.step_sum_X.clone(), r.threshold.step_count.clone()))
        if hasattr(r, "step_load_E"):
            out.append(r.step_load_E.clone())
    return out


results = {{}}
for key, router in ROUTERS.items():
    cfg = from_dict({{"model": {{"preset": "micro", "image_size": 8, "patch_size": 2, "class_dropout": 0.2,
                               "moe": {{"num_experts": 4, "expert_ratio": 1.0, "router": router}}}}}}).model
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    flow = RectifiedFlow()
    observed = []
    for step in range(STEPS):
        for micro in range(MICRO):
            x0 = torch.randn(4, 1, 8, 8, generator=gen) * (1.0 + rank)  # and a different distribution
            y = torch.randint(10, (4,), generator=gen)
            loss, _ = flow.loss(model, x0, y, generator=gen, pass_target=model.wants_target)
            aux = model.aux_losses()
            (loss + sum(DEFAULT_AUX_WEIGHTS[n] * v for n, v in aux.items())).backward()
        for p in model.parameters():  # data-parallel gradient average (None on one rank = zero)
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = all_reduce_sum(grad) / world
        opt.step()
        opt.zero_grad()
        observed.append(local_observations(model))
        model.after_optimizer_step(all_reduce_sum)
    state = {{k: v.clone() for k, v in model.state_dict().items()}}
    results[key] = {{"observed": observed, "state": state}}
torch.save(results, sys.argv[1] + f"/rank{{rank}}.pt")
dist.destroy_process_group()
"""

# The user path: the Trainer under torchrun, DDP wrapper included.
TRAINER_SCRIPT = """
import sys, torch
from moedit.config import from_dict
from moedit.train.trainer import Trainer

torch.set_num_threads(1)
out = {{}}
for key, router in {routers!r}.items():
    cfg = {{"model": {{"preset": "micro", "image_size": 8, "patch_size": 2,
                     "moe": {{"num_experts": 4, "expert_ratio": 1.0, "router": router}}}},
           "data": {{"name": "synthetic", "image_size": 8}},
           "train": {{"out_dir": sys.argv[1] + "/run_" + key, "steps": 2, "batch_size": 4, "ckpt_every": 0,
                     "log_every": 1}},
           "sample": {{"steps": 1, "per_class": 1}}}}
    trainer = Trainer(from_dict(cfg), progress=False)
    trainer.train()
    out[key] = {{k: v.clone() for k, v in trainer.model.state_dict().items()}}
torch.save(out, sys.argv[1] + f"/rank{{trainer.dist.rank}}.pt")
"""


def _launch(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(path), str(tmp_path)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _load_ranks(tmp_path: Path) -> tuple[dict, dict]:
    return tuple(torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> tuple[dict, dict]:
    tmp_path = tmp_path_factory.mktemp("router_ddp")
    result = _launch(STATS_SCRIPT.format(routers=ROUTERS, steps=STEPS, micro=MICRO), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return _load_ranks(tmp_path)


def _moe_prefixes(state: dict) -> list[str]:
    return sorted({k.split("router.")[0] + "router." for k in state if ".moe.router." in k})


@pytest.mark.slow
@pytest.mark.parametrize("key", ["race", "diffmoe"])
def test_thresholds_identical_and_from_both_ranks(rank_results, key: str) -> None:
    rank0, rank1 = rank_results[0][key], rank_results[1][key]
    decay = {"race": 0.99, "diffmoe": 0.95}[key]
    prefixes = _moe_prefixes(rank0["state"])
    assert len(prefixes) == 2  # micro: two MoE blocks
    for layer, prefix in enumerate(prefixes):
        name = prefix + "threshold.value_X"
        final0, final1 = rank0["state"][name], rank1["state"][name]
        assert torch.equal(final0, final1), f"{name} differs between ranks"
        # race takes its first step's value; DiffMoE's threshold starts at 0 and always blends
        expected = None if key == "race" else torch.zeros_like(final0)
        for step in range(STEPS):
            (sum0, count0), (sum1, count1) = rank0["observed"][step][layer], rank1["observed"][step][layer]
            assert count0.item() == count1.item() == MICRO  # one observation per micro-batch
            if step == 0:  # the ranks really saw different batches
                assert not torch.allclose(sum0 / count0, sum1 / count1)
            mean = (sum0 + sum1) / (count0 + count1)  # the average of the per-rank batch values
            expected = mean if expected is None else decay * expected + (1 - decay) * mean
        torch.testing.assert_close(final0, expected, rtol=1e-6, atol=1e-7)
        assert rank0["state"][prefix + "threshold.updates"].item() == STEPS


@pytest.mark.slow
def test_selection_bias_identical_and_from_both_ranks_loads(rank_results) -> None:
    rank0, rank1 = rank_results[0]["topk"], rank_results[1]["topk"]
    gamma = ROUTERS["topk"]["bias_update_rate"]
    for layer, prefix in enumerate(_moe_prefixes(rank0["state"])):
        name = prefix + "bias_E"
        assert torch.equal(rank0["state"][name], rank1["state"][name]), f"{name} differs between ranks"
        bias = torch.zeros(4)
        for step in range(STEPS):
            load0, load1 = rank0["observed"][step][layer], rank1["observed"][step][layer]
            assert load0.sum() == load1.sum() == MICRO * 4 * 16  # micro-batches · samples · tokens (k = 1)
            load = load0 + load1
            bias += gamma * torch.sign(load.mean() - load)
        torch.testing.assert_close(rank0["state"][name], bias)
        assert bias.abs().sum() > 0


@pytest.mark.slow
def test_models_stay_identical_across_ranks(rank_results) -> None:
    for key in ROUTERS:
        s0, s1 = rank_results[0][key]["state"], rank_results[1][key]["state"]
        assert s0.keys() == s1.keys()
        for name in s0:
            assert torch.equal(s0[name], s1[name]), f"{key}: {name} differs between ranks"


@pytest.mark.slow
def test_trainer_under_torchrun_with_race_and_diffmoe(tmp_path) -> None:
    """The user path: thresholds (and everything else) identical on both ranks after Trainer.train()."""
    routers = {k: ROUTERS[k] for k in ("race", "diffmoe")}
    result = _launch(TRAINER_SCRIPT.format(routers=routers), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = _load_ranks(tmp_path)
    for key in routers:
        for name in rank0[key]:
            assert torch.equal(rank0[key][name], rank1[key][name]), f"{key}: {name} differs between ranks"
        assert any(name.endswith("threshold.value_X") for name in rank0[key])

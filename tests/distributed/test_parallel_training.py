"""Parallel layouts train exactly like one process (4 CPU processes, gloo, torchrun).

Every layout of train/layout.py — DDP, FSDP2, FSDP2 + expert parallelism on a 2×2 mesh (efsdp 2 × ep 2)
and on ep 4, with activation checkpointing — trains a tiny MoE-DiT for three optimizer steps, each rank
on its own quarter of the global batch, with the trainer's own pieces (Layout.prepare/apply/wrap,
gradient clipping, the aux-loss-free bias update reduced over ranks). The reference is one process
taking the same four quarters in turn (the routers see each rank's local batch, docs/SCALING.md) with
the loss averaged over them. Parameters after the steps must agree within float32 tolerance, and the
parameters and AdamW moments the fullest rank holds must be what `moedit plan` counts for the layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r'''
import json, sys, torch, torch.distributed as dist
from moedit.config import from_dict
from moedit.distributed.setup import DistInfo, all_reduce_sum
from moedit.models import build_model
from moedit.objectives.rectified_flow import RectifiedFlow
from moedit.distributed import planner
from moedit.train.layout import Layout

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
STEPS = 3
LAYOUTS = {"ddp": ("ddp", 1, "none"), "fsdp": ("fsdp", 1, "full"), "fsdp_ep2": ("fsdp", 2, "none"),
           "fsdp_ep2_moe_only": ("fsdp", 2, "moe_only"), "fsdp_ep4": ("fsdp", 4, "none")}


def config(data, ep, ac):
    return from_dict({"model": {"preset": "micro", "image_size": 8, "patch_size": 2, "class_dropout": 0.0,
                                "moe": {"num_experts": 4, "expert_ratio": 1.0, "num_shared": 1,
                                        "router": {"top_k": 2, "selection_bias": True, "bias_update_rate": 0.01}}},
                      "train": {"grad_clip": 0.05, "lr": 1e-2},
                      "parallel": {"data": data, "ep": ep, "activation_checkpointing": ac}})


def batch(step, q):
    g = torch.Generator().manual_seed(1000 * step + q)
    return torch.randn(4, 1, 8, 8, generator=g), torch.randint(10, (4,), generator=g), 77 * step + q


def loss_of(forward, cfg, step, q):
    x0, y, seed = batch(step, q)
    captured = {}
    def model_fn(*a, **k):
        pred, captured["aux"], _ = forward(*a, **k)
        return pred
    loss, _ = RectifiedFlow().loss(model_fn, x0, y, generator=torch.Generator().manual_seed(seed))
    return loss + sum(cfg.train.aux_weights[n] * v for n, v in captured["aux"].items())


def train(cfg, info, qs):
    torch.manual_seed(rank)  # ranks build different weights: Layout.prepare (or DDP) must make them rank 0's
    model = build_model(cfg.model).train()
    layout = Layout(cfg, info, torch.device("cpu"), None)
    layout.prepare(model)
    layout.apply(model, training=True)
    forward = layout.wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, foreach=True)
    for step in range(STEPS):
        for q in qs:
            (loss_of(forward, cfg, step, q) / len(qs)).backward()
        layout.after_backward(model)
        layout.clip_grad_norm(model, cfg.train.grad_clip)
        opt.step()
        opt.zero_grad()
        model.after_optimizer_step(all_reduce_sum if info.enabled else None)
    return model, opt


def local_numel(t):
    return (t.to_local() if hasattr(t, "to_local") else t).numel()


def held(model, opt):
    """(parameter elements, AdamW moment bytes) this rank holds."""
    params = sum(local_numel(p) for p in model.parameters())
    moments = sum(local_numel(v) * v.element_size() for state in opt.state.values()
                  for k, v in state.items() if k in ("exp_avg", "exp_avg_sq"))
    return params, moments


torch.manual_seed(0)
ref_cfg = config("ddp", 1, "none")
reference = {k: v for k, v in train(ref_cfg, DistInfo(), range(world))[0].state_dict().items()}
results, held_by_layout = {}, {}
for name, (data, ep, ac) in LAYOUTS.items():
    cfg = config(data, ep, ac)
    model, opt = train(cfg, DistInfo(rank=rank, world=world), [rank])
    if data == "fsdp":
        counts = [None] * world
        dist.all_gather_object(counts, held(model, opt))
        facts = planner.model_facts(cfg)
        layout = planner.Layout(data=data, ep=ep)
        predicted = planner.params_per_rank(facts, layout, world).total
        held_by_layout[name] = {"held_max": max(c[0] for c in counts), "moments_max": max(c[1] for c in counts),
                                "planner": predicted}
    worst = 0.0
    for key, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        worst = max(worst, (full - reference[key]).abs().max().item())
    results[name] = worst
if rank == 0:
    json.dump({"worst": results, "held": held_by_layout}, open(sys.argv[1], "w"))
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_layouts_train_like_one_process(tmp_path):
    script = tmp_path / "layouts.py"
    script.write_text(SCRIPT)
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--master_port=29543",
           str(script), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(out.read_text())
    for name, held in results["held"].items():  # the planner's exact figures: what the fullest rank holds
        assert held["held_max"] == held["planner"], f"{name}: a rank holds {held}"
        assert held["moments_max"] == 8 * held["planner"], f"{name}: AdamW state {held}"
    results = results["worst"]
    assert set(results) == {"ddp", "fsdp", "fsdp_ep2", "fsdp_ep2_moe_only", "fsdp_ep4"}
    bad = {name: worst for name, worst in results.items() if worst > 2e-5}
    assert not bad, f"parameters after 3 steps differ from one process by: {bad}"

"""`moedit train --dry-run`: the mesh and what is sharded where, from the same rules the run applies
(mesh.py, expert_parallel.py, parallelize.py), computed on a meta-device model: no process group and
no memory, so it can be read before asking a cluster for N GPUs."""

from __future__ import annotations

import math

import torch

from moedit.config import Config
from moedit.distributed.mesh import check_ep, expert_ranges
from moedit.distributed.parallelize import shard_dim
from moedit.models import build_model


def _ranks(ranks: list[int]) -> str:
    return "{" + ",".join(map(str, ranks)) + "}"


def _local_numel(shape: tuple[int, ...], group: int) -> int:
    if not shape:
        return 1
    d = shard_dim(shape, group)
    return math.ceil(shape[d] / group) * math.prod(s for i, s in enumerate(shape) if i != d)


def describe_layout(cfg: Config, world: int) -> str:
    p = cfg.parallel
    with torch.device("meta"):
        model = build_model(cfg.model)
    total = sum(t.numel() for t in model.parameters())
    lines = [f"parallel layout on {world} rank(s): data={p.data} ep={p.ep} "
             f"activation_checkpointing={p.activation_checkpointing}"]
    ac = {"none": "none", "full": "every block keeps only its input; backward replays it",
          "moe_only": "every MoE feed-forward keeps only its input; backward replays it"}[p.activation_checkpointing]
    if world == 1 or p.data == "ddp":
        what = "one process holds" if world == 1 else f"DDP: each of the {world} ranks holds"
        lines += [f"  {what} all {total:,} parameters; gradients averaged by all-reduce" if world > 1 else
                  f"  {what} all {total:,} parameters", f"  activation checkpointing: {ac}"]
        if world == 1 and (p.data == "fsdp" or p.ep > 1):
            lines.append("  (parallel.data=fsdp / ep apply from 2 ranks on: start with torchrun --nproc_per_node=N)")
        return "\n".join(lines)
    layers = model.moe_layers()
    check_ep(p.ep, world, [layer.experts.num_experts for layer in layers])
    efsdp = world // p.ep
    lines.append(f"  dense mesh dp[{world}]: ranks {_ranks(list(range(world)))}")
    if p.ep > 1:
        ep_groups = [list(range(g * p.ep, (g + 1) * p.ep)) for g in range(efsdp)]
        efsdp_groups = [list(range(e, world, p.ep)) for e in range(p.ep)]
        lines.append(f"  expert mesh efsdp[{efsdp}] x ep[{p.ep}]: ep groups " + " ".join(map(_ranks, ep_groups))
                     + "; efsdp groups " + " ".join(map(_ranks, efsdp_groups)))
    per_rank = 0
    expert_names = {id(t) for layer in layers for t in layer.experts.parameters()} if p.ep > 1 else set()
    for name, t in model.named_parameters():
        if id(t) not in expert_names:
            per_rank += _local_numel(tuple(t.shape), world)
    lines.append("  FSDP2 units (fully_shard over dp unless said; dim 0, or the largest dim where dim 0 < group):")
    lines.append("    root: embeddings, positional table, final layer")
    for index, block in enumerate(model.blocks):
        parts = ["attention, adaLN"]
        if block.moe is not None:
            parts.append("shared experts" if block.moe.shared is not None else None)
            parts.append("routed experts" if p.ep == 1 else None)
        lines.append(f"    blocks.{index}: " + ", ".join(x for x in parts if x))
        if block.moe is None:
            continue
        lines.append(f"    blocks.{index}.moe.router: its own unit, float32 parameters")
        if p.ep > 1:
            E = block.moe.experts.num_experts
            split = ", ".join(f"ep{r}: {s}-{e - 1}" for r, (s, e) in enumerate(expert_ranges(E, p.ep)))
            lines.append(f"    blocks.{index}.moe.experts: {E} experts split over ep ({split}), local experts sharded "
                         f"over efsdp[{efsdp}]; tokens travel by all_to_all")
            local_E = expert_ranges(E, p.ep)[0][1]
            for t in block.moe.experts.parameters():
                per_rank += _local_numel((local_E, *t.shape[1:]), efsdp)
    lines.append(f"  activation checkpointing: {ac}")
    lines.append(f"  parameters per rank (the fullest): {per_rank:,} of {total:,}; `moedit plan` gives memory and traffic")
    return "\n".join(lines)

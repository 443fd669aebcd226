"""The device meshes of a parallel run (docs/SCALING.md §Layout).

Two meshes over the same W ranks, as torchtitan lays out a MoE model:

- `dense`  : 1-D ("dp",) of size W. Every parameter outside the routed experts is sharded (FSDP2) or
             replicated (DDP) over it.
- `experts`: 2-D ("efsdp", "ep") of size (W / ep, ep). The routed experts of every MoE layer are split
             along the expert axis over "ep" (torch.chunk semantics: the first ranks take ⌈E/ep⌉), and
             each rank's local experts are sharded further over "efsdp" by FSDP2.

Rank r sits at efsdp = r // ep, ep = r % ep: the ranks of one expert-parallel group are consecutive,
so on a multi-GPU node the all-to-all of a group stays inside the node whenever ep ≤ GPUs per node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moedit.config import ConfigError


@dataclass
class Meshes:
    world: int
    ep: int
    dense: DeviceMesh
    experts: DeviceMesh

    @property
    def ep_mesh(self) -> DeviceMesh:
        return self.experts["ep"]

    @property
    def efsdp_mesh(self) -> DeviceMesh:
        return self.experts["efsdp"]


def check_ep(ep: int, world: int, routed_experts: list[int]) -> None:
    """parallel.ep must divide the world size and may not exceed any MoE layer's routed experts."""
    if world % ep != 0:
        divisors = ", ".join(str(d) for d in range(1, world + 1) if world % d == 0)
        raise ConfigError(f"parallel.ep={ep} does not divide the {world} ranks torchrun started; choose one of "
                          f"{divisors} (or start a multiple of {ep} processes)")
    for count in sorted(set(routed_experts)):
        sizes = [end - start for start, end in expert_ranges(count, ep)]
        if min(sizes) == 0:
            fit = [d for d in range(1, count + 1) if count % d == 0 and world % d == 0]
            raise ConfigError(f"parallel.ep={ep} would leave a rank without an expert: a MoE layer's {count} routed "
                              f"experts split {'/'.join(map(str, sizes))} over {ep} ranks; choose parallel.ep from "
                              f"{', '.join(map(str, fit))}")


def build_meshes(device_type: str, world: int, ep: int) -> Meshes:
    dense = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    experts = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("efsdp", "ep"))
    return Meshes(world=world, ep=ep, dense=dense, experts=experts)


def expert_ranges(num_experts: int, ep: int) -> list[tuple[int, int]]:
    """[start, end) of the experts each ep rank holds, as DTensor's Shard(0) splits them (torch.chunk)."""
    sizes = [chunk.numel() for chunk in torch.arange(num_experts).chunk(ep)]
    sizes += [0] * (ep - len(sizes))
    starts = [sum(sizes[:i]) for i in range(ep)]
    return [(s, s + n) for s, n in zip(starts, sizes)]

"""Apply a `parallel` layout to a built DiT from outside: expert parallelism, FSDP2 and activation
checkpointing (docs/SCALING.md). models/ and moe/ stay single-device code; everything here is
torch.distributed (DeviceMesh, DTensor, `fully_shard`).

FSDP2 units, innermost first (each `fully_shard` call gathers its parameters for its forward and
backward and reduce-scatters their gradients):

- `blocks.<i>.moe.router`  over `dp`, float32 parameters whatever the compute dtype (the routers'
  scores decide discrete choices: the bf16 trap, docs/PRECISION.md);
- `blocks.<i>.moe.experts` under ep > 1 over `efsdp`, the local experts only;
- `blocks.<i>`              over `dp`: attention, adaLN, norms, shared experts (and the experts when ep = 1);
- the root                  over `dp`: embeddings, positional table, final layer.

Every unit shards a parameter along dim 0, or along its largest dimension where dim 0 has fewer rows
than the group has ranks (`shard_dim`: a shared expert's (1, D, H), a rank's few local experts), so no
rank holds whole tensors while others hold padding.

Gradients: FSDP2 averages over its group. Under ep > 1 an expert's gradient arrives already summed
over the ep group by the all-to-all's backward, so after FSDP2's average over the efsdp group (none
when efsdp = 1) it is ep× the data-parallel mean; `scale_expert_grads` divides it by ep once per
optimizer step. (FSDP2's own divide factor would do it inside the reduce-scatter, but it needs a
pre-multiplied sum gloo lacks, and FSDP2 skips the reduction, and with it the factor, on a group of one.)

Mixed precision on CUDA with train.precision bf16/auto: bf16 parameters for compute, float32 gradient
reduction, float32 routers; on CPU everything stays float32.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from moedit.config import ParallelConfig
from moedit.distributed.checkpointing import apply_activation_checkpointing
from moedit.distributed.expert_parallel import apply_expert_parallel
from moedit.distributed.mesh import Meshes


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Every rank gets rank `src`'s parameters and buffers (ranks build their models with different seeds;
    DDP does the same at construction)."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src)


def mixed_precision(amp_dtype: torch.dtype | None, device_type: str) -> tuple[MixedPrecisionPolicy, MixedPrecisionPolicy]:
    """(policy for blocks and root, policy for routers)."""
    if device_type != "cuda" or amp_dtype is None:
        return MixedPrecisionPolicy(), MixedPrecisionPolicy()
    return (MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32),
            MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))


def shard_dim(shape: tuple[int, ...], group: int) -> int:
    """The dimension FSDP2 shards a parameter of this (local) shape along over `group` ranks: dim 0, unless
    it has fewer rows than ranks (one shared expert's (1, D, H), a rank's few local experts), where dim 0
    would put whole rows on the first ranks and padding on the rest; then the largest dimension."""
    if len(shape) == 0 or shape[0] >= group:
        return 0
    return max(range(len(shape)), key=lambda d: (shape[d], -d))


def _placement(group: int):
    def placement(param: nn.Parameter) -> Shard:
        local = param.to_local() if hasattr(param, "to_local") else param
        return Shard(shard_dim(tuple(local.shape), group))

    return placement


def _quiet_known_warnings() -> None:
    """Two messages that do not apply here and would repeat in every run's log: FSDP2 warns when a unit
    returns views (a router's Routing holds some) because an in-place op on them would skip its hook —
    nothing modifies a Routing in place; DTensor logs that gathering an expert tensor sharded on two mesh
    dimensions takes two all-gathers — which it does, only for samples, probes and exports."""
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


def apply_fsdp(model: nn.Module, meshes: Meshes, amp_dtype: torch.dtype | None, device_type: str) -> None:
    _quiet_known_warnings()
    policy, router_policy = mixed_precision(amp_dtype, device_type)
    dense = _placement(meshes.world)
    for block in model.blocks:
        if block.moe is not None:
            fully_shard(block.moe.router, mesh=meshes.dense, mp_policy=router_policy, shard_placement_fn=dense)
            if meshes.ep > 1:
                fully_shard(block.moe.experts, mesh=meshes.efsdp_mesh, mp_policy=policy,
                            shard_placement_fn=_placement(meshes.efsdp_mesh.size()))
        fully_shard(block, mesh=meshes.dense, mp_policy=policy, shard_placement_fn=dense)
    fully_shard(model, mesh=meshes.dense, mp_policy=policy, shard_placement_fn=dense)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in model.moe_layers() for p in layer.experts.parameters()]


@torch.no_grad()
def scale_expert_grads(model: nn.Module, ep: int) -> None:
    """After the last backward of an optimizer step under ep > 1: expert gradients from the sum over the
    ep group to the mean over all ranks (module docstring)."""
    if ep <= 1:
        return
    for param in expert_parameters(model):
        if param.grad is not None:
            param.grad.mul_(1.0 / ep)


def parallelize(model: nn.Module, cfg: ParallelConfig, meshes: Meshes | None, amp_dtype: torch.dtype | None,
                device_type: str, training: bool = True) -> nn.Module:
    """The model, changed in place: checkpointed (training only), experts split, sharded. `meshes` None:
    one process or DDP, only activation checkpointing applies. Every rank must hold the same weights."""
    if training and cfg.activation_checkpointing != "none":
        apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if meshes is None or cfg.data != "fsdp":
        return model
    if meshes.ep > 1:
        apply_expert_parallel(model, meshes.ep_mesh)
    apply_fsdp(model, meshes, amp_dtype, device_type)
    return model

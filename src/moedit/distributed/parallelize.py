"""Apply a `parallel` layout to a built DiT from outside: expert parallelism, FSDP2 and activation
checkpointing (docs/SCALING.md). models/ and moe/ stay single-device code; everything here is
torch.distributed (DeviceMesh, DTensor, `fully_shard`).

FSDP2 units, innermost first (each `fully_shard` call gathers its parameters for its forward and
backward and reduce-scatters their gradients):

- `blocks.<i>.moe.router`  over `dp`, float32 parameters whatever the compute dtype (the routers'
  scores decide discrete choices: the bf16 trap, docs/PRECISION.md);
- `blocks.<i>.moe.experts` under ep > 1 over `efsdp`, the local experts only (dim 0, or dim 1 when a
  rank holds fewer experts than there are efsdp ranks, as torchtitan does);
- `blocks.<i>`              over `dp`: attention, adaLN, norms, shared experts (and the experts when ep = 1);
- the root                  over `dp`: embeddings, positional table, final layer.

Gradients: FSDP2 averages over its group. Under ep > 1 an expert's gradient arrives already summed
over the ep group by the all-to-all's backward, so averaging it over the efsdp group alone would leave
it ep× too large; the experts' units divide by the world size instead, with sum-only reductions
(gloo has no pre-multiplied sum).

Mixed precision on CUDA with train.precision bf16/auto: bf16 parameters for compute, float32 gradient
reduction, float32 routers; on CPU everything stays float32.
"""

from __future__ import annotations

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


def _expert_placement(efsdp: int):
    def placement(param: nn.Parameter) -> Shard:
        local_experts = param.to_local().shape[0] if hasattr(param, "to_local") else param.shape[0]
        return Shard(0) if local_experts >= efsdp else Shard(1)

    return placement


def apply_fsdp(model: nn.Module, meshes: Meshes, amp_dtype: torch.dtype | None, device_type: str) -> None:
    policy, router_policy = mixed_precision(amp_dtype, device_type)
    for block in model.blocks:
        if block.moe is not None:
            fully_shard(block.moe.router, mesh=meshes.dense, mp_policy=router_policy)
            if meshes.ep > 1:
                experts = fully_shard(block.moe.experts, mesh=meshes.efsdp_mesh, mp_policy=policy,
                                      shard_placement_fn=_expert_placement(meshes.efsdp_mesh.size()))
                experts.set_gradient_divide_factor(float(meshes.world))
                experts.set_force_sum_reduction_for_comms(True)
        fully_shard(block, mesh=meshes.dense, mp_policy=policy)
    fully_shard(model, mesh=meshes.dense, mp_policy=policy)


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

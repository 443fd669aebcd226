"""Gradient-norm clipping for sharded parameters (FSDP2, expert parallelism).

torch.nn.utils.clip_grad_norm_ reduces DTensor norms per device mesh and cannot combine the dense
mesh ("dp") with the experts' ("efsdp", "ep"). Here the sum of squares is taken over each rank's local
shards and summed over all ranks once: under FSDP2 every element of every parameter lives on exactly
one rank (sharded on every mesh dimension, padding excluded from the local tensors), so

    ‖g‖ = sqrt( all_reduce_sum_r Σ_p ‖local_r(g_p)‖² )

and each local shard is scaled by min(1, max_norm / (‖g‖ + 1e-6)), as torch's clip does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def clip_sharded_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The total gradient norm before clipping (float32 scalar, the same on every rank)."""
    grads = [_local(p.grad) for p in parameters if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    square = torch.zeros((), device=device, dtype=torch.float32)
    for g in grads:
        square = square + g.float().square().sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(square, op=dist.ReduceOp.SUM)
    norm = square.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return norm

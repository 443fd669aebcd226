"""Expert parallelism: the routed experts of a MoE layer split over the ranks of an `ep` group, behind the
same `Routing` contract as one process (docs/SCALING.md §Expert parallelism).

Each rank routes its own tokens (the router is local, as under DDP) and then, per layer:

    1. sorts its assignments by expert; experts [s_p, e_p) live on ep rank p (mesh.expert_ranges), so
       the rows for rank p are one contiguous slice;
    2. exchanges the per-expert counts (one all_to_all of P·X integers, X = the most experts a rank holds)
       and reads the split sizes to the host (the one synchronisation of a layer);
    3. sends the rows with a differentiable all_to_all_single of uneven splits: rank p receives, from each
       source rank q in turn, q's rows for p's local experts, expert by expert;
    4. runs its local experts on them through the single-process dispatcher (moe/dispatch.py, any
       backend), each row an assignment of weight 1, as the experts module's forward (so FSDP2 gathers
       the local experts around it, and around its backward);
    5. sends the outputs back by the reverse all_to_all and combines them with the routing weights:
       y_i = Σ_{(i,e,w)} w · Expert_e(x_i), in float32 as moe/dispatch.py does.

Backward runs the two exchanges in reverse, so an expert's gradient is the sum over every rank's
tokens routed to it (the all_to_all's backward is itself an all_to_all). A rank that routes nothing to
an expert rank, or receives no row at all, still takes part in every exchange with empty slices, and
its local experts get zero gradients (never None), so the FSDP reduce-scatter that follows sees the
same parameters on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch import nn

from moedit.distributed.mesh import expert_ranges
from moedit.moe.dispatch import _compute_dtype, dispatch
from moedit.moe.experts import StackedExperts
from moedit.moe.routing import Routing


class ExpertParallelDispatch:
    """A `MoELayer.dispatch_fn` for experts split over `group` as `ranges` (one [start, end) per ep rank)."""

    def __init__(self, group: dist.ProcessGroup, ranges: list[tuple[int, int]]):
        self.group, self.ranges = group, ranges
        self.ep = len(ranges)
        self.rank = dist.get_rank(group)
        self.width = max(end - start for start, end in ranges)  # X: count slots per rank in the exchange

    def __repr__(self) -> str:
        start, end = self.ranges[self.rank]
        return f"ExpertParallelDispatch(ep={self.ep}, local experts [{start}, {end}))"

    def _slots_PX(self, counts_E: torch.Tensor) -> torch.Tensor:
        """counts_E laid out per destination rank, padded to X experts each."""
        slots_PX = counts_E.new_zeros(self.ep, self.width)
        for p, (start, end) in enumerate(self.ranges):
            slots_PX[p, : end - start] = counts_E[start:end]
        return slots_PX

    def _exchange_counts(self, counts_E: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        send_PX = self._slots_PX(counts_E)
        recv_PX = torch.empty_like(send_PX)
        dist.all_to_all_single(recv_PX, send_PX, group=self.group)
        splits = torch.stack([send_PX.sum(1), recv_PX.sum(1)]).tolist()  # the host sync of this layer
        return recv_PX, splits[0], splits[1]

    def __call__(self, x_ND: torch.Tensor, routing: Routing, experts: StackedExperts, backend: str = "auto"):
        if routing.num_tokens != x_ND.shape[0]:
            raise ValueError(f"routing covers {routing.num_tokens} tokens but x has {x_ND.shape[0]}")
        order_M = torch.argsort(routing.expert_M, stable=True)
        token_M, weight_M = routing.token_M[order_M], routing.weight_M[order_M]
        recv_PX, send_splits, recv_splits = self._exchange_counts(routing.load_E())
        xs_MD = x_ND.to(_compute_dtype(x_ND))[token_M]
        xr_RD = all_to_all_single_autograd(xs_MD, recv_splits, send_splits, self.group)
        yr_RD = self._run_local(xr_RD, recv_PX, experts, backend)
        ys_MD = all_to_all_single_autograd(yr_RD, send_splits, recv_splits, self.group)
        weighted_MD = (ys_MD.float() * weight_M.float()[:, None]).to(x_ND.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_M, weighted_MD)

    def _run_local(self, xr_RD: torch.Tensor, recv_PX: torch.Tensor, experts: StackedExperts,
                   backend: str) -> torch.Tensor:
        start, end = self.ranges[self.rank]
        local = end - start
        rows = xr_RD.shape[0]
        expert_R = torch.repeat_interleave(torch.arange(local, device=xr_RD.device).repeat(self.ep),
                                           recv_PX[:, :local].reshape(-1), output_size=rows)
        local_routing = Routing(token_M=torch.arange(rows, device=xr_RD.device), expert_M=expert_R,
                                weight_M=torch.ones(rows, device=xr_RD.device), num_tokens=rows, num_experts=local,
                                per_token=1)
        # through the module's __call__, so that FSDP2 gathers the local experts for it (and for its backward)
        return experts(xr_RD, local_routing, backend)


def _local_experts_forward(experts: StackedExperts):
    """The forward an expert-parallel StackedExperts gets: its local experts on the rows it received."""

    def forward(xr_RD: torch.Tensor, routing: Routing, backend: str) -> torch.Tensor:
        # with no row the output still depends on xr_RD, so this rank joins the exchange's backward
        yr_RD = dispatch(xr_RD, routing, experts, backend) if routing.num_tokens else xr_RD * 0
        # every local expert parameter in the graph, also when no row arrived: zero gradients, never None
        anchor = sum(p.to_local().sum() if isinstance(p, DTensor) else p.sum() for p in experts.parameters())
        return yr_RD + (0.0 * anchor).to(yr_RD.dtype)

    return forward


def shard_experts(layer: nn.Module, ep_mesh, ranges: list[tuple[int, int]]) -> None:
    """Make each stacked routed-expert parameter a DTensor split along the expert axis over `ep_mesh`
    and route the layer through the exchange. Every rank must hold the same full tensors (the caller
    broadcast them from rank 0), so no data moves here."""
    experts: StackedExperts = layer.experts
    for name, param in list(experts.named_parameters(recurse=False)):
        if param.shape[0] != experts.num_experts:
            continue
        sharded = distribute_tensor(param.detach().contiguous(), ep_mesh, [Shard(0)], src_data_rank=None)
        experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    experts.forward = _local_experts_forward(experts)
    layer.dispatch_fn = ExpertParallelDispatch(ep_mesh.get_group(), ranges)


def apply_expert_parallel(model: nn.Module, ep_mesh) -> None:
    for layer in model.moe_layers():
        shard_experts(layer, ep_mesh, expert_ranges(layer.experts.num_experts, ep_mesh.size()))

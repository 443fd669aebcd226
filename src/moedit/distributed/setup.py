"""Data-parallel set-up under torchrun: one process per device, DDP around the built model (FSDP2 and
expert parallelism: distributed/parallelize.py).

Launched by plain `python`/`moedit`, nothing here does anything (world size 1). Under
`torchrun --nproc_per_node=N moedit train ...` each process joins the group (NCCL on CUDA, gloo on
CPU), trains on its own shard of every step's batches, and rank 0 alone writes the run directory.
Every collective waits at most parallel.timeout_s: a rank that died or hangs ends the others with
an error instead of a silent wait (torchrun, seeing one process fail, also stops the rest).
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


_TIMEOUT_S: float | None = None  # what init_distributed gave the group, for lost_peer_message


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistInfo:
    global _TIMEOUT_S
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    _TIMEOUT_S = timeout_s
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    info = DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


class ForwardWithAux(torch.nn.Module):
    """The model's forward returning (prediction, aux, aux_by_layer): the auxiliary losses combined over
    MoE layers as `over_layers` says (`DiT.aux_losses`), and each layer's own, keyed `name/block<i>`.

    DDP with find_unused_parameters=True walks the autograd graph of the forward's *output* to
    learn which parameters this step uses. Parameters reached only by an auxiliary loss (race's
    target heads through `plr`, DiffMoE's capacity predictor through `capacity`) are invisible
    from the prediction alone: DDP would mark them unused, then see their gradient arrive in
    backward and fail ("marked as ready twice"). Returning the aux losses from the wrapped
    forward puts them in the graph DDP walks.
    """

    def __init__(self, model: torch.nn.Module, over_layers: str = "peers") -> None:
        super().__init__()
        self.model, self.over_layers = model, over_layers

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        prediction = self.model(*args, **kwargs)
        by_layer = {f"{name}/block{index}": value
                    for name, by_block in self.model.aux_losses_by_layer().items() for index, value in by_block.items()}
        return prediction, self.model.aux_losses(self.over_layers), by_layer


def wrap_data_parallel(model: torch.nn.Module, info: DistInfo, device: torch.device,
                       over_layers: str = "peers") -> torch.nn.Module:
    """`ForwardWithAux(model, over_layers)`, inside DDP when more than one process trains."""
    step_model = ForwardWithAux(model, over_layers)
    if not info.enabled:
        return step_model
    ids = [device.index] if device.type == "cuda" else None
    # routers may leave some experts without tokens on a step: their parameters get no gradient
    return DistributedDataParallel(step_model, device_ids=ids, find_unused_parameters=True)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).item()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_rank() -> bool:
    return not _active() or dist.get_rank() == 0


def broadcast_object(obj):
    """Rank 0's `obj` (picklable) on every rank; world size 1: `obj`."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks_agree(ok: bool, device: torch.device) -> bool:
    """True on every rank when `ok` is true on every rank (one MIN all-reduce; world size 1: `ok`)."""
    if not _active():
        return ok
    flag = torch.tensor([1 if ok else 0], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gather_to_main(obj):
    """Every rank's `obj` as a list in rank order on every rank (world size 1: `[obj]`). For small
    picklable values such as RNG states; a collective: every rank must call it."""
    if not _active():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def first_flagged_step(first_bad: torch.Tensor) -> int:
    """The earliest step any rank flagged (−1 = none), from each rank's device scalar (−1 = none)."""
    if not _active():
        return int(first_bad)
    never = torch.iinfo(torch.long).max
    value = torch.where(first_bad < 0, torch.full_like(first_bad, never), first_bad).reshape(1).clone()
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return -1 if int(value) == never else int(value)


def barrier() -> None:
    if _active():
        dist.barrier()


def shutdown() -> None:
    if _active():
        dist.destroy_process_group()


# What gloo, NCCL and the c10d store say when a peer is gone or silent (they raise plain RuntimeErrors or
# DistError subclasses whose text is all there is to go on).
_LOST_PEER = re.compile(r"connection (reset|closed|refused)|broken pipe|timed? ?out|timeout|"
                        r"communicator was aborted|socket (closed|timeout)", re.IGNORECASE)


def lost_peer_message(exc: BaseException) -> str | None:
    """One clear paragraph when `exc` says this rank lost the others (a rank died, was killed, or stopped
    answering for parallel.timeout_s); None for any other error, and outside a multi-rank run."""
    if _TIMEOUT_S is None or not isinstance(exc, RuntimeError):
        return None
    distributed_error = isinstance(exc, getattr(dist, "DistError", ()))
    text = str(exc)
    if not (distributed_error or _LOST_PEER.search(text)):
        return None
    where = f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}"
    cause = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    cause = re.sub(r"^\[[^\]]*\] ?", "", cause)  # drop the "[.../pair.cc:537]" source location
    cause = cause.split(" This is typically caused")[0].rstrip(". ")[:300]
    return (f"{where} lost contact with the other ranks ({cause}). Another rank died, was killed or "
            f"stopped answering for parallel.timeout_s = {_TIMEOUT_S:g} s: its own log says why. Checkpoints "
            "already completed are kept; fix the cause and continue with `moedit train ... --resume`.")

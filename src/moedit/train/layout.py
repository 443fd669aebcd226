"""What the trainer asks of the parallel layout (docs/SCALING.md), in one place:

- replicated: one process, or DDP (parallel.data=ddp): every rank holds the whole model; plain
  checkpoints (train/checkpoint.py); torch's gradient clipping; samples from the EMA model itself;
- sharded: parallel.data=fsdp under torchrun: FSDP2 units, experts split over parallel.ep ranks
  (distributed/parallelize.py); sharded checkpoints (train/sharded_checkpoint.py); clipping over local
  shards (distributed/grads.py); samples from a plain copy of the EMA weights gathered on rank 0.

One process with parallel.data=fsdp has nothing to shard: it trains replicated (and says so). Either
layout resumes from either checkpoint format, at any world size and `ep`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moedit.config import Config
from moedit.distributed.grads import clip_sharded_grad_norm_
from moedit.distributed.mesh import Meshes, build_meshes, check_ep
from moedit.distributed.parallelize import broadcast_module, parallelize, scale_expert_grads
from moedit.distributed.setup import DistInfo, wrap_data_parallel
from moedit.models import build_model
from moedit.train import checkpoint as ckpt
from moedit.train import sharded_checkpoint as sharded_ckpt


class Layout:
    def __init__(self, cfg: Config, info: DistInfo, device: torch.device, amp_dtype: torch.dtype | None):
        self.cfg, self.info, self.device, self.amp_dtype = cfg, info, device, amp_dtype
        self.sharded = info.enabled and cfg.parallel.data == "fsdp"
        self.meshes: Meshes | None = None
        self._sampler: nn.Module | None = None
        p = cfg.parallel
        self.ignored = [] if self.sharded or not (p.data == "fsdp" or p.ep > 1) else [
            f"parallel.data={p.data} parallel.ep={p.ep}: one process has nothing to shard; training it whole"]

    def describe(self) -> str:
        p = self.cfg.parallel
        if not self.info.enabled:
            return "1 process"
        if not self.sharded:
            return f"DDP over {self.info.world} ranks"
        return f"FSDP2 over {self.info.world} ranks" + (f", experts split over ep={p.ep}" if p.ep > 1 else "")

    def prepare(self, model: nn.Module) -> None:
        """Before the EMA copy is taken: the meshes, and rank 0's initial weights on every rank."""
        if not self.sharded:
            return
        check_ep(self.cfg.parallel.ep, self.info.world, [layer.experts.num_experts for layer in model.moe_layers()])
        self.meshes = build_meshes(self.device.type, self.info.world, self.cfg.parallel.ep)
        broadcast_module(model)

    def apply(self, model: nn.Module, training: bool) -> nn.Module:
        return parallelize(model, self.cfg.parallel, self.meshes, self.amp_dtype, self.device.type, training)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The forward the step calls: DDP around it when replicated over several ranks."""
        info = self.info if not self.sharded else DistInfo()  # FSDP2 reduces gradients itself
        return wrap_data_parallel(model, info, self.device, self.cfg.train.aux_over_layers)

    def after_backward(self, model: nn.Module) -> None:
        """Once per optimizer step, after the last micro-batch's backward (distributed/parallelize.py)."""
        if self.sharded:
            scale_expert_grads(model, self.cfg.parallel.ep)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        if self.sharded:
            return clip_sharded_grad_norm_(model.parameters(), max_norm)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    # ---- checkpoints

    def save(self, ckpt_root: Path, step: int, model, ema_model, optimizer, model_config: dict, extra: dict,
             rng_by_rank: list, final: bool) -> Path | None:
        """Every rank calls this; rank 0 writes a plain checkpoint, every rank its shards of a sharded one."""
        keep = self.cfg.train.keep_last
        if self.sharded:
            extra = {**extra, "parallel": {"data": "fsdp", "ep": self.cfg.parallel.ep, "world": self.info.world}}
            return sharded_ckpt.save_sharded(ckpt_root, step, model, ema_model, optimizer, model_config, extra, keep,
                                             rng_by_rank, with_weights=final)
        if not self.info.is_main:
            return None
        return ckpt.save_checkpoint(ckpt_root, step, model, ema_model, optimizer, model_config, extra, keep,
                                    rng_by_rank=rng_by_rank)

    def load(self, path: Path, state: dict, model, ema_model, optimizer) -> str | None:
        """Weights, EMA, optimizer and this rank's RNG from either format; returns the inexact-resume note."""
        rank, world = self.info.rank, self.info.world
        if ckpt.is_sharded(state):
            sharded_ckpt.load_sharded(path, model, ema_model, optimizer)
            return sharded_ckpt.restore_rng(path, state, rank, world)
        if self.sharded:
            sharded_ckpt.load_plain_into_sharded(path, model, ema_model, optimizer, state)
            if state.get("weights_only"):
                return None
            return ckpt.restore_rng(ckpt.load_tensors(path, "trainer.safetensors"), state.get("world_size", 1),
                                    rank, world)
        ckpt.load_weights(model, path, "model.safetensors")
        ckpt.load_weights(ema_model, path, "ema.safetensors")
        return ckpt.load_trainer_state(path, optimizer, state, rank, world)

    # ---- sampling

    def sampling_model(self, ema_model: nn.Module) -> nn.Module | None:
        """The EMA model to sample from on rank 0 (None on the other ranks). Sharded: a collective that
        gathers the EMA weights into a plain model on rank 0, kept for the next grid."""
        if not self.sharded:
            return ema_model if self.info.is_main else None
        weights = sharded_ckpt.full_weights(ema_model)
        if not self.info.is_main:
            return None
        if self._sampler is None:
            self._sampler = build_model(self.cfg.model).to(self.device).eval().requires_grad_(False)
        self._sampler.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        return self._sampler



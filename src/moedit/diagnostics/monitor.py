"""The routing monitor: where every MoE layer sends its tokens, step by step, cheap enough to leave on.

After each forward it reads every MoE layer's `last_routing` (token_M, expert_M, weight_M, scores_NE)
and the batch's t and labels (after classifier-free dropout, from `model.last_context`), and adds,
per layer, into one flat float32 accumulator on the device (record.py lists the fields):

    load_e                 assignments per expert, also split by timestep bucket and by class slot, and
                           for a video model (F = frames > 1 temporal token positions) by frame
    top1_e                 tokens whose highest raw score is e       → top-1 share = max_e top1_e / N
    fanout_j               tokens that got j experts (0..E)          → experts per token, share with 0
    H_i = −Σ_e p_ie log p_ie / log E_s   normalised score entropy, 1 = uniform, where p_i is the
                           scores themselves for softmax routers, s_i/Σs_i for sigmoid ones, and
                           softmax(s_i) for identity scores (race's logits, ProMoE's cosines: their
                           softmax is near uniform by construction, so rely on the cosine there)
    Σ w                    combine weights                           → mean weight per assignment
    cos                    every `probe_every` steps: all experts run on `probe_tokens` inputs of
                           the layer (evenly spaced over the batch); mean over pairs e ≠ f and tokens
                           of cos(Expert_e(x), Expert_f(x))           (homogenisation, docs/ROUTING_MATH.md §7.1)

Every `every` steps the accumulator is copied into a pending list (still on the device) and zeroed;
`flush()` (the trainer calls it at each log step) stacks the pending records, all-reduces them with
one SUM across data-parallel ranks, moves them to the host once, and rank 0 appends them to
RUN/routing/ and feeds the detectors. So a forward costs about sixty small kernels, whatever the
depth, and no host sync.
A few tokens per record (`token_samples`, rank 0's batch) keep their raw decisions (tokens.bin), with
their frame for a video model.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moedit.config import Config, DiagnosticsConfig
from moedit.diagnostics import record as rec
from moedit.diagnostics.detectors import Detectors, describe, summary_lines
from moedit.moe.experts import StackedExperts
from moedit.moe.routing import Routing, RoutingContext


def score_entropy(scores_NE: torch.Tensor, kind: str) -> torch.Tensor:
    """Normalised entropy of each token's score distribution over the last dim (module docstring), float32."""
    s_NE = scores_NE.float()
    if kind == "identity":
        p_NE = torch.softmax(s_NE, dim=-1)
    else:  # softmax scores are a distribution already; sigmoid scores are normalised by their sum
        s_NE = s_NE.clamp_min(0)
        p_NE = s_NE / s_NE.sum(-1, keepdim=True).clamp_min(1e-12)
    E = s_NE.shape[-1]
    if E < 2:
        return torch.zeros(s_NE.shape[:-1], device=s_NE.device)
    # −Σ p·log p with 0·log 0 = 0 (clamped); mul and log vectorise, torch.special.entr is 2× slower on CPU
    return -(p_NE * p_NE.clamp_min(1e-12).log()).sum(-1) / float(np.log(E))


@torch.no_grad()
def expert_cosine(experts: StackedExperts, x_PD: torch.Tensor) -> torch.Tensor:
    """Mean over expert pairs e ≠ f and the P probe tokens of cos(Expert_e(x), Expert_f(x)), in float32.
    Sharded experts (FSDP2, expert parallelism) are gathered whole first, on every rank."""
    E, P = experts.num_experts, x_PD.shape[0]
    if E < 2 or P == 0:
        return torch.ones((), device=x_PD.device)
    x_PD = x_PD.float()
    y_EPD = torch.stack([F.normalize(StackedExperts.apply(experts.kind, w, x_PD), dim=-1)
                         for w in experts.per_expert(torch.float32, full=True)])
    cos_EE = torch.einsum("epd,fpd->ef", y_EPD, y_EPD) / P
    return (cos_EE.sum() - cos_EE.diagonal().sum()) / (E * (E - 1))


def flatten_routings(routings: list[Routing]) -> tuple[torch.Tensor, ...]:
    """Every layer's assignments in one list of A = Σ_y M_y, tagged with the layer index y, so that
    one kernel per statistic serves all layers (a layer loop would launch Y times as many)."""
    layer_A = torch.cat([torch.full_like(r.expert_M, y) for y, r in enumerate(routings)])
    token_A = torch.cat([r.token_M for r in routings])
    expert_A = torch.cat([r.expert_M for r in routings])
    weight_A = torch.cat([r.weight_M.detach().float() for r in routings])
    return layer_A, token_A, expert_A, weight_A


def sample_rows_N(token_S: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Row s for the s-th sampled token, S for every other token (token_decisions' table layout)."""
    S = token_S.shape[0]
    row_N = torch.full((num_tokens,), S, dtype=torch.long, device=token_S.device)
    row_N[token_S] = torch.arange(S, device=token_S.device)
    return row_N


def token_decisions(flat: tuple[torch.Tensor, ...], row_N: torch.Tensor, Y: int, S: int, E: int, K: int):
    """For S sampled tokens in each of Y layers: (count_YS, expert_YSK, weight_YSK), the K highest-weight
    experts (−1 = none). Built with index_put on a Y·(S + 1) × E table (row S of each layer collects
    every other token) to avoid a data-dependent boolean mask, which would sync the device."""
    layer_A, token_A, expert_A, weight_A = flat
    at = (layer_A * (S + 1) + row_N[token_A], expert_A)
    weight_YSE = torch.zeros(Y * (S + 1), E, device=row_N.device).index_put_(at, weight_A, accumulate=True)
    hits_YSE = torch.zeros_like(weight_YSE).index_put_(at, torch.ones_like(weight_A), accumulate=True)
    weight_YSE, hits_YSE = weight_YSE.view(Y, S + 1, E)[:, :S], hits_YSE.view(Y, S + 1, E)[:, :S]
    chosen_YSE = hits_YSE > 0
    top = weight_YSE.masked_fill(~chosen_YSE, float("-inf")).topk(min(K, E), dim=-1)
    expert_YSK = torch.where(chosen_YSE.gather(-1, top.indices), top.indices, -1)
    weight_YSK = torch.where(expert_YSK >= 0, top.values, 0.0)
    return chosen_YSE.sum(-1), expert_YSK, weight_YSK


def class_slots(num_classes: int, max_classes: int) -> list[str]:
    kept = min(num_classes, max_classes)
    return [str(c) for c in range(kept)] + (["other"] if num_classes > kept else []) + ["null"]


class RoutingMonitor:
    def __init__(self, cfg: DiagnosticsConfig, layers: list, blocks: list[int], depth: int, num_classes: int,
                 run_dir: Path | None, start_step: int = 0, seed: int = 0, reduce_fn=None, log=print,
                 frames: int = 1):
        """`layers`: the model's MoELayers; `run_dir` None on ranks other than 0 (they only reduce); `frames`:
        the model's temporal token positions (RoutingContext.frames; 1 for images), fixed for the run."""
        if frames < 1:
            raise ValueError(f"frames must be ≥ 1, got {frames}")
        self.cfg, self.layers, self.reduce_fn, self.log, self.seed = cfg, layers, reduce_fn, log, seed
        self.device = next(layers[0].parameters()).device
        self.E = layers[0].experts.num_experts
        self.num_classes = num_classes
        slots = class_slots(num_classes, cfg.max_classes)
        self.C, self.T, self.K = len(slots), cfg.t_buckets, min(rec.TOKEN_SLOTS, self.E)
        self.F = frames
        self._frame_N: dict[tuple[int, int], torch.Tensor] = {}  # (B, L) -> each token's frame, built once
        kinds = [layer.cfg.router.score or "softmax" for layer in layers]
        self.score_kind = kinds[0]  # every MoE layer is built from the one model.moe.router config
        self._layer_Y1 = torch.arange(len(layers), device=self.device)[:, None]
        self.header = rec.make_header(blocks, depth, self.E, kinds, cfg.t_buckets, num_classes, slots, cfg.every,
                                      self.K, frames)
        self._fields = [f for f in rec.record_fields(len(layers), self.E, self.T, self.C, self.F) if f[1] == "<f4"]
        sizes = [int(np.prod(shape)) for _, _, shape in self._fields]
        self._acc = torch.zeros(sum(sizes), device=self.device)
        self.acc = {name: view.view(shape) for (name, _, shape), view in zip(self._fields, self._acc.split(sizes))}
        self._ones = torch.ones(1, device=self.device)
        self._pending: list[torch.Tensor] = []
        self._pending_steps: list[tuple[int, int]] = []
        self._pending_tokens: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._window_steps, self._step = 0, start_step + 1  # the step now being run
        self._probe_x: dict[int, torch.Tensor] = {}
        self._step_tokens: tuple[torch.Tensor, torch.Tensor] | None = None
        self._hooks = [layer.register_forward_pre_hook(self._capture_hook(y)) for y, layer in enumerate(layers)]
        self.detectors = Detectors(cfg, blocks, depth)
        self.writer = None
        if run_dir is not None:
            self.writer = rec.RecordWriter(Path(run_dir) / "routing", self.header, start_step, log)
            self.detectors.update(self.writer.existing_records())  # resume: the streaks so far, no new events

    # ---- per step (device only)

    def _probe_due(self) -> bool:
        return self.cfg.probe_every > 0 and self._step % self.cfg.probe_every == 0

    def _capture_hook(self, y: int):
        def hook(module, args):
            if self._probe_due() and module.training:
                x_ND = args[0].reshape(-1, args[0].shape[-1])
                stride = max(1, x_ND.shape[0] // self.cfg.probe_tokens)
                self._probe_x[y] = x_ND.detach()[::stride][: self.cfg.probe_tokens].float().clone()
        return hook

    def _ones_n(self, n: int) -> torch.Tensor:
        if self._ones.shape[0] < n:
            self._ones = torch.ones(max(n, 2 * self._ones.shape[0]), device=self.device)
        return self._ones[:n]

    @torch.no_grad()
    def observe_model(self, model) -> None:
        ctx = model.last_context
        frames = getattr(ctx, "frames", 1)
        if frames != self.F:
            raise ValueError(f"routing monitor: the model's context has frames={frames} but the monitor was built for "
                             f"frames={self.F} (the model's temporal token positions, fixed for a run)")
        self.observe([layer.last_routing for layer in self.layers], ctx.t_B, ctx.labels_B)

    @torch.no_grad()
    def observe(self, routings: list[Routing], t_B: torch.Tensor, labels_B: torch.Tensor | None) -> None:
        """Add one forward's routing (one micro-batch) to the current record."""
        B, N = t_B.shape[0], routings[0].num_tokens
        L = N // B
        tb_N = (t_B.float() * self.T).long().clamp_(0, self.T - 1).repeat_interleave(L)
        cls_N = self._class_slot_B(labels_B, B).repeat_interleave(L)
        frame_N = self._frames_N(B, L) if self.F > 1 else None
        a = self.acc
        a["tokens"].add_(N)
        a["tokens_T"].index_add_(0, tb_N, self._ones_n(N))
        a["tokens_C"].index_add_(0, cls_N, self._ones_n(N))
        if frame_N is not None:
            a["tokens_F"].index_add_(0, frame_N, self._ones_n(N))
        flat = flatten_routings(routings)
        self._add_loads(flat, tb_N, cls_N, N, frame_N)
        if all(r.scores_NE is not None for r in routings):
            self._add_scores(torch.stack([r.scores_NE for r in routings]), tb_N)
        if self.writer is not None and self.cfg.token_samples and self._step % self.cfg.every == 0:
            self._sample_tokens(flat, N, t_B, labels_B, L)

    def _class_slot_B(self, labels_B: torch.Tensor | None, B: int) -> torch.Tensor:
        null = self.C - 1
        if labels_B is None:
            return torch.full((B,), null, dtype=torch.long, device=self.device)
        kept = min(self.num_classes, self.cfg.max_classes)  # the "other" slot's index, when there is one
        labels_B = labels_B.long()
        return torch.where(labels_B >= self.num_classes, null, labels_B.clamp(max=kept))

    def _frames_N(self, B: int, L: int) -> torch.Tensor:
        """Each of the B·L tokens' frame (tokens in (frame, row, column) order, as RoutingContext.frame_L)."""
        if (B, L) not in self._frame_N:
            if L % self.F:
                raise ValueError(f"routing monitor: {L} tokens per sample do not split into frames={self.F} frames")
            frame_L = RoutingContext(batch=B, seq_len=L, frames=self.F).frame_L(self.device)
            self._frame_N[(B, L)] = frame_L.repeat(B)
        return self._frame_N[(B, L)]

    def _add_loads(self, flat, tb_N: torch.Tensor, cls_N: torch.Tensor, N: int,
                   frame_N: torch.Tensor | None = None) -> None:
        a, Y, E, T, C = self.acc, len(self.layers), self.E, self.T, self.C
        layer_A, token_A, expert_A, weight_A = flat
        ones_A = self._ones_n(token_A.shape[0])
        a["load_YE"].view(-1).index_add_(0, layer_A * E + expert_A, ones_A)
        a["load_YTE"].view(-1).index_add_(0, (layer_A * T + tb_N[token_A]) * E + expert_A, ones_A)
        a["load_YCE"].view(-1).index_add_(0, (layer_A * C + cls_N[token_A]) * E + expert_A, ones_A)
        if frame_N is not None:
            a["load_YFE"].view(-1).index_add_(0, (layer_A * self.F + frame_N[token_A]) * E + expert_A, ones_A)
        a["weight_Y"].index_add_(0, layer_A, weight_A)
        per_token_YN = torch.zeros(Y * N, device=self.device).index_add_(0, layer_A * N + token_A, ones_A)
        bin_YN = per_token_YN.view(Y, N).long().clamp_(max=E) + self._layer_Y1 * (E + 1)
        a["fanout_YJ"].view(-1).index_add_(0, bin_YN.view(-1), self._ones_n(Y * N))

    def _add_scores(self, scores_YNE: torch.Tensor, tb_N: torch.Tensor) -> None:
        a, (Y, N, _) = self.acc, scores_YNE.shape
        top_YN = scores_YNE.argmax(-1) + self._layer_Y1 * self.E
        a["top1_YE"].view(-1).index_add_(0, top_YN.view(-1), self._ones_n(Y * N))
        entropy_YN = score_entropy(scores_YNE, self.score_kind)
        a["entropy_Y"].add_(entropy_YN.sum(-1))
        a["entropy_YT"].view(-1).index_add_(0, (self._layer_Y1 * self.T + tb_N).view(-1), entropy_YN.view(-1))

    def _sample_tokens(self, flat, N: int, t_B: torch.Tensor, labels_B: torch.Tensor | None, L: int) -> None:
        Y, S = len(self.layers), min(self.cfg.token_samples, N)
        # one token in each of S equal slices of the batch, at a pseudo-random offset drawn on the host
        # (a device RNG would shift training's random stream; a host list would need a synchronising copy)
        a, b = random.Random(self.seed * 1_000_003 + self._step).choices(range(N), k=2)
        i_S = torch.arange(S, device=self.device)
        token_S = i_S * (N // S) + (a * i_S + b) % (N // S)
        count_YS, expert_YSK, weight_YSK = token_decisions(flat, sample_rows_N(token_S, N), Y, S, self.E, self.K)
        sample_S = token_S // L
        label_S = labels_B[sample_S].long() if labels_B is not None else torch.full_like(sample_S, -1)
        columns = (self._layer_Y1, sample_S, token_S % L, label_S)  # broadcast to (Y, S)
        meta_YS4 = torch.stack([v.expand(Y, S) for v in columns], -1)
        int_columns = [meta_YS4, count_YS[..., None], expert_YSK]
        if self.F > 1:  # video: the token's frame, after the K expert slots
            int_columns.append((token_S % L // (L // self.F)).expand(Y, S)[..., None])
        ints = torch.cat(int_columns, -1).view(Y * S, -1)
        floats = torch.cat([t_B[sample_S].float().expand(Y, S)[..., None], weight_YSK], -1).view(Y * S, -1)
        self._step_tokens = (ints, floats)  # the last micro-batch's tokens win

    @torch.no_grad()
    def end_step(self, step: int) -> None:
        """After the optimizer step `step` (1-based): run a due probe, close the record every `every` steps."""
        if self._probe_x:
            for y, x_PD in self._probe_x.items():
                self.acc["probe_cos_Y"][y : y + 1].add_(expert_cosine(self.layers[y].experts, x_PD))
            self.acc["probes"].add_(1)
            self._probe_x = {}
        self._window_steps += 1
        if step % self.cfg.every == 0:
            self._close_record(step)
        self._step = step + 1

    def _close_record(self, step: int) -> None:
        self._pending.append(self._acc.clone())
        self._pending_steps.append((step, self._window_steps))
        if self._step_tokens is not None:
            self._pending_tokens.append((step, *self._step_tokens))
            self._step_tokens = None
        self._acc.zero_()
        self._window_steps = 0

    # ---- host side, every log_every steps

    def flush(self) -> None:
        """Reduce the pending records across ranks (every rank must call this), append them on rank 0."""
        if not self._pending:
            return
        stacked_RF = torch.stack(self._pending)
        if self.reduce_fn is not None:
            stacked_RF = self.reduce_fn(stacked_RF)
        steps, self._pending, self._pending_steps = self._pending_steps, [], []
        tokens, self._pending_tokens = self._pending_tokens, []
        if self.writer is None:
            return
        records = self._to_records(stacked_RF.cpu().numpy(), steps)
        self.writer.append(records, self._to_token_rows(tokens))
        events = self.detectors.update(records)
        self.writer.append_events(events)
        for event in events:
            self.log(f"routing: {describe(event, self.cfg)}")

    def _to_records(self, values_RF: np.ndarray, steps: list[tuple[int, int]]) -> np.ndarray:
        out = np.zeros(len(steps), rec.to_dtype(self.header["record_fields"]))
        out["step"], out["steps"] = [s for s, _ in steps], [n for _, n in steps]
        offset = 0
        for name, _, shape in self._fields:
            size = int(np.prod(shape))
            out[name] = values_RF[:, offset : offset + size].reshape(len(steps), *shape)
            offset += size
        return out

    def _to_token_rows(self, tokens: list) -> np.ndarray | None:
        if not tokens:
            return None
        ints = torch.cat([i for _, i, _ in tokens]).cpu().numpy()
        floats = torch.cat([f for _, _, f in tokens]).cpu().numpy()
        out = np.zeros(len(ints), rec.to_dtype(self.header["token_fields"]))
        out["step"] = np.concatenate([np.full(len(i), s) for s, i, _ in tokens])
        for j, name in enumerate(("layer", "sample", "position", "label", "count")):
            out[name] = ints[:, j]
        out["expert_K"], out["t"], out["weight_K"] = ints[:, 5 : 5 + self.K], floats[:, 0], floats[:, 1:]
        if self.F > 1:
            out["frame"] = ints[:, 5 + self.K]
        return out

    def close(self) -> dict | None:
        """Write the last partial record and the summary (printed); returns the summary on rank 0."""
        if self._window_steps:
            self._close_record(self._step - 1)
        self.flush()
        for handle in self._hooks:
            handle.remove()
        if self.writer is None:
            return None
        summary = self.detectors.summary()
        self.writer.write_summary(summary)
        for line in summary_lines(summary):
            self.log(f"routing: {line}")
        return summary


class NullMonitor:
    """Dense models, or diagnostics.monitor=false: every call does nothing."""

    def observe_model(self, model) -> None: ...

    def end_step(self, step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None:
        return None


def build_monitor(cfg: Config, model, run_dir: Path, start_step: int, reduce_fn=None, is_main: bool = True,
                  log=print):
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    if not cfg.diagnostics.monitor or not layers:
        return NullMonitor()
    from moedit.models.dit import moe_block_indices

    frames = getattr(model, "time_grid", None) or cfg.model.frames // cfg.model.temporal_patch
    return RoutingMonitor(cfg.diagnostics, layers, moe_block_indices(cfg.model), cfg.model.depth,
                          cfg.model.num_classes, run_dir if is_main else None, start_step, cfg.seed, reduce_fn, log,
                          frames=frames)

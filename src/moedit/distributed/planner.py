"""Parallel-layout planner: memory, traffic and time bounds per rank, by arithmetic alone.

For a `Config` and N GPUs it lists the layouts moedit can train with and, for each, what one rank
holds and moves. Nothing runs: the model is built on the meta device (shapes, no storage), so a
30B-parameter configuration costs nothing, and no process group is created.

Layouts: `ddp`; `fsdp` (ep 1); `fsdp+ep P` for every P > 1 that divides N, is at most the routed
experts E of a MoE layer (model.moe.num_experts + the router's EXTRA_EXPERTS, read from the built
layer) and leaves no ep rank without an expert (distributed/mesh.py's rule). The layout of
`cfg.parallel` is marked "configured".

Notation: N GPUs, W_x the padded per-rank size of parameter x, a the compute bytes (2: bf16 autocast,
4 with train.precision=fp32), f = 4 (float32), B the per-rank micro-batch (train.batch_size),
L = (image_size/patch_size)² tokens per sample, T = B·L tokens per micro-batch, D width, h heads,
k̄ = routed experts per token (models/params.routed_experts_per_token), M = T·k̄ expert rows per
MoE layer, G = train.grad_accum micro-batches per optimizer step, ⌈·⌉ rounding up.

EXACT (what the implementation allocates; tests check it against the meta model):

- parameters per rank, W_x summed, split dense / routed experts (the stacked (E, ...) tensors of
  `layer.experts`; shared experts and routers are dense):
    ddp          W = numel (replicated)
    fsdp         W = ⌈s_d/N⌉·Π other dims: every FSDP2 unit (router, block, root) shards a parameter of
                 shape s along d = shard_dim(s, N) (distributed/parallelize.py, imported, not copied): dim 0,
                 or its largest dimension (ties: the lowest) when s_0 < N, e.g. a shared expert's (1, D, H);
                 torch.chunk's split, every rank padded to the first chunk
    fsdp+ep P    dense: as fsdp. Routed: split along the expert axis over P ranks as torch.chunk does,
                 E_loc = ⌈E/P⌉ on the first ranks (the numbers are those of the fullest rank), then the
                 local (E_loc, ...) tensor sharded over efsdp = N/P ranks by the same rule:
                 d = shard_dim((E_loc, ...), efsdp), W = ⌈s_d/efsdp⌉·Π other dims
- training state per rank = 20 B · ΣW: float32 master weights 4 + gradients 4 + AdamW exp_avg and
  exp_avg_sq 8 + the EMA copy (float32) 4, all sharded like the parameters; ddp adds DDP's gradient
  buckets, 4 B per parameter: 24 B · numel.  (Assumes train.param_dtype=fp32, the only storage FSDP
  takes; buffers and the CUDA context are not counted.)
  W is the fullest rank's shard (rank 0: torch.chunk gives the first ranks the most rows and experts).
  FSDP2 pads every rank's parameter storage up to it, while a rank's gradients and optimizer state
  follow its unpadded shard: the counts are exact for the fullest rank, an upper bound for the others.

ESTIMATES (bounds and approximations, not measurements):

- working set: fsdp: the largest FSDP unit (a DiT block, or the root's own parameters; under ep with
  only the block's local E_loc experts) all-gathered, ΣW·group, in the compute dtype, twice (the next
  unit is prefetched), plus its unsharded float32 gradients before the reduce-scatter:
    U_max·(2a + f).
  ddp: the compute-dtype copies autocast makes of the weights and keeps for backward: a·numel
  (0 with train.precision=fp32).
- activations per rank: bytes autograd keeps for one micro-batch (accumulation frees them each
  micro-batch). The residual stream and the LayerNorm outputs are float32 (LayerNorm runs in float32
  under autocast); matmul inputs are cast to a bytes. Per DiT block:
    attention  = (2f + 9a)·T·D + f·T·h + 2f·T  [+ 2f·T·D with qk_norm]:
                 norm1 input and output (f each; mean/rstd 2f·T), qkv input a, q and k copies 2a,
                 the qkv output that v views 3a, SDPA output a and its logsumexp f·T·h, proj input a,
                 proj output a (kept by the gated residual for the gate's gradient)
    modulation = (f + 9a)·B·D: adaLN's SiLU input, its linear input and 6D output, the two (1 + scale)
    ffn kept   = 2f·T·D + 2f·T + (2f·T·D MoE | a·T·D dense): norm2 input and output (mean/rstd 2f·T);
                 a MoE FFN's float32 input (kept by the float32 gate) and float32 output, a dense FFN's
                 output (both kept by the gated residual)
    dense FFN  = a·T·D + n·a·T·H_d   (fc1 input, n hidden tensors: n = 2 GELU/SiLU MLP, 4 SwiGLU)
    MoE FFN    = 2f·T·E + 32·M + a·M·D + n·a·M·H + f·M·D + f·M + S·(a·T·D + n·a·T·H_s):
                 gate logits and scores (float32), four int64 index vectors over the assignments, the
                 gathered rows, the experts' hidden tensors, the float32 outputs kept for the routing
                 weights' gradient and those weights, S shared experts of hidden H_s
  plus the final layer outside the blocks: (2f + a)·T·D + 2f·T. By checkpointing mode:
    none      Σ_blocks (attention + modulation + ffn kept + FFN) + final
    full      Σ_blocks f·T·D (each block's input) + max_block(all of it, recomputed) + final
    moe_only  as none, but no MoE FFN keeps its internals (its input and output stay, in "ffn kept"),
              plus one MoE FFN's internals while it is recomputed
  Temporaries of a single op, the all-to-all buffers and the allocator's fragmentation are not counted.
- traffic per rank per optimizer step (bytes a rank sends), every micro-batch (FSDP2 and DDP
  synchronise gradients on each backward):
    all-to-all (fsdp+ep)  G · n_moe · X · M·D·a · (P−1)/P, X = 4 exchanges (dispatch and combine in
                          forward, both again in backward), 6 when checkpointing recomputes the forward
    fsdp                  G · Σ_x (g_x − 1)·W_x · (2a + f): all-gather in forward and again in
                          backward (a bytes), reduce-scatter of float32 gradients; g_x = N, or efsdp for
                          routed experts under ep (this equals (g−1)/g of the unit's gathered bytes)
    ddp                   G · 2·(N−1)/N · f · numel (ring all-reduce of the gradients)
- communication lower bound: Σ_kind bytes_kind / bandwidth_kind. It and the compute bound below each
  bound the step time alone: a step takes at least the larger of the two (their sum if nothing overlaps).
  Rule: a collective runs at --inter-node-bandwidth when any of its process groups holds ranks of two
  nodes (rank r on node r // gpus_per_node; mesh.py's layout: dense group = all N ranks, ep groups
  = P consecutive ranks, efsdp groups = ranks r ≡ j mod P), otherwise at --bandwidth (GB/s, 10⁹ B/s).
- compute lower bound: c · A · T · G / peak FLOP/s, A = activated parameters
  (models/params.count_model), c = 6 (forward 2 + backward 4); full checkpointing recomputes the
  forward: c = 8; moe_only recomputes the MoE FFNs: 6·A + 2·A_moe (A_moe = their activated
  parameters). Attention's L² score products, norms and elementwise work are left out.
- fits: state + working set + activations ≤ --gpu-memory.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch

from moedit.config import Config, ConfigError
from moedit.distributed.parallelize import shard_dim
from moedit.models import build_model
from moedit.models.params import count_model, routed_experts_per_token

FP32 = 4
MASTER_BYTES, GRAD_BYTES, ADAM_BYTES, EMA_BYTES = 4, 4, 8, 4
STATE_BYTES_PER_PARAM = MASTER_BYTES + GRAD_BYTES + ADAM_BYTES + EMA_BYTES  # 20
DDP_BUCKET_BYTES = 4
CHECKPOINTING = ("none", "full", "moe_only")
HIDDEN_TENSORS = {"mlp": 2, "mlp_silu": 2, "swiglu": 4}  # n: hidden-width tensors autograd keeps per FFN
INDEX_BYTES_PER_ASSIGNMENT = 4 * 8  # token, expert, order and slot indices, int64
GiB = 2 ** 30
GB = 1e9

_MEMORY_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
                 "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_memory(text: str) -> int:
    """'80GiB', '141GB', '24 GiB', '1.5TiB' -> bytes (GB = 10⁹, GiB = 2³⁰)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]+)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if unit not in _MEMORY_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory {text!r} is not a memory size; write a positive number and a unit, "
                          "e.g. 80GiB, 141GB or 24GiB (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(match.group(1)) * _MEMORY_UNITS[unit])


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu_memory: int  # bytes
    bandwidth_gbs: float = 400.0  # per GPU, inside a node (NVLink class)
    inter_node_bandwidth_gbs: float = 50.0  # per GPU, between nodes
    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # dense bf16 (H100/H200)

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ConfigError(f"--gpus {self.gpus}: need at least 1 GPU")
        if self.gpus_per_node < 1:
            raise ConfigError(f"--gpus-per-node {self.gpus_per_node}: need at least 1")
        for flag, value in (("--gpu-memory", self.gpu_memory), ("--bandwidth", self.bandwidth_gbs),
                            ("--inter-node-bandwidth", self.inter_node_bandwidth_gbs),
                            ("--peak-tflops", self.peak_tflops)):
            if not value > 0 or not math.isfinite(value):
                raise ConfigError(f"{flag} {value}: must be a positive number")

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)


@dataclass(frozen=True)
class Layout:
    data: str  # ddp | fsdp
    ep: int = 1

    @property
    def name(self) -> str:
        return self.data if self.ep == 1 else f"{self.data}+ep {self.ep}"


@dataclass(frozen=True)
class ParamTensor:
    name: str
    shape: tuple[int, ...]
    unit: str  # the FSDP unit that all-gathers it: "root" or "blocks.<i>"
    routed: bool  # a stacked (E, ...) routed-expert tensor of a MoE layer

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class BlockShape:
    """What the activation estimate reads from one DiT block."""

    moe: bool
    ffn_kind: str  # the dense FFN's kind, or the routed experts'
    ffn_hidden: int  # H_d, or the routed experts' H
    num_experts: int = 0  # routed E
    num_shared: int = 0
    shared_kind: str = "mlp"
    shared_hidden: int = 0


@dataclass(frozen=True)
class ModelFacts:
    params: tuple[ParamTensor, ...]
    blocks: tuple[BlockShape, ...]
    width: int
    heads: int
    qk_norm: bool
    tokens_per_sample: int  # L
    experts_per_token: float  # k̄ (0 for a dense model)
    total: int
    activated: int  # A
    moe_activated: int  # A_moe: activated parameters inside the MoE feed-forwards

    @property
    def moe_layers(self) -> int:
        return sum(b.moe for b in self.blocks)

    @property
    def routed_experts(self) -> int:
        """E of the MoE layers (the smallest, should they differ); 0 for a dense model."""
        return min((b.num_experts for b in self.blocks if b.moe), default=0)


# ----------------------------------------------------------------------------- the model on the meta device


def model_facts(cfg: Config) -> ModelFacts:
    with torch.device("meta"):
        model = build_model(cfg.model)
    counts = count_model(model)
    mc = cfg.model
    k = routed_experts_per_token(mc.moe.router) if mc.moe is not None else 0.0
    return ModelFacts(params=tuple(_param_tensors(model)), blocks=tuple(_block_shape(b, mc) for b in model.blocks),
                      width=mc.width, heads=mc.heads, qk_norm=mc.qk_norm, tokens_per_sample=model.time_grid * model.grid ** 2,
                      experts_per_token=float(k), total=counts.total, activated=counts.activated,
                      moe_activated=sum(_moe_activated(layer) for layer in model.moe_layers()))


def _param_tensors(model) -> list[ParamTensor]:
    tensors = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        unit = f"blocks.{parts[1]}" if parts[0] == "blocks" else "root"
        routed = False
        if unit != "root" and parts[2:4] == ["moe", "experts"]:
            experts = model.blocks[int(parts[1])].moe.experts
            routed = p.dim() >= 1 and p.shape[0] == experts.num_experts  # as expert_parallel.shard_experts
        tensors.append(ParamTensor(name, tuple(p.shape), unit, routed))
    return tensors


def _block_shape(block, mc) -> BlockShape:
    if block.moe is None:
        return BlockShape(moe=False, ffn_kind=mc.dense_ffn or mc.ffn, ffn_hidden=int(round(mc.mlp_ratio * mc.width)))
    experts, shared = block.moe.experts, block.moe.shared
    return BlockShape(moe=True, ffn_kind=experts.kind, ffn_hidden=experts.hidden, num_experts=experts.num_experts,
                      num_shared=shared.num_experts if shared is not None else 0,
                      shared_kind=shared.kind if shared is not None else experts.kind,
                      shared_hidden=shared.hidden if shared is not None else 0)


def _moe_activated(layer) -> int:
    """A MoE feed-forward's parameters less its idle routed experts ((E − k̄)·P_expert), as count_model."""
    total = sum(p.numel() for p in layer.parameters())
    experts = layer.experts
    per_expert = sum(p.numel() for p in experts.parameters()) // experts.num_experts
    return total - round((experts.num_experts - routed_experts_per_token(layer.cfg.router)) * per_expert)


# ----------------------------------------------------------------------------- sharding (exact)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def expert_split(num_experts: int, ep: int) -> list[int]:
    """Experts per ep rank as torch.chunk gives them: ⌈E/P⌉ on the first ranks, the rest (maybe 0) after."""
    size = ceil_div(num_experts, ep)
    return [max(0, min(size, num_experts - r * size)) for r in range(ep)]


def local_shape(p: ParamTensor, layout: Layout) -> tuple[int, ...]:
    """The shape FSDP2 shards on rank 0: the whole parameter, or under ep > 1 a routed tensor's
    (⌈E/P⌉, ...) expert slice (torch.chunk: the first ep ranks, rank 0 among them, take the most)."""
    if p.routed and layout.ep > 1 and p.shape:
        return (ceil_div(p.shape[0], layout.ep), *p.shape[1:])
    return p.shape


def _other_dims(shape: tuple[int, ...], d: int) -> int:
    return math.prod(n for i, n in enumerate(shape) if i != d)


def fsdp_shard_numel(shape: tuple[int, ...], group: int) -> int:
    """FSDP2's shard on the fullest rank of a (local) parameter over `group` ranks, split along
    d = parallelize.shard_dim(shape, group) as torch.chunk does and padded: ⌈shape[d]/g⌉·Π other dims."""
    if not shape:
        return 1
    d = shard_dim(shape, group)
    return ceil_div(shape[d], group) * _other_dims(shape, d)


def shard_row(shape: tuple[int, ...], group: int) -> int:
    """Elements of one row along the dimension shard_dim picks: the step FSDP2 splits and pads by."""
    return _other_dims(shape, shard_dim(shape, group)) if shape else 1


def shard_group(p: ParamTensor, layout: Layout, gpus: int) -> int:
    """The ranks a parameter is sharded over (1: replicated)."""
    if layout.data == "ddp":
        return 1
    return gpus // layout.ep if (p.routed and layout.ep > 1) else gpus


def numel_per_rank(p: ParamTensor, layout: Layout, gpus: int) -> int:
    if layout.data == "ddp":
        return p.numel
    return fsdp_shard_numel(local_shape(p, layout), shard_group(p, layout, gpus))


@dataclass(frozen=True)
class ParamsPerRank:
    dense: int
    routed: int

    @property
    def total(self) -> int:
        return self.dense + self.routed


def params_per_rank(facts: ModelFacts, layout: Layout, gpus: int) -> ParamsPerRank:
    dense = sum(numel_per_rank(p, layout, gpus) for p in facts.params if not p.routed)
    routed = sum(numel_per_rank(p, layout, gpus) for p in facts.params if p.routed)
    return ParamsPerRank(dense=dense, routed=routed)


def state_bytes(params: ParamsPerRank, layout: Layout) -> int:
    per_param = STATE_BYTES_PER_PARAM + (DDP_BUCKET_BYTES if layout.data == "ddp" else 0)
    return per_param * params.total


def unit_gathered_numel(facts: ModelFacts, layout: Layout, gpus: int) -> dict[str, int]:
    """Each FSDP unit's all-gathered size per rank: Σ W·group (padding included)."""
    units: dict[str, int] = {}
    for p in facts.params:
        units[p.unit] = units.get(p.unit, 0) + numel_per_rank(p, layout, gpus) * shard_group(p, layout, gpus)
    return units


def working_set_bytes(facts: ModelFacts, layout: Layout, gpus: int, compute_bytes: int) -> int:
    if layout.data == "ddp":
        return compute_bytes * facts.total if compute_bytes < FP32 else 0
    largest = max(unit_gathered_numel(facts, layout, gpus).values())
    return largest * (2 * compute_bytes + FP32)


# ----------------------------------------------------------------------------- activations (estimate)


@dataclass(frozen=True)
class BlockActivations:
    """Bytes one block keeps for backward (module docstring), in the parts checkpointing treats apart."""

    attention: int  # attention + modulation
    ffn_kept: int  # norm2 input/output, FFN input and output: what moe_only keeps of a MoE FFN
    ffn_inner: int  # inside the FFN: what moe_only recomputes
    block_input: int  # what full checkpointing keeps
    moe: bool

    @property
    def total(self) -> int:
        return self.attention + self.ffn_kept + self.ffn_inner


def attention_bytes(T: int, B: int, D: int, heads: int, qk_norm: bool, a: int) -> int:
    f = FP32
    tokens = (2 * f + 9 * a) * T * D + f * T * heads + 2 * f * T + (2 * f * T * D if qk_norm else 0)
    modulation = (f + 9 * a) * B * D
    return tokens + modulation


def ffn_kept_bytes(T: int, D: int, moe: bool, a: int) -> int:
    ends = 2 * FP32 * T * D if moe else a * T * D  # MoE: float32 input and output; dense: the output
    return 2 * FP32 * T * D + 2 * FP32 * T + ends


def dense_ffn_bytes(T: int, D: int, kind: str, hidden: int, a: int) -> int:
    return a * T * D + HIDDEN_TENSORS[kind] * a * T * hidden


def moe_ffn_bytes(T: int, D: int, block: BlockShape, k: float, a: int) -> int:
    f, M = FP32, round(T * k)
    routing = 2 * f * T * block.num_experts + INDEX_BYTES_PER_ASSIGNMENT * M
    routed = a * M * D + HIDDEN_TENSORS[block.ffn_kind] * a * M * block.ffn_hidden + f * M * D + f * M
    shared = block.num_shared * (a * T * D + HIDDEN_TENSORS[block.shared_kind] * a * T * block.shared_hidden)
    return routing + routed + shared


def block_activations(facts: ModelFacts, block: BlockShape, B: int, a: int) -> BlockActivations:
    D, T = facts.width, B * facts.tokens_per_sample
    inner = (moe_ffn_bytes(T, D, block, facts.experts_per_token, a) if block.moe
             else dense_ffn_bytes(T, D, block.ffn_kind, block.ffn_hidden, a))
    return BlockActivations(attention=attention_bytes(T, B, D, facts.heads, facts.qk_norm, a),
                            ffn_kept=ffn_kept_bytes(T, D, block.moe, a), ffn_inner=inner,
                            block_input=FP32 * T * D, moe=block.moe)


def final_layer_bytes(facts: ModelFacts, B: int, a: int) -> int:
    T = B * facts.tokens_per_sample
    return (2 * FP32 + a) * T * facts.width + 2 * FP32 * T


def activation_bytes(facts: ModelFacts, B: int, mode: str, a: int) -> int:
    blocks = [block_activations(facts, b, B, a) for b in facts.blocks]
    head = final_layer_bytes(facts, B, a)
    if mode == "none":
        return sum(b.total for b in blocks) + head
    if mode == "full":
        return sum(b.block_input for b in blocks) + max(b.total for b in blocks) + head
    if mode == "moe_only":
        kept = sum(b.total - (b.ffn_inner if b.moe else 0) for b in blocks)
        return kept + max((b.ffn_inner for b in blocks if b.moe), default=0) + head
    raise ConfigError(f"activation checkpointing {mode!r} is unknown; choose one of: {', '.join(CHECKPOINTING)}")


# ----------------------------------------------------------------------------- traffic (estimate)


@dataclass(frozen=True)
class Traffic:
    """Bytes one rank sends per optimizer step, by the process group that carries them."""

    all_to_all: int = 0  # ep groups
    dense: int = 0  # FSDP or DDP collectives over all N ranks
    experts: int = 0  # FSDP collectives of the routed experts over efsdp groups

    @property
    def collectives(self) -> int:
        return self.dense + self.experts


def all_to_all_bytes(facts: ModelFacts, layout: Layout, B: int, mode: str, micro_batches: int, a: int) -> int:
    if layout.ep == 1:
        return 0
    exchanges = 4 if mode == "none" else 6  # checkpointing reruns the forward's dispatch and combine
    rows = B * facts.tokens_per_sample * facts.experts_per_token  # M
    per_layer = exchanges * rows * facts.width * a * (layout.ep - 1) / layout.ep
    return round(micro_batches * facts.moe_layers * per_layer)


def collective_bytes(facts: ModelFacts, layout: Layout, gpus: int, micro_batches: int,
                     compute_bytes: int) -> tuple[int, int]:
    """(dense, experts) bytes of FSDP's all-gathers and reduce-scatters, or DDP's all-reduce (dense)."""
    if layout.data == "ddp":
        return round(micro_batches * 2 * (gpus - 1) / gpus * FP32 * facts.total), 0
    per_byte = 2 * compute_bytes + FP32  # all-gather forward + backward, reduce-scatter float32
    dense = experts = 0
    for p in facts.params:
        moved = (shard_group(p, layout, gpus) - 1) * numel_per_rank(p, layout, gpus) * per_byte
        if p.routed and layout.ep > 1:
            experts += moved
        else:
            dense += moved
    return micro_batches * dense, micro_batches * experts


def _crosses_nodes(groups: list[list[int]], gpus_per_node: int) -> bool:
    return any(len({r // gpus_per_node for r in g}) > 1 for g in groups)


def group_bandwidths(layout: Layout, hw: Hardware) -> dict[str, float]:
    """GB/s of each kind of group, by the rule of the module docstring (mesh.py's rank layout)."""
    N, P = hw.gpus, layout.ep
    groups = {"dense": [list(range(N))],
              "all_to_all": [[e * P + j for j in range(P)] for e in range(N // P)],
              "experts": [[i * P + j for i in range(N // P)] for j in range(P)]}
    return {kind: hw.inter_node_bandwidth_gbs if _crosses_nodes(g, hw.gpus_per_node) else hw.bandwidth_gbs
            for kind, g in groups.items()}


def comm_seconds(traffic: Traffic, layout: Layout, hw: Hardware) -> float:
    bw = group_bandwidths(layout, hw)
    return sum(getattr(traffic, kind) / (bw[kind] * GB) for kind in ("all_to_all", "dense", "experts"))


def compute_seconds(facts: ModelFacts, B: int, mode: str, micro_batches: int, hw: Hardware) -> float:
    A = facts.activated
    per_token = {"none": 6 * A, "full": 8 * A, "moe_only": 6 * A + 2 * facts.moe_activated}[mode]
    return per_token * B * facts.tokens_per_sample * micro_batches / (hw.peak_tflops * 1e12)


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlanRow:
    layout: str
    data: str
    ep: int
    checkpointing: str
    configured: bool
    params_dense: int  # per rank (padded shards)
    params_routed: int
    params_bytes: int  # float32 master weights
    state_bytes: int
    working_set_bytes: int
    activation_bytes: int
    total_bytes: int
    fits: bool
    all_to_all_bytes: int
    collective_bytes: int  # FSDP all-gather + reduce-scatter, or DDP all-reduce
    comm_ms: float
    compute_ms: float

    @property
    def params_per_rank(self) -> int:
        return self.params_dense + self.params_routed


@dataclass(frozen=True)
class Plan:
    hardware: Hardware
    model: dict  # summary: total, activated, blocks, MoE layers, routed experts, k̄
    batch_size: int
    tokens_per_micro_batch: int
    grad_accum: int
    compute_bytes: int
    rows: list[PlanRow]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"hardware": asdict(self.hardware), "model": self.model, "batch_size": self.batch_size,
                "tokens_per_micro_batch": self.tokens_per_micro_batch, "grad_accum": self.grad_accum,
                "compute_bytes": self.compute_bytes, "notes": self.notes,
                "rows": [{**asdict(r), "params_per_rank": r.params_per_rank} for r in self.rows]}


def compute_bytes_of(cfg: Config) -> int:
    """a: bf16 autocast (train.precision auto or bf16 on a GPU), float32 with train.precision=fp32."""
    return FP32 if cfg.train.precision == "fp32" else 2


def ep_refusal(num_experts: int, ep: int, gpus: int) -> str | None:
    """Why `fsdp+ep ep` cannot run on `gpus` ranks, or None."""
    if gpus % ep != 0:
        return f"{ep} does not divide --gpus {gpus}"
    if ep > num_experts:
        return f"{ep} exceeds the {num_experts} routed experts of a MoE layer"
    split = expert_split(num_experts, ep)
    if min(split) == 0:
        return f"{num_experts} experts split {'/'.join(map(str, split))} over {ep} ranks leave a rank without one"
    return None


def candidate_layouts(facts: ModelFacts, gpus: int) -> tuple[list[Layout], list[str]]:
    """ddp, fsdp and every runnable fsdp+ep P; and a note for each divisor P refused."""
    layouts, skipped = [Layout("ddp"), Layout("fsdp")], []
    E = facts.routed_experts
    for P in range(2, min(gpus, E) + 1 if E else 1):
        if gpus % P:
            continue
        reason = ep_refusal(E, P, gpus)
        if reason is None:
            layouts.append(Layout("fsdp", P))
        else:
            skipped.append(f"fsdp+ep {P} left out: {reason}")
    return layouts, skipped


def check_configured(cfg: Config, facts: ModelFacts, gpus: int) -> Layout:
    layout = Layout(cfg.parallel.data, cfg.parallel.ep)
    if layout.ep > 1:
        reason = ep_refusal(facts.routed_experts, layout.ep, gpus)
        if reason is not None:
            divisors = [d for d in range(1, gpus + 1) if gpus % d == 0 and ep_refusal(facts.routed_experts, d, gpus)
                        is None]
            raise ConfigError(f"parallel.ep={layout.ep}: {reason}; choose parallel.ep from "
                              f"{', '.join(map(str, divisors))} (or another --gpus)")
    return layout


def uneven_excess(facts: ModelFacts, layout: Layout, gpus: int) -> tuple[float, list[str]]:
    """The parameters the fullest rank holds more than one row (of the dimension shard_dim picks) of above
    an even split (numel / ranks holding it): their excess as a fraction of the rank's parameters, and the
    tensor families (block index as *) that add the most; (0, []) when none does. FSDP2's padding alone
    stays under one row (⌈d/g⌉ − d/g < 1); an expert split torch.chunk leaves uneven over ep can exceed it."""
    excess: dict[str, float] = {}
    for p in facts.params:
        group = shard_group(p, layout, gpus)
        holders = group * (layout.ep if p.routed and layout.ep > 1 else 1)
        over = numel_per_rank(p, layout, gpus) - p.numel / holders
        if over > shard_row(local_shape(p, layout), group):
            family = re.sub(r"^blocks\.[0-9]+\.", "blocks.*.", p.name)
            excess[family] = excess.get(family, 0.0) + over
    if not excess:
        return 0.0, []
    share = sum(excess.values()) / params_per_rank(facts, layout, gpus).total
    return share, sorted(excess, key=excess.get, reverse=True)[:3]


def uneven_notes(facts: ModelFacts, layouts: list[Layout], gpus: int) -> list[str]:
    """One note per distinct uneven split beyond one row, naming the layouts it applies to."""
    found: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for layout in layouts:
        if layout.data == "ddp":
            continue
        share, worst = uneven_excess(facts, layout, gpus)
        if worst:
            found.setdefault((f"{share:.1%}", tuple(worst)), []).append(layout.name)
    return [f"{', '.join(names)}: {share} of the fullest rank's parameters are above an even split by more than "
            f"one row of their shard dimension, mostly {', '.join(worst)}" for (share, worst), names in found.items()]


def plan_row(facts: ModelFacts, layout: Layout, mode: str, cfg: Config, hw: Hardware, configured: bool) -> PlanRow:
    a, B, G, N = compute_bytes_of(cfg), cfg.train.batch_size, cfg.train.grad_accum, hw.gpus
    params = params_per_rank(facts, layout, N)
    state, work = state_bytes(params, layout), working_set_bytes(facts, layout, N, a)
    acts = activation_bytes(facts, B, mode, a)
    dense, experts = collective_bytes(facts, layout, N, G, a)
    traffic = Traffic(all_to_all=all_to_all_bytes(facts, layout, B, mode, G, a), dense=dense, experts=experts)
    total = state + work + acts
    return PlanRow(layout=layout.name, data=layout.data, ep=layout.ep, checkpointing=mode, configured=configured,
                   params_dense=params.dense, params_routed=params.routed, params_bytes=MASTER_BYTES * params.total,
                   state_bytes=state, working_set_bytes=work, activation_bytes=acts, total_bytes=total,
                   fits=total <= hw.gpu_memory, all_to_all_bytes=traffic.all_to_all,
                   collective_bytes=traffic.collectives, comm_ms=1e3 * comm_seconds(traffic, layout, hw),
                   compute_ms=1e3 * compute_seconds(facts, B, mode, G, hw))


def plan(cfg: Config, hw: Hardware) -> Plan:
    facts = model_facts(cfg)
    configured = check_configured(cfg, facts, hw.gpus)
    layouts, notes = candidate_layouts(facts, hw.gpus)
    modes = CHECKPOINTING if facts.moe_layers else ("none", "full")
    rows = [plan_row(facts, layout, mode, cfg, hw,
                     configured=layout == configured and mode == cfg.parallel.activation_checkpointing)
            for layout in layouts for mode in modes]
    notes += uneven_notes(facts, layouts, hw.gpus)
    if cfg.train.param_dtype != "fp32":
        notes.append("state assumes float32 master weights; train.param_dtype=bf16 (ddp only) stores less")
    model = {"total_params": facts.total, "activated_params": facts.activated, "blocks": len(facts.blocks),
             "moe_layers": facts.moe_layers, "routed_experts": facts.routed_experts,
             "experts_per_token": facts.experts_per_token, "width": facts.width,
             "tokens_per_sample": facts.tokens_per_sample}
    return Plan(hardware=hw, model=model, batch_size=cfg.train.batch_size,
                tokens_per_micro_batch=cfg.train.batch_size * facts.tokens_per_sample, grad_accum=cfg.train.grad_accum,
                compute_bytes=compute_bytes_of(cfg), rows=rows, notes=notes)

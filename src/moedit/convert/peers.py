"""Importing a peer's released MoE-DiT checkpoint into a moedit run, weight for weight.

Five layouts: DiT-MoE (`dit_moe`), ProMoE's token-choice and expert-choice models (`promoe_tc`, `promoe_ec`),
DiffMoE (`diffmoe`) and DSMoE (`dsmoe`, its config function's docstring and docs/CONVERT.md say how it maps); docs/CONVERT.md lists
what each layout holds and how it maps. A layout is recognised by its key names, its configuration read
off the shapes, and every key goes through an explicit table that refuses unmapped, missing or
misshapen keys. The imported model computes the peer model's output: same (x_t, t, y) → same
prediction within float32 rounding, with the time convention stated per objective.

DiT-MoE (Fei et al., arXiv 2407.11633; feizc/DiT-MoE `models.py`) = facebookresearch/DiT with every
block's MLP replaced by `moe` (names as in its code):

    blocks.{i}.moe.gate.weight                         (E, D)   softmax gate, no bias
    blocks.{i}.moe.experts.{e}.{gate,up,down}_proj.weight       SwiGLU expert e, width H, no biases
    blocks.{i}.moe.shared_experts.{gate,up,down}_proj.weight    one always-on SwiGLU expert, width H_s

routed by softmax top-k without renormalisation (its `norm_topk_prob = False`), every block MoE, DiT's
columns-first sin-cos positions. top_k is not in the weights (DiT-MoE's default: 2, `--top-k`).
Time: trained with DiT's DDPM (`--objective ddpm`, integer step n fed to the embedder: moedit's
t = n/1000, t_scale 1000, the one-step DDPM offset of docs/CONVERT.md applies) or with its rectified flow
(`--objective rectified_flow`: x_t = (1 − t)·x + t·ε, v = ε − x, t ∈ [0, 1] fed as is: t_scale 1).

ProMoE-TC (Wei et al., arXiv 2510.24711; ali-vilab/ProMoE `models/models_ProMoE_TC.py`, `modules.py`) =
the same DiT backbone (qkv with bias, head_dim = D/heads) whose MoE blocks (the odd ones when their
`interleave` is set, else all) hold `mlp` = their SparseMoeBlock:

    blocks.{i}.mlp.cluster_centers                     (E, D)   prototypes      -> moe.router.prototypes_ED
    blocks.{i}.mlp.experts.{e}.up_proj.{weight,bias}   (H, D), (H)   e < E: routed; e = E: unconditional
    blocks.{i}.mlp.experts.{e}.down_proj.{weight,bias} (D, H), (D)   -> moe.experts.{w1_EDH, b1_EH, w2_EHD, b2_ED}[e]
    blocks.{i}.mlp.shared_expert.{up,down}_proj.*      one always-on expert, width H_s -> moe.shared.*
    blocks.{j}.mlp.fc{1,2}.{weight,bias}               dense blocks: timm Mlp, GELU(tanh) -> the same names
    blocks.{j}.mlp.{up,down}_proj.{weight,bias}        dense blocks with their use_swiglu (still a GELU MoeMLP) -> mlp.fc{1,2}

Every expert is their MoeMLP, y = down(GELU_tanh(up(x))) with biases: moedit's `ffn: mlp` experts
(w1 = up_projᵀ, b1 = up bias, w2 = down_projᵀ, b2 = down bias). Routing = moedit's `promoe` router: tokens
of label-1000 samples (their hard-coded null label; moedit's null label is num_classes, so only
1000-class checkpoints import) go to expert E with weight 1; the others get s = G(cos(x, C_e)) over the
E prototypes, G = `--score` (their router_weight_mode: identity in their configs, softmax, sigmoid), top-k
(`--top-k`, their configs: 1) of s, not renormalised. Their q/k LayerNorm (`qk_norm`, affine) has no
moedit equivalent (moedit's is an RMSNorm) and is refused, as are a head_dim ≠ D/heads, no unconditional
expert, or MoE blocks neither all nor the odd ones.
Time: rectified flow only (their train.py): x_t = (1 − σ)·x + σ·ε, v = ε − x, the embedder fed 1000·σ:
moedit's t = σ with t_scale 1000. Their loss never reads the learned-sigma channels (they are kept by
default for exactness, `--learn-sigma drop` removes them).

ProMoE-EC (`models/models_ProMoE_EC.py`) has exactly these keys and shapes; only its routing differs:
in each conditional sample every prototype's expert takes its ⌊top_k·L/E⌋ best tokens by G(cos), G along
the sequence (moedit's `promoe_ec` router). The key names cannot tell the two apart, so `auto` imports
a ProMoE checkpoint as token choice and says so; an expert-choice one needs `--layout promoe_ec`.

DiffMoE (Shi et al., arXiv 2503.14487; its model as shipped in ali-vilab/ProMoE and yhlleo/EfficientMoE
`models/models_DiffMoE.py`, trained and sampled by the same scripts as ProMoE: the same time convention):

    blocks.{i}.mlp.gate_weight                           (E, D)  softmax gate, no bias -> moe.router.gate
    blocks.{i}.mlp.capacity_predictor.{0,2}.*            D→D, SiLU, D→E                -> moe.router.predictor.fc1/fc2
    blocks.{i}.mlp.expert_threshold, .ema_decay          θ (E,), its EMA decay         -> moe.router.threshold
    blocks.{i}.mlp.experts.{e}.fc{1,2}.*                 timm Mlp, GELU(tanh), biases  -> moe.experts (stacked)
    blocks.{i}.mlp.shared_experts.fc{1,2}.*              optional always-on Mlp        -> moe.shared
    blocks.{j}.mlp.fc{1,2}.*                             dense blocks                  -> mlp.fc{1,2}

Inference is DiffMoE's own (router `capacity_inference: topk`): expert e takes the k_e best-scored tokens
of a call, k_e = the tokens with σ(P(x))_e > θ_e; their sampler calls the conditional and unconditional
halves apart, which the router reproduces by pooling them apart. The capacity (training only) is not in
the weights: `--top-k` (their configs: 1).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Callable

import torch

from moedit.config import Config, ConfigError, from_dict
from moedit.convert.keys import ConversionError
from moedit.convert.sources import TORCH_SUFFIXES, LEARN_SIGMA, dit_backbone_config, read_state_file
from moedit.convert.workflow import check_out, write_run
from moedit.models import build_model

LAYOUTS = ("dit_moe", "promoe_tc", "promoe_ec", "diffmoe", "dsmoe")
OBJECTIVES = {  # the peer's training objective -> moedit's run settings for it (DiT-MoE's time conventions)
    "ddpm": {"model": {"t_scale": 1000.0},
             "objective": {"name": "ddpm", "beta_schedule": "linear", "ddpm_steps": 1000},
             "sample": {"sampler": "ddpm", "steps": 250}},
    "rectified_flow": {"model": {"t_scale": 1.0},
                       "objective": {"name": "rectified_flow", "t_sampling": "logit_normal"},
                       "sample": {"sampler": "euler", "steps": 50}},
}
# ProMoE trains rectified flow only, feeding 1000·σ to the embedder, and samples Euler in 250 steps
PROMOE_OBJECTIVES = {"rectified_flow": {"model": {"t_scale": 1000.0},
                                        "objective": {"name": "rectified_flow", "t_sampling": "logit_normal"},
                                        "sample": {"sampler": "euler", "steps": 250}}}
PROMOE_NULL_LABEL = 1000  # hard-coded in their SparseMoeBlock.compute_router
DEFAULTS = {"dit_moe": {"objective": "ddpm", "top_k": 2, "score": "softmax"},  # what the weights do not say
            "promoe_tc": {"objective": "rectified_flow", "top_k": 1, "score": "identity"},
            "promoe_ec": {"objective": "rectified_flow", "top_k": 1, "score": "identity"},  # their 004_ProMoE_L_EC
            "diffmoe": {"objective": "rectified_flow", "top_k": 1, "score": "softmax"},  # top_k: the capacity
            "dsmoe": {"objective": "rectified_flow", "top_k": None, "score": "sigmoid"}}  # top_k: its released config
NAMES = {"dit_moe": "DiT-MoE", "promoe_tc": "ProMoE-TC", "promoe_ec": "ProMoE-EC", "diffmoe": "DiffMoE", "dsmoe": "DSMoE"}
SOURCES = {"dit_moe": "a feizc/DiT-MoE checkpoint", "promoe_tc": "an ali-vilab/ProMoE token-choice checkpoint",
           "promoe_ec": "an ali-vilab/ProMoE expert-choice checkpoint (same keys as token choice: --layout promoe_ec)",
           "diffmoe": "a DiffMoE checkpoint (models_DiffMoE.py of ali-vilab/ProMoE or yhlleo/EfficientMoE)",
           "dsmoe": "a yhlleo/EfficientMoE DSMoE checkpoint"}

_EXPERT = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_SHARED = re.compile(r"^blocks\.(\d+)\.moe\.shared_experts\.(gate|up|down)_proj\.weight$")
_GATE = re.compile(r"^blocks\.(\d+)\.moe\.gate\.weight$")
_STACKED = {"gate": "w1_EDH", "up": "wu_EDH", "down": "w2_EHD"}  # moedit's SwiGLU expert matrices (moe/experts.py)
# DiT's own keys, the same in both models (pos_embed is checked, final_layer.linear may drop σ channels)
_BACKBONE = re.compile(r"^(x_embedder\.proj|t_embedder\.mlp\.[02]|y_embedder\.embedding_table|final_layer\."
                       r"adaLN_modulation\.1|blocks\.\d+\.(attn\.(qkv|proj)|adaLN_modulation\.1))\.(weight|bias)$")
# ProMoE-TC's MoE and dense FFN keys
_PRO_CENTERS = re.compile(r"^blocks\.(\d+)\.mlp\.cluster_centers$")
_PRO_EXPERT = re.compile(r"^blocks\.(\d+)\.mlp\.experts\.(\d+)\.(up|down)_proj\.(weight|bias)$")
_PRO_SHARED = re.compile(r"^blocks\.(\d+)\.mlp\.shared_expert\.(up|down)_proj\.(weight|bias)$")
_PRO_DENSE = re.compile(r"^blocks\.(\d+)\.mlp\.(fc1|fc2|up_proj|down_proj)\.(weight|bias)$")
_PRO_STACKED = {("up", "weight"): "w1_EDH", ("up", "bias"): "b1_EH",  # moedit's GELU expert tensors
                ("down", "weight"): "w2_EHD", ("down", "bias"): "b2_ED"}
_PRO_DENSE_NAME = {"fc1": "fc1", "fc2": "fc2", "up_proj": "fc1", "down_proj": "fc2"}
_QK_NORM = re.compile(r"^blocks\.\d+\.attn\.[qk]_norm\.")
# DiffMoE (its model as shipped with ali-vilab/ProMoE and yhlleo/EfficientMoE, models_DiffMoE.py)
_DIFF_GATE = re.compile(r"^blocks\.(\d+)\.mlp\.gate_weight$")
_DIFF_EXPERT = re.compile(r"^blocks\.(\d+)\.mlp\.experts\.(\d+)\.(fc1|fc2)\.(weight|bias)$")
_DIFF_SHARED = re.compile(r"^blocks\.(\d+)\.mlp\.shared_experts\.(fc1|fc2)\.(weight|bias)$")
_DIFF_PREDICTOR = re.compile(r"^blocks\.(\d+)\.mlp\.capacity_predictor\.([02])\.(weight|bias)$")
_DIFF_BUFFER = re.compile(r"^blocks\.(\d+)\.mlp\.(expert_threshold|ema_decay)$")
# DSMoE (yhlleo/EfficientMoE DSMoE/models/models_DSMoE.py)
_DS_GATE = re.compile(r"^blocks\.(\d+)\.mlp\.gate\.(weight|e_score_correction_bias)$")
_DS_EXPERT = re.compile(r"^blocks\.(\d+)\.mlp\.experts\.blocks\.(\d+)\.(gate|up|down)_proj\.weight$")
_DS_SHARED = re.compile(r"^blocks\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight$")
_DS_UNSUPPORTED = re.compile(r"^blocks\.\d+\.(norm[12]\.weight|attn\.(sinks|[qkv]_proj\.|[qk]_norm\.))")
_DIFF_STACKED = {("fc1", "weight"): "w1_EDH", ("fc1", "bias"): "b1_EH", ("fc2", "weight"): "w2_EHD", ("fc2", "bias"): "b2_ED"}


def detect_layout(state: dict[str, torch.Tensor]) -> str | None:
    if "blocks.0.moe.gate.weight" in state and "blocks.0.moe.experts.0.gate_proj.weight" in state:
        return "dit_moe"
    centers = [m.group(1) for k in state if (m := _PRO_CENTERS.match(k))]
    if centers and f"blocks.{centers[0]}.mlp.experts.0.up_proj.weight" in state:
        return "promoe_tc"
    if any(_DS_EXPERT.match(k) for k in state):
        return "dsmoe"
    gates = [m.group(1) for k in state if (m := _DIFF_GATE.match(k))]
    if gates and f"blocks.{gates[0]}.mlp.capacity_predictor.0.weight" in state:
        return "diffmoe"
    return None


def dit_moe_config(state: dict[str, torch.Tensor], heads: int | None, top_k: int, learn_sigma: str,
                   score: str = "softmax") -> dict:
    """The moedit `model` section of a DiT-MoE state dict (module docstring)."""
    if score != "softmax":
        raise ConfigError(f"--score {score}: DiT-MoE's gate is a softmax (its code has no other)")
    model = dit_backbone_config(state, heads)
    E, D = state["blocks.0.moe.gate.weight"].shape
    hidden = state["blocks.0.moe.experts.0.gate_proj.weight"].shape[0]
    shared = state.get("blocks.0.moe.shared_experts.gate_proj.weight")
    _check_top_k(top_k, E)
    moe = dict(num_experts=E, expert_ratio=hidden / D, num_shared=0 if shared is None else 1,
               shared_ratio=None if shared is None else shared.shape[0] / D, placement="all",
               router=dict(name="topk", gate="linear", score="softmax", top_k=top_k, normalize=False))
    out = model.pop("out_channels")
    return {**model, "ffn": "swiglu", "out_channels": out if learn_sigma == "keep" else None, "moe": moe}


def promoe_tc_config(state: dict[str, torch.Tensor], heads: int | None, top_k: int, learn_sigma: str,
                     score: str = "identity", router: str = "promoe") -> dict:
    """The moedit `model` section of a ProMoE-TC state dict (module docstring); refuses what moedit's
    `promoe` router and DiT blocks cannot compute exactly. `router="promoe_ec"`: ProMoE-EC, whose weights
    have the same names and shapes and whose routing is expert choice per sample."""
    if qk := sorted(k for k in state if _QK_NORM.match(k)):
        raise ConversionError(f"the checkpoint has q/k norm weights ({qk[0]}, …): ProMoE's qk_norm is an affine "
                              "LayerNorm per head, moedit's qk_norm an RMSNorm; it cannot be imported exactly")
    model = dit_backbone_config(state, heads)
    D = model["width"]
    qkv = state.get("blocks.0.attn.qkv.weight")  # a missing one is reported by the key map
    if qkv is not None and qkv.shape[0] != 3 * D:
        raise ConversionError(f"blocks.0.attn.qkv.weight has {qkv.shape[0]} rows, not 3·{D}: a head_dim other than "
                              "width/heads, which moedit's attention does not have")
    if model["num_classes"] != PROMOE_NULL_LABEL:
        raise ConversionError(f"the checkpoint has {model['num_classes']} classes: ProMoE routes label "
                              f"{PROMOE_NULL_LABEL} to its unconditional expert whatever the class count, moedit "
                              "its null label (= num_classes); only 1000-class checkpoints import exactly")
    moe_blocks = sorted({int(m.group(1)) for k in state if (m := _PRO_CENTERS.match(k))})
    depth, first = model["depth"], moe_blocks[0]
    if moe_blocks == list(range(depth)):
        placement = "all"
    elif moe_blocks == list(range(1, depth, 2)):
        placement = "interleaved"
    else:
        raise ConversionError(f"MoE blocks {moe_blocks} of {depth}: moedit places MoE in all or in the odd blocks")
    E, _ = state[f"blocks.{first}.mlp.cluster_centers"].shape
    experts = {int(m.group(2)) for k in state if (m := _PRO_EXPERT.match(k)) and int(m.group(1)) == first}
    if len(experts) != E + 1:
        raise ConversionError(f"block {first} has {len(experts)} experts for {E} cluster centers: moedit's promoe "
                              "router needs exactly one unconditional expert after the routed ones (their "
                              "use_uncond_expert)")
    _check_top_k(top_k, E)
    hidden = state[f"blocks.{first}.mlp.experts.0.up_proj.weight"].shape[0]
    shared = state.get(f"blocks.{first}.mlp.shared_expert.up_proj.weight")
    moe = dict(num_experts=E, expert_ratio=hidden / D, num_shared=0 if shared is None else 1,
               shared_ratio=None if shared is None else shared.shape[0] / D, placement=placement,
               router=dict(name=router, score=score, top_k=top_k, normalize=False))
    dense = next((v for k, v in state.items() if (m := _PRO_DENSE.match(k)) and m.group(3) == "weight"
                  and m.group(2) in ("fc1", "up_proj")), None)
    mlp_ratio = {} if dense is None else {"mlp_ratio": dense.shape[0] / D}
    out = model.pop("out_channels")
    return {**model, "ffn": "mlp", **mlp_ratio, "out_channels": out if learn_sigma == "keep" else None, "moe": moe}


def diffmoe_config(state: dict[str, torch.Tensor], heads: int | None, top_k: int, learn_sigma: str,
                   score: str = "softmax") -> dict:
    """The moedit `model` section of a DiffMoE state dict: the `diffmoe` router with DiffMoE's released
    inference (`capacity_inference: topk`), its capacity (`top_k` here: not stored in the weights; their
    configs: 1) and the EMA decay of its threshold buffer."""
    if qk := sorted(k for k in state if _QK_NORM.match(k)):
        raise ConversionError(f"the checkpoint has q/k norm weights ({qk[0]}, …), which moedit's attention lacks")
    if score != "softmax":
        raise ConfigError(f"--score {score}: DiffMoE's gate is a softmax")
    model = dit_backbone_config(state, heads)
    D, depth = model["width"], model["depth"]
    moe_blocks = sorted({int(m.group(1)) for k in state if (m := _DIFF_GATE.match(k))})
    placement = {tuple(range(depth)): "all", tuple(range(1, depth, 2)): "interleaved"}.get(tuple(moe_blocks))
    if placement is None:
        raise ConversionError(f"MoE blocks {moe_blocks} of {depth}: moedit places MoE in all or in the odd blocks")
    first = moe_blocks[0]
    E = state[f"blocks.{first}.mlp.gate_weight"].shape[0]
    _check_top_k(top_k, E)
    hidden = state[f"blocks.{first}.mlp.experts.0.fc1.weight"].shape[0]
    shared = state.get(f"blocks.{first}.mlp.shared_experts.fc1.weight")
    decay = state.get(f"blocks.{first}.mlp.ema_decay", torch.tensor([0.95]))
    router = dict(name="diffmoe", gate="linear", score="softmax", top_k=top_k, capacity=float(top_k),
                  threshold_decay=round(float(decay.reshape(-1)[0]), 6), predictor_hidden=D, capacity_inference="topk")
    moe = dict(num_experts=E, expert_ratio=hidden / D, num_shared=0 if shared is None else 1,
               shared_ratio=None if shared is None else shared.shape[0] / D, placement=placement, router=router)
    dense = next((v for k, v in state.items() if re.match(r"^blocks\.\d+\.mlp\.fc1\.weight$", k)), None)
    out = model.pop("out_channels")
    return {**model, "ffn": "mlp", **({} if dense is None else {"mlp_ratio": dense.shape[0] / D}),
            "out_channels": out if learn_sigma == "keep" else None, "moe": moe}


def dsmoe_config(state: dict[str, torch.Tensor], heads: int | None, top_k: int | None, learn_sigma: str,
                 score: str = "sigmoid", image_size: int = 32) -> dict:
    """The moedit `model` section of a DSMoE state dict: token choice with sigmoid scores, the selection
    bias (their e_score_correction_bias), group-limited top-k renormalised then scaled, SwiGLU experts and
    one shared SwiGLU expert, dense blocks their SiLU MLP, 2-D rotate-half RoPE (no pos_embed) or their
    sin-cos table. top_k, the scale and the groups are not in the weights: taken from the released config
    of the same shape (models/presets.py), else `--set model.moe.router.*`."""
    from moedit.models.presets import _DSMOE

    if bad := sorted(k for k in state if _DS_UNSUPPORTED.match(k)):
        raise ConversionError(f"the checkpoint has {bad[0]} (…): RMSNorm blocks, attention sinks, grouped-query "
                              "or q/k-normed attention, which moedit's DiT block does not have")
    if score != "sigmoid":
        raise ConfigError(f"--score {score}: DSMoE's scores are sigmoids")
    p = state["x_embedder.proj.weight"].shape[-1]
    if image_size < 1 or image_size % p:
        raise ConfigError(f"--image-size {image_size} must be a positive multiple of the checkpoint's patch size {p}")
    model = dit_backbone_config(state, heads, rope_grid=image_size // p)
    D, depth = model["width"], model["depth"]
    moe_blocks = sorted({int(m.group(1)) for k in state if (m := _DS_GATE.match(k))})
    placement = {tuple(range(depth)): "all", tuple(range(1, depth, 2)): "interleaved"}.get(tuple(moe_blocks))
    if placement is None:
        raise ConversionError(f"MoE blocks {moe_blocks} of {depth}: moedit places MoE in all or in the odd blocks "
                              "(their skip_first2 has no moedit equivalent)")
    first = moe_blocks[0]
    if f"blocks.{first}.mlp.shared_experts.gate_proj.weight" not in state:
        raise ConversionError("no shared expert: DSMoE then adds the block's input to the MoE output, which "
                              "moedit's MoE layer does not")
    E = state[f"blocks.{first}.mlp.gate.weight"].shape[0]
    hidden = state[f"blocks.{first}.mlp.experts.blocks.0.gate_proj.weight"].shape[0]
    shared = state[f"blocks.{first}.mlp.shared_experts.gate_proj.weight"].shape[0]
    released = {(w, e, h): (k, sc, g) for (_, w, _, e, k, h, sc, g) in _DSMOE.values()}.get((D, E, hidden), (2, 1.0, 1))
    k, scale, groups = released if top_k is None else (top_k, released[1], released[2])
    _check_top_k(k, E)
    router = dict(name="topk", gate="linear", score="sigmoid", top_k=k, normalize=True, scale=scale,
                  selection_bias=True, num_groups=groups, top_groups=groups)
    moe = dict(num_experts=E, expert_ratio=hidden / D, num_shared=1, shared_ratio=shared / D, placement=placement,
               router=router)
    dense = next((v for kk, v in state.items() if re.match(r"^blocks\.\d+\.mlp\.fc1\.weight$", kk)), None)
    rope = {"rope_pairing": "rotate_half"} if model["pos_embed"] == "rope" else {}
    out = model.pop("out_channels")
    return {**model, **rope, "ffn": "swiglu", "dense_ffn": "mlp_silu",
            **({} if dense is None else {"mlp_ratio": dense.shape[0] / D}),
            "out_channels": out if learn_sigma == "keep" else None, "moe": moe}


def _check_top_k(top_k: int, E: int) -> None:
    if not 1 <= top_k <= E:
        raise ConfigError(f"--top-k {top_k} must be between 1 and the checkpoint's {E} experts")


def _map(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], patch: int,
         target_of: Callable, layout: str) -> dict[str, torch.Tensor]:
    """Every key through `target_of` (-> a model key, or (stacked key, expert index), or None), experts
    stacked in index order, then every name and shape checked against the model."""
    mapped: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    unmapped, mismatched = [], []
    for key, tensor in state.items():
        name, value = _shared_target(key, tensor, patch, target)
        if name is None:
            name, value = target_of(key, tensor)
        if name is None:
            unmapped.append(key)
        elif isinstance(name, tuple):  # one expert's matrix of a stacked tensor
            experts.setdefault(name[0], {})[name[1]] = value
        else:
            mapped[name] = value
    for name, by_expert in experts.items():
        E = target[name].shape[0] if name in target else 0
        if sorted(by_expert) != list(range(E)):
            mismatched.append(f"{name}: experts {sorted(by_expert)} in the checkpoint, the model has {E}")
            continue
        mapped[name] = torch.stack([by_expert[e] for e in range(E)])
    for name, value in list(mapped.items()):
        if name == "__pos_embed__":  # checked by the caller against the model's fixed table
            continue
        if name not in target:
            unmapped.append(f"(-> {name}, which the model does not have)")
            del mapped[name]
        elif value.shape != target[name].shape:
            mismatched.append(f"{name}: {tuple(value.shape)} from the checkpoint, the model has {tuple(target[name].shape)}")
    missing = [k for k in target if k not in mapped]
    _refuse(unmapped, mismatched, missing, layout)
    return {k: v.to(target[k].dtype) if k in target else v for k, v in mapped.items()}


def _shared_target(key: str, tensor: torch.Tensor, patch: int, target: dict):
    """DiT's backbone keys, the same names in every layout; (None, None) for the others."""
    if key == "pos_embed":
        return "__pos_embed__", tensor
    if _BACKBONE.match(key):
        return key, tensor
    if key.startswith("final_layer.linear."):
        return key, _first_channels(tensor, patch, target.get(key))
    return None, None


def _dit_moe_target(key: str, tensor: torch.Tensor):
    """DiT-MoE's MoE keys: gate -> the topk router's linear gate, SwiGLU experts transposed and stacked."""
    if m := _GATE.match(key):
        return f"blocks.{m.group(1)}.moe.router.gate.net.head.weight", tensor
    if m := _EXPERT.match(key):
        return (f"blocks.{m.group(1)}.moe.experts.{_STACKED[m.group(3)]}", int(m.group(2))), tensor.T
    if m := _SHARED.match(key):
        return f"blocks.{m.group(1)}.moe.shared.{_STACKED[m.group(2)]}", tensor.T[None]
    return None, None


def _promoe_tc_target(key: str, tensor: torch.Tensor):
    """ProMoE-TC's FFN keys: cluster_centers -> prototypes_ED; expert e (e = E the unconditional one, as in
    moedit) up/down weights transposed, biases as they are, stacked; the shared expert likewise with a
    leading expert axis of 1; dense blocks' fc1/fc2 (or up/down_proj) -> mlp.fc1/fc2."""
    if m := _PRO_CENTERS.match(key):
        return f"blocks.{m.group(1)}.moe.router.prototypes_ED", tensor
    if m := _PRO_EXPERT.match(key):
        i, e, proj, kind = m.groups()
        return _expert_entry(i, "experts", _PRO_STACKED[proj, kind], int(e), tensor, kind == "weight")
    if m := _PRO_SHARED.match(key):
        i, proj, kind = m.groups()
        return _expert_entry(i, "shared", _PRO_STACKED[proj, kind], None, tensor, kind == "weight")
    if m := _PRO_DENSE.match(key):
        return f"blocks.{m.group(1)}.mlp.{_PRO_DENSE_NAME[m.group(2)]}.{m.group(3)}", tensor
    return None, None


def _diffmoe_target(key: str, tensor: torch.Tensor):
    """DiffMoE's FFN keys: gate_weight -> the linear gate; capacity_predictor.0/.2 -> predictor.fc1/fc2;
    expert_threshold -> threshold.value_X (used as trained); ema_decay -> the threshold's update counter
    (set to 1: the config carries the decay itself); experts' timm fc1/fc2 transposed and stacked; the
    shared expert with a leading expert axis of 1; dense blocks' fc1/fc2 as they are (the backbone map)."""
    if m := _DIFF_GATE.match(key):
        return f"blocks.{m.group(1)}.moe.router.gate.net.head.weight", tensor
    if m := _DIFF_PREDICTOR.match(key):
        i, layer, kind = m.groups()
        return f"blocks.{i}.moe.router.predictor.{'fc1' if layer == '0' else 'fc2'}.{kind}", tensor
    if m := _DIFF_BUFFER.match(key):
        if m.group(2) == "expert_threshold":
            return f"blocks.{m.group(1)}.moe.router.threshold.value_X", tensor
        return f"blocks.{m.group(1)}.moe.router.threshold.updates", torch.ones((), dtype=torch.int64)
    if m := _DIFF_EXPERT.match(key):
        i, e, fc, kind = m.groups()
        return _expert_entry(i, "experts", _DIFF_STACKED[fc, kind], int(e), tensor, kind == "weight")
    if m := _DIFF_SHARED.match(key):
        i, fc, kind = m.groups()
        return _expert_entry(i, "shared", _DIFF_STACKED[fc, kind], None, tensor, kind == "weight")
    if m := re.match(r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", key):
        return key, tensor
    return None, None


def _dsmoe_target(key: str, tensor: torch.Tensor):
    """DSMoE's FFN keys: gate.weight -> the linear gate, gate.e_score_correction_bias -> the selection
    bias; experts' and the shared expert's SwiGLU matrices transposed (stacked); dense blocks' fc1/fc2."""
    if m := _DS_GATE.match(key):
        name = "gate.net.head.weight" if m.group(2) == "weight" else "bias_E"
        return f"blocks.{m.group(1)}.moe.router.{name}", tensor
    if m := _DS_EXPERT.match(key):
        return _expert_entry(m.group(1), "experts", _STACKED[m.group(3)], int(m.group(2)), tensor, True)
    if m := _DS_SHARED.match(key):
        return _expert_entry(m.group(1), "shared", _STACKED[m.group(2)], None, tensor, True)
    if re.match(r"^blocks\.\d+\.mlp\.(fc1|fc2)\.(weight|bias)$", key):
        return key, tensor
    return None, None


def _expert_entry(block: str, group: str, name: str, expert: int | None, tensor: torch.Tensor, is_weight: bool):
    """A routed expert's tensor (group "experts", stacked by index) or the shared expert's (group "shared",
    with a leading expert axis of 1); weights transposed from nn.Linear's (out, in) to moedit's (in, out)."""
    value = tensor.T if is_weight else tensor
    key = f"blocks.{block}.moe.{group}.{name}"
    return ((key, expert), value) if expert is not None else (key, value[None])


def _first_channels(w: torch.Tensor, patch: int, target: torch.Tensor | None) -> torch.Tensor:
    """final_layer.linear rows in DiT's (p, q, c) order, cut to the model's channels (learned σ dropped)."""
    pp = patch * patch
    if target is None or w.shape[0] == target.shape[0] or w.shape[0] % pp or target.shape[0] % pp:
        return w
    return w.reshape(pp, w.shape[0] // pp, *w.shape[1:])[:, : target.shape[0] // pp].reshape(target.shape[0], *w.shape[1:])


def _refuse(unmapped: list[str], mismatched: list[str], missing: list[str], layout: str = "dit_moe") -> None:
    problems = [(unmapped, f"checkpoint keys the {NAMES[layout]} map does not cover"), (mismatched, "shape mismatches"),
                (missing, "model keys the checkpoint does not provide")]
    lines = [f"{what} ({len(keys)}):\n    " + "\n    ".join(keys[:20]) + ("\n    …" if len(keys) > 20 else "")
             for keys, what in problems if keys]
    if lines:
        raise ConversionError(f"the checkpoint does not fit the {NAMES[layout]} key map (convert/peers.py):\n  "
                              + "\n  ".join(lines) + f"\nCheck that it is {SOURCES[layout]}, and --heads.")


LAYOUT_CONFIG = {"dit_moe": dit_moe_config, "promoe_tc": promoe_tc_config,
                 "promoe_ec": functools.partial(promoe_tc_config, router="promoe_ec"), "diffmoe": diffmoe_config,
                 "dsmoe": dsmoe_config}
# each layout's keys beyond DiT's backbone: key -> (model key | (stacked key, expert), tensor) or (None, None)
LAYOUT_TARGETS = {"dit_moe": _dit_moe_target, "promoe_tc": _promoe_tc_target, "promoe_ec": _promoe_tc_target,
                  "diffmoe": _diffmoe_target, "dsmoe": _dsmoe_target}
# DSMoE's rectified flow runs from noise (t = 0) to data (t = 1), predicts x − ε and feeds t unscaled:
# moedit's t is 1 − theirs (t_flip), its target ε − x the negation (the final layer is negated on import)
DSMOE_OBJECTIVES = {"rectified_flow": {"model": {"t_scale": 1.0, "t_flip": True},
                                       "objective": {"name": "rectified_flow", "t_sampling": "uniform"},
                                       "sample": {"sampler": "euler", "steps": 50}}}
LAYOUT_OBJECTIVES = {"dit_moe": OBJECTIVES, "promoe_tc": PROMOE_OBJECTIVES, "promoe_ec": PROMOE_OBJECTIVES,
                     "diffmoe": PROMOE_OBJECTIVES, "dsmoe": DSMOE_OBJECTIVES}


def _negate_output(tensors: dict[str, torch.Tensor]) -> None:
    """DSMoE predicts x − ε, moedit ε − x: the final linear layer's weights and bias negated (exact)."""
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        tensors[name] = -tensors[name]


LAYOUT_FINISH = {"dsmoe": _negate_output}  # a last exact transform of the mapped tensors, per layout


def read_peer_state(source: Path, raw: bool) -> tuple[dict[str, torch.Tensor], str]:
    """read_state_file, plus ProMoE's training checkpoint ({model,ema_model,optimizer}_state_dict, step)."""
    try:
        return read_state_file(source, raw)
    except ConversionError as exc:
        if source.suffix not in TORCH_SUFFIXES:
            raise
        error = exc
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (read_state_file's error says why)
        raise error from None
    key = "model_state_dict" if raw else "ema_model_state_dict"
    if not (isinstance(obj, dict) and isinstance(obj.get(key), dict)
            and all(isinstance(v, torch.Tensor) for v in obj[key].values())):
        raise error
    return obj[key], f"training checkpoint ({'raw' if raw else 'EMA'} weights)"


SAME_KEYS = {"promoe_ec": "promoe_tc"}  # layouts the key names cannot tell apart: the user names them


def _resolve_layout(state: dict, layout: str, source: Path, log=print) -> str:
    found = detect_layout(state)
    if layout == "auto":
        layout = found
        if found in SAME_KEYS.values():
            twins = [name for name, keys in SAME_KEYS.items() if keys == found]
            log(f"note: {NAMES[found]} and {', '.join(NAMES[t] for t in twins)} checkpoints have the same keys; "
                f"importing as {NAMES[found]}. For {SOURCES[twins[0]]}, pass --layout {twins[0]}")
    if layout not in LAYOUTS or found != SAME_KEYS.get(layout, layout):
        raise ConversionError(f"{source} is not a {layout or 'known'} checkpoint (its keys look like "
                              f"{found or 'none of ' + ', '.join(LAYOUTS)}); moedit imports: {', '.join(LAYOUTS)}")
    return layout


def import_run(source: str | Path, out: str | Path, layout: str = "auto", objective: str | None = None,
               heads: int | None = None, top_k: int | None = None, learn_sigma: str = "keep", raw: bool = False,
               overrides: list[str] | None = None, log=print, score: str | None = None,
               image_size: int | None = None) -> tuple[Path, Config]:
    """A new moedit run directory at `out` holding the peer checkpoint `source` (module docstring).
    objective, top_k and score left None take the layout's defaults (`DEFAULTS`)."""
    from moedit.config import apply_overrides
    from moedit.models.embed import sincos_2d

    out = check_out(Path(out))
    source = Path(source)
    if not (source.is_file() and (source.suffix in TORCH_SUFFIXES or source.suffix == ".safetensors")):
        raise ConfigError(f"{source} is not a .pt/.pth/.bin/.ckpt/.safetensors checkpoint file")
    if learn_sigma not in LEARN_SIGMA:
        raise ConfigError(f"learn_sigma must be one of {', '.join(LEARN_SIGMA)}")
    state, what = read_peer_state(source, raw)
    layout = _resolve_layout(state, layout, source, log)
    objective = objective or DEFAULTS[layout]["objective"]
    top_k = DEFAULTS[layout]["top_k"] if top_k is None else top_k
    score = score or DEFAULTS[layout]["score"]
    settings = LAYOUT_OBJECTIVES[layout]
    if objective not in settings:
        raise ConfigError(f"objective {objective!r}: {NAMES[layout]} checkpoints were trained with "
                          f"{', '.join(settings)}")
    extra = {"image_size": image_size} if image_size is not None else {}  # only RoPE layouts need it
    model = LAYOUT_CONFIG[layout](state, heads, top_k, learn_sigma, score, **extra)
    data = {**settings[objective], "model": {**model, **settings[objective]["model"]},
            "data": {"name": "npz"}, "train": {"out_dir": str(out)}}
    cfg = from_dict(apply_overrides(data, overrides or []))
    net = build_model(cfg.model)
    target = net.state_dict()
    tensors = _map(state, target, cfg.model.patch_size, LAYOUT_TARGETS[layout], layout)
    if layout in LAYOUT_FINISH:
        LAYOUT_FINISH[layout](tensors)
    pos = tensors.pop("__pos_embed__", None)
    if pos is not None:
        grid = cfg.model.image_size // cfg.model.patch_size
        table = sincos_2d(cfg.model.width, grid, columns_first=cfg.model.pos_embed == "sincos_wh")
        if (pos.reshape(table.shape).float() - table).abs().max() > 1e-4:
            raise ConversionError("pos_embed is not the fixed sin-cos table of the model's pos_embed setting")
    net.load_state_dict(tensors)
    moe = cfg.model.moe
    log(f"source: {NAMES[layout]} {what} {source}: {cfg.model.depth} blocks × {cfg.model.width}, {moe.num_experts} "
        f"experts ({moe.placement}) {moe.router.score} top-{moe.router.top_k}, {moe.num_shared} shared; objective {objective} "
        f"(t_scale {cfg.model.t_scale:g})")
    write_run(out, cfg, net.state_dict(), {"source": str(source), "layout": layout, "objective": objective,
                                           "weights": what, "learn_sigma": learn_sigma})
    log(f"wrote {out}: config.yaml, checkpoints/step_00000000 (weights only), conversion.json")
    return out, cfg

"""Dense → MoE conversion ("upcycling") under the Three Laws (docs/ROUTING_MATH.md §6; arXiv 2605.19378).

1. Every routed expert is an exact copy of the dense FFN it replaces — or, for fine-grained targets
   (expert hidden H_e < dense hidden H), one of S = H / H_e hidden slices scaled by S, expert e holding
   slice e mod S: Expert_e(x) = S · f_{e mod S}(x) + b2, so S slices of weight 1/S sum to the dense FFN.
2. Shared experts start exactly zero for a verification run (`shared_init="zero"`) and as tiny noise
   N(0, noise_std²), std 1e-4 [choice], in their weight matrices for training (`"noise"`, the default):
   an all-zero two-matrix expert gets zero gradient in both matrices and would never train.
3. Only routers (gates, prototypes, capacity predictors, target heads) start random, from `seed`.

The conversion is a config transform (`moe_model_config`: the dense ModelConfig plus MoE settings;
the architecture must not change) followed by the explicit key map of convert/keys.py.
`verify_conversion` runs both models on the same random inputs and reports the error next to
whether it must be at float tolerance (convert/exact.py says which configurations are exact).

    moe_model, moe_cfg = convert_dense(dense_model, dense_model.cfg, {"num_experts": 4, ...})
    report = verify_conversion(dense_model, moe_model)   # {"max_abs", "mean_abs", "exact_expected", "reason", ...}
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moedit.config import ConfigError, MoEConfig, ModelConfig, from_dict, to_dict
from moedit.models.dit import DiT, moe_block_indices, sample_shape
from moedit.convert.exact import routing_exactness
from moedit.convert.keys import ConversionError, MapContext, map_state_dict
from moedit.moe.experts import KINDS as EXPERT_KINDS
from moedit.moe.layer import expert_hidden
from moedit.moe.routers import extra_experts

SHARED_INITS = ("noise", "zero")
GATE_INITS = ("random", "zero")
# ModelConfig fields conversion may change: the MoE itself, label dropout (training only), the preset
# name (every value is explicit), and the output channels (learned-sigma channels may be dropped)
_MAY_CHANGE = ("moe", "class_dropout", "preset", "out_channels")


def dense_hidden(cfg: ModelConfig) -> int:
    return int(round(cfg.mlp_ratio * cfg.width))


def moe_model_config(dense: ModelConfig, moe: MoEConfig | dict) -> ModelConfig:
    """The dense config with `moe` set, validated like any run config."""
    if dense.moe is not None:
        raise ConversionError("the source is already a MoE model (model.moe is set); convert takes a dense model")
    data = to_dict(dense)
    data["moe"] = to_dict(moe) if isinstance(moe, MoEConfig) else dict(moe)
    return from_dict({"model": data}).model


def check_architecture(dense: ModelConfig, moe: ModelConfig) -> None:
    """Everything but the MoE settings must match: the key map copies the dense weights one to one."""
    if moe.moe is None:
        raise ConversionError("no MoE settings: give model.moe (e.g. --set model.moe.num_experts=8)")
    if dense.dense_ffn is not None and dense.dense_ffn != dense.ffn:
        raise ConversionError(f"the dense blocks run model.dense_ffn={dense.dense_ffn} but experts would run "
                              f"model.ffn={dense.ffn}: conversion copies the dense FFN into experts of its own kind, "
                              f"and experts can be {' or '.join(EXPERT_KINDS)}")
    a, b = to_dict(dense), to_dict(moe)
    diffs = [f"model.{k}: dense {a[k]!r} vs MoE {b[k]!r}" for k in a if k not in _MAY_CHANGE and a[k] != b[k]]
    if diffs:
        hint = " (experts copy the dense FFN, so they are of its kind)" if a["ffn"] != b["ffn"] else ""
        raise ConversionError("conversion keeps the dense architecture, but these differ:\n  " + "\n  ".join(diffs)
                              + f"\nChange only model.moe.* (and model.class_dropout){hint}.")
    dense_out = dense.out_channels or dense.in_channels
    if (moe.out_channels or moe.in_channels) > dense_out:
        raise ConversionError(f"model.out_channels={moe.out_channels} exceeds the dense model's {dense_out}")


def expert_split(dense: ModelConfig, moe: ModelConfig) -> int:
    """S = H_dense / H_e: 1 for full copies, more for a fine-grained split into hidden slices."""
    H, width = dense_hidden(dense), dense.width
    H_e = expert_hidden(width, moe.moe.expert_ratio)
    if H % H_e != 0:
        divisors = [d for d in range(1, 9) if H % d == 0]
        raise ConversionError(
            f"expert hidden width {H_e} (model.moe.expert_ratio={moe.moe.expert_ratio:g} × width {width}) must divide "
            f"the dense FFN hidden width {H} (mlp_ratio {dense.mlp_ratio:g}); use expert_ratio = {dense.mlp_ratio:g}/n "
            f"for n in {divisors}")
    S = H // H_e
    if S > 1 and moe.moe.num_experts % S != 0:
        raise ConversionError(f"a split into {S} slices needs model.moe.num_experts to be a multiple of {S} "
                              f"(each slice equally often), got {moe.moe.num_experts}")
    return S


def build_dense(state: dict[str, torch.Tensor], cfg: ModelConfig) -> DiT:
    """The dense source as a moedit model, loaded through the same key map (eval mode)."""
    if cfg.moe is not None:
        raise ConversionError("the source is already a MoE model (model.moe is set); convert takes a dense model")
    model = DiT(cfg)
    ctx = MapContext(moe_blocks=frozenset(), num_routed=0, slices=1, patch_size=cfg.patch_size,
                     pos_table_1LD=model.pos_embed if cfg.pos_embed != "rope" else None)
    model.load_state_dict(map_state_dict(state, model.state_dict(), ctx))
    return model.eval()


def _build(cfg: ModelConfig, seed: int) -> DiT:
    # Law 3: the routers' random initialisation comes from `seed` alone, not the caller's RNG state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiT(cfg)


@torch.no_grad()
def init_shared_experts(model: DiT, how: str, noise_std: float, seed: int) -> None:
    """Law 2: shared experts exactly zero, or their weight matrices ~ N(0, noise_std²) (biases zero)."""
    if how not in SHARED_INITS:
        raise ConfigError(f"shared_init={how!r} is unknown; choose one of: {', '.join(SHARED_INITS)}")
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in model.moe_layers():
        for name, param in (layer.shared.named_parameters() if layer.shared is not None else ()):
            if how == "zero" or name.startswith("b"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * noise_std)


@torch.no_grad()
def zero_gate_heads(model: DiT) -> None:
    """Uniform router scores (the gate's last linear layer zeroed): what exact fine-grained splits need."""
    for layer in model.moe_layers():
        gate = getattr(layer.router, "gate", None)
        if gate is None:
            raise ConversionError(f"gate_init='zero' needs a gate network, but router {layer.cfg.router.name!r} "
                                  "routes by prototypes; use gate_init='random'")
        gate.net.head.weight.zero_()


def convert_dense(source: nn.Module | dict[str, torch.Tensor], dense_cfg: ModelConfig, moe: MoEConfig | dict | ModelConfig,
                  shared_init: str = "noise", noise_std: float = 1e-4, seed: int = 0,
                  gate_init: str = "random") -> tuple[DiT, ModelConfig]:
    """A MoE DiT built from a dense model or state dict (moedit or facebookresearch/DiT names).

    `moe`: MoE settings (MoEConfig or dict: the model.moe section) or the complete MoE ModelConfig.
    Returns the model (eval mode, float32) and its config."""
    moe_cfg = moe if isinstance(moe, ModelConfig) else moe_model_config(dense_cfg, moe)
    check_architecture(dense_cfg, moe_cfg)
    if gate_init not in GATE_INITS:
        raise ConfigError(f"gate_init={gate_init!r} is unknown; choose one of: {', '.join(GATE_INITS)}")
    slices = expert_split(dense_cfg, moe_cfg)
    state = source.state_dict() if isinstance(source, nn.Module) else source
    model = _build(moe_cfg, seed)
    ctx = MapContext(moe_blocks=frozenset(moe_block_indices(moe_cfg)),
                     num_routed=moe_cfg.moe.num_experts + extra_experts(moe_cfg.moe.router.name),
                     slices=slices, patch_size=moe_cfg.patch_size,
                     pos_table_1LD=model.pos_embed if moe_cfg.pos_embed != "rope" else None)
    mapped = map_state_dict(state, model.state_dict(), ctx)
    model.load_state_dict(mapped, strict=False)  # the rest: router / shared keys, initialised here
    init_shared_experts(model, shared_init, noise_std, seed)
    if gate_init == "zero":
        zero_gate_heads(model)
    return model.eval(), moe_cfg


def with_zero_shared(model: DiT) -> DiT:
    """The same model with its shared experts zeroed (a copy): the verification init of Law 2."""
    twin = copy.deepcopy(model)
    init_shared_experts(twin, "zero", 0.0, 0)
    return twin


def _all_zero(tensors) -> bool:
    return all(bool((t == 0).all()) for t in tensors)


def expected_exactness(dense_cfg: ModelConfig, model: DiT) -> tuple[bool, str]:
    """(exact, reason) for a converted model, read off its config and its gate and shared weights."""
    gates = [getattr(layer.router, "gate", None) for layer in model.moe_layers()]
    zero_gate = all(g is not None for g in gates) and _all_zero(g.net.head.weight for g in gates)
    shared_zero = _all_zero(p for layer in model.moe_layers() if layer.shared is not None
                            for p in layer.shared.parameters())
    return routing_exactness(model.cfg.moe, expert_split(dense_cfg, model.cfg), zero_gate, shared_zero)


def verification_inputs(cfg: ModelConfig, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """x_t ~ N(0, I), t ~ U(0, 1), labels with every other sample the null label (the CFG branch)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *sample_shape(cfg), generator=gen)
    t = torch.rand(batch, generator=gen)
    y = torch.randint(cfg.num_classes, (batch,), generator=gen)
    y[1::2] = cfg.num_classes
    return x, t, y


@torch.no_grad()
def _eval_forward(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        return model(x.to(device), t.to(device), y.to(device)).float().cpu()
    finally:
        model.train(was_training)


def verify_conversion(dense_model: DiT, moe_model: DiT, batch: int = 8, seed: int = 0,
                      tolerance: float = 1e-4) -> dict:
    """Both models on the same inputs (eval mode): max/mean |Δ| of the MoE model's output channels,
    split by null-label and labelled samples, and whether the error must be at float tolerance.
    `within_tolerance`: max_abs ≤ tolerance · max(1, max |dense output|)."""
    exact, reason = expected_exactness(dense_model.cfg, moe_model)
    x, t, y = verification_inputs(dense_model.cfg, batch, seed)
    out_moe = _eval_forward(moe_model, x, t, y)
    out_dense = _eval_forward(dense_model, x, t, y)[:, : out_moe.shape[1]]
    diff = (out_dense - out_moe).abs()
    null_B = y == dense_model.cfg.num_classes
    scale = max(1.0, out_dense.abs().max().item())
    return {
        "max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
        "max_abs_null_label": diff[null_B].max().item() if null_B.any() else 0.0,
        "max_abs_labelled": diff[~null_B].max().item() if (~null_B).any() else 0.0,
        "output_max_abs": out_dense.abs().max().item(), "samples": batch, "null_label_samples": int(null_B.sum()),
        "exact_expected": exact, "reason": reason, "tolerance": tolerance * scale,
        "within_tolerance": diff.max().item() <= tolerance * scale,
    }

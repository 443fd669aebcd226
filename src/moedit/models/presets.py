"""Model presets: the DiT family, tiny CPU sizes, and the configurations the MoE-DiT papers report.

A preset is a partial `model` config dict; the user's keys win at every nesting level
(`resolve_model_preset` merges deeply), so `moe.router.top_k: 2` next to a preset changes only top_k,
and `moe: null` turns any preset into a dense model.

- DiT-{S,B,L,XL}/{2,4,8}: widths, depths and heads of Peebles & Xie (arXiv 2212.09748, Table 1).
- Paper presets, for ImageNet 256² in SD-VAE latent space (32×32×4, 1000 classes, patch 2):
  ProMoE (arXiv 2510.24711, Table 2), Race-DiT (arXiv 2503.16057, Table 4), DiT-MoE (arXiv
  2407.11633, Table 1), DiffMoE (arXiv 2503.14487, Table 1) and EfficientMoE's DSMoE (arXiv
  2512.01252, configs of github.com/yhlleo/EfficientMoE). Their parameter counts are checked against
  the published figures in tests/unit/test_presets.py; docs/PRESETS.md lists both.
"""

from __future__ import annotations


from moedit.config import ConfigError, deep_merge

# name -> (depth, width, heads)
_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# sizes some papers add to the DiT family: Race-DiT's M, DiT-MoE's G (arXiv 2407.11633, Table 1)
_EXTRA_SIZES = {"M": (16, 960, 16), "G": (40, 1408, 16)}

# ImageNet 256² encoded by the SD VAE (downsampling 8, 4 channels); the null class is added by the model
_IMAGENET_LATENT_256 = dict(image_size=32, in_channels=4, num_classes=1000)


def _dit_presets() -> dict[str, dict]:
    presets = {}
    for size, (depth, width, heads) in _DIT_SIZES.items():
        for patch in (2, 4, 8):
            presets[f"DiT-{size}/{patch}"] = dict(depth=depth, width=width, heads=heads, patch_size=patch,
                                                  pos_embed="sincos_wh")
    return presets


def _latent_dit(size: str) -> dict:
    """A DiT size with patch 2 on ImageNet-256 latents: the backbone every paper preset starts from, with
    facebookresearch/DiT's columns-first sin-cos table, which the papers' code reuses (ProMoE's and the
    DiffMoE model it ships: modules.get_2d_sincos_pos_embed; DiT-MoE's models.py; Race-DiT publishes no
    code and builds on DiT: [choice] the same). DSMoE replaces it with RoPE."""
    depth, width, heads = {**_DIT_SIZES, **_EXTRA_SIZES}[size]
    return dict(depth=depth, width=width, heads=heads, patch_size=2, pos_embed="sincos_wh", **_IMAGENET_LATENT_256)


def _promoe(size: str) -> dict:
    """ProMoE "E14A1S1U1": 12 routed + 1 unconditional + 1 shared GELU experts of width 2D in the odd
    blocks, prototypical top-1 routing. The unconditional expert is the one `promoe` adds itself."""
    moe = dict(num_experts=12, expert_ratio=2.0, num_shared=1, shared_ratio=2.0, placement="interleaved",
               router=dict(name="promoe", top_k=1))
    return {**_latent_dit(size), "ffn": "mlp", "moe": moe}


def _race_dit(size: str) -> dict:
    """Race-DiT "4in32": each block's 4D-wide FFN split into 4 slices of width D, 32 such GELU experts,
    4 per token on average, chosen by the global race with an MLP gate."""
    moe = dict(num_experts=32, expert_ratio=1.0, placement="all", router=dict(name="race", top_k=4))
    return {**_latent_dit(size), "ffn": "mlp", "moe": moe}


def _dit_moe(size: str, experts: int) -> dict:
    """DiT-MoE "nE2A": every block MoE, SwiGLU experts of width 4D, softmax top-2 (no renormalisation),
    one always-on SwiGLU expert of width 2D (the released code's `n_shared_experts = 2` sets its width);
    positions by facebookresearch/DiT's columns-first sin-cos table, which DiT-MoE's code reuses."""
    moe = dict(num_experts=experts, expert_ratio=4.0, num_shared=1, shared_ratio=2.0, placement="all",
               router=dict(name="topk", score="softmax", top_k=2))
    return {**_latent_dit(size), "ffn": "swiglu", "moe": moe}


def _diffmoe(size: str, experts: int) -> dict:
    """DiffMoE "E{n}": GELU experts as wide as the dense FFN (4D) in the odd blocks, global token pool
    with training capacity C = 1 and a capacity predictor."""
    moe = dict(num_experts=experts, expert_ratio=4.0, placement="interleaved",
               router=dict(name="diffmoe", top_k=1, capacity=1.0))
    return {**_latent_dit(size), "ffn": "mlp", "moe": moe}


# EfficientMoE's released DSMoE configs (yhlleo/EfficientMoE, DSMoE/config/*.yaml):
# name -> (depth, width, heads, routed experts, top_k, expert hidden width, routed scale, groups)
_DSMOE = {
    "DSMoE-S-E16": (10, 384, 6, 16, 2, 768, 2.0, 2),
    "DSMoE-S-E48": (12, 384, 6, 48, 5, 128, 2.5, 1),
    "DSMoE-B-E16": (10, 768, 12, 16, 2, 1536, 2.0, 2),
    "DSMoE-B-E48": (12, 768, 12, 48, 5, 256, 2.5, 1),
    "DSMoE-L-E16": (20, 1024, 16, 16, 2, 2048, 2.0, 2),
    "DSMoE-L-E48": (24, 1024, 16, 48, 5, 448, 2.5, 1),
    "DSMoE-3B-E16": (30, 1152, 16, 16, 2, 2880, 2.0, 2),
}


def _dsmoe(depth: int, width: int, heads: int, experts: int, top_k: int, hidden: int, scale: float,
           groups: int) -> dict:
    """DSMoE (DeepSeek-style): SwiGLU routed experts plus one shared SwiGLU expert of the same width in
    the odd blocks; sigmoid scores, selection-only bias, top-k renormalised then scaled; 2-D RoPE with
    the released code's rotate-half pairing. The even (dense) blocks are the released code's SiLU MLP of
    width 4D with biases (`dense_ffn: mlp_silu`)."""
    router = dict(name="topk", score="sigmoid", top_k=top_k, normalize=True, scale=scale, selection_bias=True,
                  num_groups=groups, top_groups=groups)
    moe = dict(num_experts=experts, expert_ratio=hidden / width, num_shared=1, shared_ratio=hidden / width,
               placement="interleaved", router=router)
    return dict(depth=depth, width=width, heads=heads, patch_size=2, **_IMAGENET_LATENT_256,
                pos_embed="rope", rope_pairing="rotate_half", ffn="swiglu", dense_ffn="mlp_silu", mlp_ratio=4.0,
                moe=moe)


def _paper_presets() -> dict[str, dict]:
    presets = {f"ProMoE-{size}/2": _promoe(size) for size in ("S", "B", "L", "XL")}
    presets.update({f"Race-DiT-{size}/2-4in32": _race_dit(size) for size in ("B", "M", "L", "XL")})
    presets.update({f"DiT-MoE-{size}/2-8E2A": _dit_moe(size, 8) for size in ("S", "B", "L", "XL")})
    presets.update({"DiT-MoE-S/2-16E2A": _dit_moe("S", 16), "DiT-MoE-G/2-16E2A": _dit_moe("G", 16)})
    presets.update({"DiffMoE-S-E16": _diffmoe("S", 16), "DiffMoE-B-E16": _diffmoe("B", 16),
                    "DiffMoE-L-E8": _diffmoe("L", 8), "DiffMoE-L-E16": _diffmoe("L", 16)})
    presets.update({name: _dsmoe(*row) for name, row in _DSMOE.items()})
    return presets


MODEL_PRESETS: dict[str, dict] = {
    **_dit_presets(),
    # CPU sizes, for MNIST-scale images (28x28) and tests
    "tiny": dict(depth=4, width=128, heads=4, patch_size=4),
    "micro": dict(depth=2, width=32, heads=2, patch_size=4),
    **_paper_presets(),
}


def resolve_model_preset(model: dict) -> dict:
    """Return the model dict with the preset's values filled in under the user's explicit keys."""
    name = model.get("preset")
    if name is None:
        return dict(model)
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.preset={name!r} is unknown; choose one of: {', '.join(MODEL_PRESETS)}")
    return deep_merge(MODEL_PRESETS[name], model)

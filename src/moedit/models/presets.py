"""Model size presets: the DiT family (Peebles & Xie, arXiv 2212.09748, Table 1) and tiny CPU sizes.

A preset fills width/depth/heads/patch_size; any key the user writes next to `preset` wins.
"""

from __future__ import annotations

from moedit.config import ConfigError

# name -> (depth, width, heads)
_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _dit_presets() -> dict[str, dict]:
    presets = {}
    for size, (depth, width, heads) in _DIT_SIZES.items():
        for patch in (2, 4, 8):
            presets[f"DiT-{size}/{patch}"] = dict(depth=depth, width=width, heads=heads, patch_size=patch)
    return presets


MODEL_PRESETS: dict[str, dict] = {
    **_dit_presets(),
    # CPU sizes, for MNIST-scale images (28x28) and tests
    "tiny": dict(depth=4, width=128, heads=4, patch_size=4),
    "micro": dict(depth=2, width=32, heads=2, patch_size=4),
}


def resolve_model_preset(model: dict) -> dict:
    """Return the model dict with the preset's values filled in under the user's explicit keys."""
    name = model.get("preset")
    if name is None:
        return dict(model)
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.preset={name!r} is unknown; choose one of: {', '.join(MODEL_PRESETS)}")
    return {**MODEL_PRESETS[name], **model}

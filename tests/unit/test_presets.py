"""Paper presets: parameter counts against the published figures (built on the meta device, nothing
allocated), the activated-parameter rule, deep merging of preset and user keys, unknown names."""

from __future__ import annotations

import pytest
import torch

from moedit.config import ConfigError, apply_overrides, from_dict
from moedit.models import build_model
from moedit.models.params import count_model, count_parameters, moe_preset_names, preset_config
from moedit.models.presets import MODEL_PRESETS, resolve_model_preset

M, B = 10**6, 10**9
MI = 2**20  # EfficientMoE's "M": its figures are parameter counts divided by 2^20 (docs/PRESETS.md)
TOLERANCE = 0.03

# (preset, published total or None, published activated, the figure counts the routers as activated,
#  source). Every figure below was read in the source named on its line.
PUBLISHED = [
    # ProMoE, arXiv 2510.24711, Table 2 (model configurations, "E14A1S1U1")
    ("ProMoE-S/2", 75 * M, 33 * M, True, "ProMoE Table 2"),
    ("ProMoE-B/2", 300 * M, 130 * M, True, "ProMoE Table 2"),
    ("ProMoE-L/2", 1.063 * B, 458 * M, True, "ProMoE Table 2"),
    ("ProMoE-XL/2", 1.568 * B, 675 * M, True, "ProMoE Table 2"),
    # Race-DiT, arXiv 2503.16057v1, Table 4 (scaling: B/M/L/XL-2-MoE-4in32); its counts cover the
    # transformer blocks only (its dense XL/2 is 0.669B, DiT's blocks without embedders/final layer)
    ("Race-DiT-B/2-4in32", 0.531 * B, 0.135 * B, True, "Race-DiT Table 4"),
    ("Race-DiT-M/2-4in32", 1.106 * B, 0.281 * B, True, "Race-DiT Table 4"),
    ("Race-DiT-L/2-4in32", 1.889 * B, 0.479 * B, True, "Race-DiT Table 4"),
    ("Race-DiT-XL/2-4in32", 2.788 * B, 0.707 * B, True, "Race-DiT Table 4"),
    # DiT-MoE, arXiv 2407.11633, Table 1 ("Scaling law model size")
    ("DiT-MoE-S/2-8E2A", 199 * M, 71 * M, True, "DiT-MoE Table 1"),
    ("DiT-MoE-S/2-16E2A", 369 * M, 71 * M, True, "DiT-MoE Table 1"),
    ("DiT-MoE-B/2-8E2A", 795 * M, 286 * M, True, "DiT-MoE Table 1"),
    ("DiT-MoE-L/2-8E2A", 2.8 * B, 1.0 * B, True, "DiT-MoE Table 1"),
    ("DiT-MoE-XL/2-8E2A", 4.1 * B, 1.5 * B, True, "DiT-MoE Table 1"),
    ("DiT-MoE-G/2-16E2A", 16.5 * B, 3.1 * B, True, "DiT-MoE Table 1"),
    # the same model as counted by Race-DiT (arXiv 2503.16057v1, Table 7, DiT-MoE-XL/2 row)
    ("DiT-MoE-XL/2-8E2A", 4.105 * B, 1.530 * B, True, "Race-DiT Table 7"),
    # DiffMoE, arXiv 2503.14487, Table 1 (avg. activated at C_infer = 1, total); L-E16 also Table 9.
    # Its activated figures leave out the gate and capacity predictor (they equal the dense DiT's
    # count; Appendix C spreads those weights over the experts instead of counting them in full)
    ("DiffMoE-S-E16", 139 * M, 32 * M, False, "DiffMoE Table 1"),
    ("DiffMoE-B-E16", 555 * M, 130 * M, False, "DiffMoE Table 1"),
    ("DiffMoE-L-E8", 1.176 * B, 458 * M, False, "DiffMoE Table 1"),
    ("DiffMoE-L-E16", 1.982 * B, 458 * M, False, "DiffMoE Table 1"),
    # EfficientMoE, github.com/yhlleo/EfficientMoE README §4.1 (activated only); the totals of B-E48,
    # L-E48 and 3B-E16 are in the paper's comparison with DiffMoE (arXiv 2512.01252), read here in
    # stored summaries of the paper. "B" there is 1000 of its M, i.e. 1000 · 2^20 parameters.
    ("DSMoE-S-E16", None, 33 * MI, True, "EfficientMoE README"),
    ("DSMoE-S-E48", None, 30 * MI, True, "EfficientMoE README"),
    ("DSMoE-B-E16", None, 132 * MI, True, "EfficientMoE README"),
    ("DSMoE-B-E48", 263 * MI, 118 * MI, True, "EfficientMoE README + paper"),
    ("DSMoE-L-E16", None, 465 * MI, True, "EfficientMoE README"),
    ("DSMoE-L-E48", 1112 * MI, 436 * MI, True, "EfficientMoE README + paper"),
    ("DSMoE-3B-E16", 2958 * MI, 965 * MI, True, "EfficientMoE README + paper"),
]


def _close(counted: int, published: float) -> bool:
    return abs(counted - published) <= TOLERANCE * published


@pytest.mark.parametrize("name,total,activated,with_router,source", PUBLISHED,
                         ids=[f"{row[0]} ({row[4]})" for row in PUBLISHED])
def test_counts_match_published_figures(name: str, total: float | None, activated: float,
                                        with_router: bool, source: str) -> None:
    count = count_parameters(preset_config(name))
    counted_activated = count.activated if with_router else count.activated_without_router
    if total is not None:
        assert _close(count.total, total), f"{name}: total {count.total:,} vs {total:,.0f} published ({source})"
    assert _close(counted_activated, activated), \
        f"{name}: activated {counted_activated:,} vs {activated:,.0f} published ({source})"


def test_every_paper_preset_has_a_published_figure() -> None:
    assert set(moe_preset_names()) == {row[0] for row in PUBLISHED}


def test_counting_allocates_nothing() -> None:
    with torch.device("meta"):
        model = build_model(preset_config("DiT-MoE-G/2-16E2A"))
    assert all(p.is_meta for p in model.parameters())
    assert count_model(model).total > 16 * B


def _tiny_moe(**router) -> dict:
    return {"preset": "micro", "image_size": 8, "patch_size": 2,
            "moe": {"num_experts": 4, "expert_ratio": 2.0, "num_shared": 1, "router": router}}


@pytest.mark.parametrize("router,idle_experts", [
    ({"name": "topk", "top_k": 2}, 2),                     # 4 experts, 2 per token
    ({"name": "race", "top_k": 1}, 3),                     # k = 1 on average
    ({"name": "expert_choice", "top_k": 2, "capacity": 1.5}, 2.5),
    ({"name": "diffmoe", "capacity": 1.0}, 3),
    ({"name": "promoe", "top_k": 1}, 4),                   # 3 routed + the unconditional expert
])
def test_activated_rule(router: dict, idle_experts: float) -> None:
    """activated = total − Σ_layers (E_layer − k̄)·|expert|, checked on a real (allocated) model."""
    model = build_model(from_dict({"model": _tiny_moe(**router)}).model)
    count = count_model(model)
    assert count.total == sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for p in model.moe_layers()[0].experts.parameters()) // \
        model.moe_layers()[0].experts.num_experts
    assert count.total - count.activated == round(len(model.moe_layers()) * idle_experts * expert)
    assert count.router == sum(p.numel() for layer in model.moe_layers() for p in layer.router.parameters())


def test_dense_model_is_fully_activated() -> None:
    count = count_parameters(preset_config("DiT-XL/2"))
    assert count.total == count.activated and count.router == 0


# ---------------------------------------------------------------- deep merge of preset and user keys


def test_nested_override_keeps_the_other_preset_keys() -> None:
    cfg = from_dict({"model": {"preset": "ProMoE-B/2", "moe": {"router": {"top_k": 2}}, "depth": 4}}).model
    assert cfg.depth == 4 and cfg.width == 768
    assert cfg.moe.router.top_k == 2 and cfg.moe.router.name == "promoe"
    assert (cfg.moe.num_experts, cfg.moe.num_shared, cfg.moe.placement) == (12, 1, "interleaved")
    cfg = from_dict({"model": {"preset": "DSMoE-S-E16", "moe": {"num_experts": 8}}}).model
    assert cfg.moe.num_experts == 8 and cfg.moe.router.score == "sigmoid" and cfg.moe.router.scale == 2.0


def test_dotted_override_of_a_nested_key() -> None:
    data = apply_overrides({"model": {"preset": "Race-DiT-B/2-4in32"}}, ["model.moe.router.top_k=2"])
    moe = from_dict(data).model.moe
    assert (moe.router.name, moe.router.top_k, moe.num_experts, moe.expert_ratio) == ("race", 2, 32, 1.0)


@pytest.mark.parametrize("model", [
    {"preset": "DiT-MoE-S/2-8E2A", "moe": None},
    apply_overrides({"model": {"preset": "DiT-MoE-S/2-8E2A"}}, ["model.moe=null"])["model"],
])
def test_moe_null_gives_a_dense_model(model: dict) -> None:
    cfg = from_dict({"model": model}).model
    assert cfg.moe is None and cfg.ffn == "swiglu"  # the rest of the preset stays
    with torch.device("meta"):
        assert build_model(cfg).moe_layers() == []


def test_resolving_never_modifies_the_preset_table() -> None:
    before = repr(MODEL_PRESETS["DiffMoE-S-E16"])
    resolved = resolve_model_preset({"preset": "DiffMoE-S-E16", "moe": {"router": {"capacity": 2.0}}})
    resolved["moe"]["router"]["top_k"] = 3
    assert resolved["moe"]["router"]["capacity"] == 2.0
    assert repr(MODEL_PRESETS["DiffMoE-S-E16"]) == before


def test_unknown_preset_lists_the_valid_names() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"model": {"preset": "ProMoE-H/2"}})
    message = str(err.value)
    for name in ("ProMoE-H/2", "DiT-S/2", "tiny", "ProMoE-B/2", "Race-DiT-XL/2-4in32", "DSMoE-S-E16"):
        assert name in message

"""Typed config: strict keys and types, semantic checks with actionable messages, dotted overrides,
YAML round trip, presets."""

from __future__ import annotations

import pytest

from moedit.config import (
    Config,
    ConfigError,
    ModelConfig,
    MoEConfig,
    RouterConfig,
    apply_overrides,
    from_dict,
    load_config,
    save_yaml,
    to_dict,
)


def _raises(data: dict, *fragments: str) -> str:
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_defaults_and_config_error_is_a_value_error() -> None:
    cfg = from_dict({})
    assert cfg == Config()
    assert cfg.model.moe is None
    assert issubclass(ConfigError, ValueError)
    assert from_dict(None) == Config()


def test_unknown_top_level_key() -> None:
    _raises({"trian": {"lr": 1.0}}, "trian", "valid keys", "train", "model", "sample")


def test_unknown_nested_keys() -> None:
    _raises({"train": {"learning_rate": 1e-3}}, "train.learning_rate", "lr", "batch_size")
    msg = _raises({"model": {"moe": {"router": {"topk": 2}}}}, "model.moe.router.topk", "top_k", "selection_bias")
    assert "num_experts" not in msg  # lists the keys of the level where the typo is
    _raises({"model": {"moe": {"experts": 4}}}, "model.moe.experts", "num_experts", "placement")


@pytest.mark.parametrize(
    "data,key,expected",
    [
        ({"train": {"steps": "1000"}}, "train.steps", "integer"),
        ({"train": {"steps": 10.5}}, "train.steps", "integer"),
        ({"model": {"qk_norm": 1}}, "model.qk_norm", "true/false"),
        ({"model": {"moe": {"router": {"normalize": "yes"}}}}, "model.moe.router.normalize", "true/false"),
        ({"train": {"lr": [0.1]}}, "train.lr", "number"),
        ({"train": {"lr": True}}, "train.lr", "number"),
        ({"model": {"width": True}}, "model.width", "integer"),
        ({"model": {"ffn": 3}}, "model.ffn", "string"),
        ({"train": {"betas": 0.9}}, "train.betas", "list"),
        ({"train": {"betas": [0.9, "x"]}}, "train.betas[1]", "number"),
        ({"train": {"aux_weights": {"balance": "high"}}}, "train.aux_weights.balance", "number"),
        ({"model": {"moe": 4}}, "model.moe", "mapping"),
        ({"model": {"depth": None}}, "model.depth", "null"),
    ],
)
def test_wrong_types_name_the_key(data: dict, key: str, expected: str) -> None:
    _raises(data, key, expected)


def test_accepted_type_coercions() -> None:
    cfg = from_dict({"train": {"lr": 1, "steps": 20.0, "grad_clip": None}, "model": {"moe": {}}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 20 and isinstance(cfg.train.steps, int)
    assert cfg.train.grad_clip is None
    assert cfg.model.moe == MoEConfig()  # an empty mapping is a default MoE, not dense


def test_image_size_not_divisible_by_patch() -> None:
    msg = _raises({"model": {"image_size": 28, "patch_size": 5}}, "model.image_size=28", "model.patch_size=5")
    for divisor in ("1", "2", "4", "7", "14"):
        assert divisor in msg.split("e.g.")[1]
    assert "3" not in msg.split("e.g.")[1]


def test_semantic_model_checks() -> None:
    _raises({"model": {"width": 30, "heads": 4}}, "model.width=30", "model.heads=4")
    _raises({"model": {"width": 24, "heads": 4, "pos_embed": "rope"}}, "rope", "divisible by 4")
    _raises({"model": {"class_dropout": 1.0}}, "model.class_dropout")
    _raises({"train": {"batch_size": 0}}, "train.batch_size")
    _raises({"train": {"betas": [0.9]}}, "train.betas")
    _raises({"sample": {"cfg_interval": [0.1]}}, "sample.cfg_interval")
    # sizes that would divide by zero, and a sincos table that cannot split the width in four
    for key in ("patch_size", "heads", "width", "image_size", "depth", "in_channels"):
        _raises({"model": {key: 0}}, f"model.{key}=0", "at least 1")
    _raises({"model": {"width": 34, "heads": 2}}, "sincos", "model.width", "34")
    assert from_dict({"model": {"width": 36, "heads": 3}}).model.width == 36


def test_top_k_larger_than_num_experts() -> None:
    _raises({"model": {"moe": {"num_experts": 4, "router": {"top_k": 5}}}}, "top_k=5", "num_experts=4")
    _raises({"model": {"moe": {"num_experts": 4, "router": {"top_k": 0}}}}, "top_k=0")
    _raises({"model": {"moe": {"num_experts": 0, "router": {"top_k": 1}}}}, "num_experts")
    ok = from_dict({"model": {"moe": {"num_experts": 4, "router": {"top_k": 4}}}})
    assert ok.model.moe.router.top_k == 4


@pytest.mark.parametrize(
    "data,key,valid",
    [
        ({"model": {"moe": {"router": {"name": "switch"}}}}, "model.moe.router.name", ["topk"]),
        ({"model": {"moe": {"router": {"gate": "conv"}}}}, "model.moe.router.gate", ["linear", "mlp", "cross_attn"]),
        ({"model": {"moe": {"router": {"score": "relu"}}}}, "model.moe.router.score",
         ["softmax", "sigmoid", "identity"]),
        ({"model": {"moe": {"backend": "triton"}}}, "model.moe.backend", ["auto", "loop", "grouped", "fused"]),
        ({"model": {"moe": {"expert_layout": "nk"}}}, "model.moe.expert_layout", ["row", "col"]),
        ({"model": {"moe": {"placement": "even"}}}, "model.moe.placement", ["all", "interleaved"]),
        ({"model": {"pos_embed": "learned"}}, "model.pos_embed", ["sincos", "rope"]),
        ({"model": {"ffn": "geglu"}}, "model.ffn", ["mlp", "swiglu"]),
        ({"sample": {"sampler": "dpm"}}, "sample.sampler", ["euler", "heun"]),
        ({"objective": {"name": "edm"}}, "objective.name", ["rectified_flow", "ddpm"]),
        ({"data": {"name": "cifar"}}, "data.name", ["mnist", "fashion_mnist", "folder", "npz", "synthetic"]),
        ({"train": {"precision": "fp16"}}, "train.precision", ["auto", "fp32", "bf16"]),
    ],
)
def test_unknown_names_list_the_valid_ones(data: dict, key: str, valid: list[str]) -> None:
    _raises(data, key, *valid)


def test_sampler_must_fit_objective() -> None:
    _raises({"objective": {"name": "ddpm"}, "sample": {"sampler": "euler"}},
            "sample.sampler='euler'", "objective.name='ddpm'", "ddpm", "ddim")
    _raises({"sample": {"sampler": "ddim"}}, "sample.sampler='ddim'", "euler", "heun")
    assert from_dict({"objective": {"name": "ddpm"}, "sample": {"sampler": "ddim"}}).sample.sampler == "ddim"


def test_apply_overrides_parses_values() -> None:
    data = {"train": {"steps": 5}, "model": {"moe": None}}
    out = apply_overrides(data, [
        "train.lr=3e-4",
        "train.steps=7",
        "train.tensorboard=true",
        "train.betas=[0.8, 0.95]",
        "model.moe.num_experts=4",
        "model.moe.router.top_k=1",
        "train.grad_clip=",
        "train.out_dir=runs/a=b",
    ])
    assert data == {"train": {"steps": 5}, "model": {"moe": None}}  # the input is not modified
    assert out["train"]["lr"] == 0.0003 and isinstance(out["train"]["lr"], float)
    assert out["train"]["steps"] == 7 and isinstance(out["train"]["steps"], int)
    assert out["train"]["tensorboard"] is True
    assert out["train"]["betas"] == [0.8, 0.95]
    assert out["model"]["moe"] == {"num_experts": 4, "router": {"top_k": 1}}
    assert out["train"]["grad_clip"] is None
    assert out["train"]["out_dir"] == "runs/a=b"  # split on the first '=' only
    cfg = from_dict(out)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.moe.num_experts == 4 and cfg.model.moe.router.top_k == 1
    assert cfg.model.moe.placement == "all"  # created levels take their defaults


def test_override_on_existing_nested_value() -> None:
    data = {"model": {"moe": {"num_experts": 8, "router": {"top_k": 2, "score": "sigmoid"}}}}
    cfg = from_dict(apply_overrides(data, ["model.moe.router.top_k=1"]))
    assert cfg.model.moe.router == RouterConfig(top_k=1, score="sigmoid")
    assert cfg.model.moe.num_experts == 8


def test_override_errors() -> None:
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="train.lrate"):
        load_config(None, ["train.lrate=0.1"])
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=many"])


def test_yaml_round_trip(tmp_path) -> None:
    cfg = from_dict({
        "seed": 3,
        "model": {"preset": "micro", "pos_embed": "rope", "qk_norm": True, "ffn": "swiglu",
                  "moe": {"num_experts": 6, "num_shared": 1, "shared_ratio": 0.5, "placement": "interleaved",
                          "router": {"top_k": 3, "score": "sigmoid", "selection_bias": True, "scale": 2.5}}},
        "objective": {"name": "ddpm", "beta_schedule": "cosine"},
        "sample": {"sampler": "ddim", "cfg_scale": 1.5, "cfg_interval": [0.1, 0.9]},
        "train": {"lr": 3e-4, "betas": [0.9, 0.95], "grad_clip": None, "aux_weights": {"balance": 0.02, "z": 1e-3}},
        "data": {"name": "synthetic"},
    })
    path = tmp_path / "run.yaml"
    save_yaml(cfg, path)
    loaded = load_config(path)
    assert loaded == cfg
    assert to_dict(loaded) == to_dict(cfg)
    assert isinstance(loaded.model.moe, MoEConfig) and isinstance(loaded.model.moe.router, RouterConfig)
    # overrides on top of a file
    again = load_config(path, ["model.moe.router.top_k=2", "train.lr=1e-3"])
    assert again.model.moe.router.top_k == 2 and again.train.lr == pytest.approx(1e-3)
    assert again.model.moe.num_experts == 6


def test_load_config_errors(tmp_path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  widht: 64\n")
    with pytest.raises(ConfigError, match="model.widht"):
        load_config(typo)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()


def test_preset_plus_explicit_keys() -> None:
    cfg = from_dict({"model": {"preset": "DiT-B/4", "image_size": 32, "heads": 8, "depth": 2}})
    assert (cfg.model.width, cfg.model.heads, cfg.model.depth, cfg.model.patch_size) == (768, 8, 2, 4)
    plain = from_dict({"model": {"preset": "DiT-XL/2", "image_size": 32}})
    assert (plain.model.depth, plain.model.width, plain.model.heads, plain.model.patch_size) == (28, 1152, 16, 2)
    assert ModelConfig().preset is None
    _raises({"model": {"preset": "DiT-XXL/2"}}, "DiT-XXL/2", "DiT-S/2", "tiny")
    # the preset's patch size is checked against the image size like an explicit one
    _raises({"model": {"preset": "DiT-S/8", "image_size": 28}}, "model.patch_size=8")


def test_base_config_is_merged_under_the_variant(tmp_path) -> None:
    (tmp_path / "base.yaml").write_text(
        "model:\n  moe:\n    num_experts: 8\n    router: {name: topk, top_k: 2}\ntrain: {steps: 7, lr: 0.1}\n")
    (tmp_path / "variant.yaml").write_text(
        "base: base.yaml\nmodel:\n  moe:\n    router: {name: race}\ntrain: {lr: 0.2}\n")
    cfg = load_config(tmp_path / "variant.yaml", ["train.steps=9"])
    assert cfg.model.moe.num_experts == 8 and cfg.model.moe.router.top_k == 2  # kept from the base
    assert cfg.model.moe.router.name == "race" and cfg.train.lr == 0.2  # the variant wins
    assert cfg.train.steps == 9  # overrides win over both
    (tmp_path / "dense.yaml").write_text("base: base.yaml\nmodel:\n  moe: null\n")
    assert load_config(tmp_path / "dense.yaml").model.moe is None  # null replaces a whole section


def test_base_config_cycle_and_missing_base(tmp_path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml does not exist"):
        load_config(tmp_path / "c.yaml")


def test_router_defaults_fill_null_fields() -> None:
    race = from_dict({"model": {"moe": {"router": {"name": "race"}}}}).model.moe.router
    assert (race.gate, race.score, race.threshold_decay) == ("mlp", "identity", 0.99)
    mine = from_dict({"model": {"moe": {"router": {"name": "race", "score": "sigmoid"}}}}).model.moe.router
    assert mine.score == "sigmoid"  # an explicit value is never replaced
    topk = from_dict({"model": {"moe": {}}}).model.moe.router
    assert (topk.gate, topk.score) == ("linear", "softmax")


def test_aux_weights_keep_defaults_for_names_not_given() -> None:
    weights = from_dict({"train": {"aux_weights": {"balance": 0.5}}}).train.aux_weights
    assert weights["balance"] == 0.5 and weights["capacity"] == 1.0 and weights["contrastive"] == 1.0

"""Dense → MoE conversion: exactness per router, the Three Laws, fine-grained splits, the key map's
errors, the facebookresearch/DiT import (pos-embed layout, timestep scale, learned sigma) checked
against a reference forward written here from their models.py, and the CLI end to end."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import yaml

from moedit.cli.main import main as cli_main
from moedit.config import ConfigError, apply_overrides, from_dict, load_yaml
from moedit.models import build_model
from moedit.models.embed import sincos_2d, timestep_features
from moedit.convert.dense import build_dense, convert_dense, verify_conversion
from moedit.convert.keys import ConversionError
from moedit.convert.sources import dit_model_config, load_source
from moedit.train import checkpoint as ckpt
from moedit.train.trainer import Trainer

from dit_reference import dit_pos_embed, dit_reference_forward, dit_state_dict, dit_timestep_embedding  # tests/

TOL = 1e-5
MICRO = dict(preset="micro", image_size=8, patch_size=2, num_classes=5)  # width 32, depth 2, heads 2, hidden 128


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def dense_model(seed: int = 0, **model):
    """A dense micro DiT whose every parameter is random (adaLN-Zero and the zero output layer too),
    so that every mapped tensor, biases included, changes the output."""
    cfg = from_dict({"model": {**MICRO, **model}}).model
    torch.manual_seed(seed)
    dense = build_model(cfg)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if "adaLN" in name or "final_layer" in name or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return dense.eval()


def moe(num_experts=4, expert_ratio=4.0, num_shared=0, placement="all", **router):
    return dict(num_experts=num_experts, expert_ratio=expert_ratio, num_shared=num_shared, placement=placement,
                router=router)


def convert_and_verify(dense, moe_settings, **kw):
    kw.setdefault("shared_init", "zero")
    model, _ = convert_dense(dense, dense.cfg, moe_settings, **kw)
    return model, verify_conversion(dense, model)


# ----------------------------------------------------------------------------- exactness per router


@pytest.mark.parametrize("settings", [
    moe(name="topk", top_k=1, normalize=True, normalize_top1=True),
    moe(name="topk", top_k=2, normalize=True),
    moe(name="topk", top_k=2, normalize=True, score="sigmoid", num_shared=1),
    moe(name="topk", top_k=4, score="softmax"),  # all experts kept: the softmax sums to 1
    moe(name="promoe", top_k=4, score="softmax", num_shared=1),
    moe(name="expert_choice", capacity=4.0),
    moe(name="diffmoe", top_k=1),  # θ_e = 0 before training: every expert, softmax weights
    moe(name="topk", top_k=2, normalize=True, selection_bias=True, placement="interleaved"),
], ids=["top1", "top2-softmax-norm", "top2-sigmoid-norm-shared", "softmax-all", "promoe-softmax-all",
        "expert-choice-full", "diffmoe-untrained", "interleaved-bias"])
def test_exact_configurations_reproduce_the_dense_model(settings):
    _, report = convert_and_verify(dense_model(), settings)
    assert report["exact_expected"], report["reason"]
    assert report["max_abs"] <= TOL and report["output_max_abs"] > 0.1
    assert report["null_label_samples"] == 4


def test_conversion_into_column_major_experts_is_exact():
    settings = {**moe(name="topk", top_k=2, normalize=True, num_shared=1), "expert_layout": "col"}
    model, report = convert_and_verify(dense_model(), settings)
    assert report["exact_expected"] and report["max_abs"] <= TOL, report
    w1 = model.blocks[0].moe.experts.w1_EDH
    assert w1.stride()[1:] == (1, w1.shape[1])  # each expert's matrix column-major


def test_swiglu_conversion_is_exact():
    _, report = convert_and_verify(dense_model(ffn="swiglu", mlp_ratio=8 / 3), moe(top_k=2, normalize=True,
                                                                                    expert_ratio=8 / 3))
    assert report["exact_expected"] and report["max_abs"] <= TOL


@pytest.mark.parametrize("settings, words", [
    (moe(name="topk", top_k=2), "normalize"),
    (moe(name="race", top_k=2), "threshold"),
    (moe(name="diffmoe", top_k=1, score="sigmoid"), "capacity predictor"),
    (moe(name="expert_choice", top_k=2), "0..E experts"),
    (moe(name="topk", top_k=2, normalize=True, scale=2.5), "scale"),
])
def test_inexact_routers_are_reported_with_a_reason(settings, words):
    _, report = convert_and_verify(dense_model(), settings)
    assert not report["exact_expected"] and words in report["reason"]
    assert report["max_abs"] > 1e-3  # and the measured error is still reported


def test_promoe_null_label_tokens_go_to_an_exact_unconditional_expert():
    dense = dense_model()
    model, report = convert_and_verify(dense, moe(name="promoe", top_k=1, num_shared=1))  # the paper's routing
    assert not report["exact_expected"] and "null-label tokens are exact" in report["reason"]
    assert report["max_abs_null_label"] <= TOL < report["max_abs_labelled"]
    experts = model.blocks[0].moe.experts
    assert experts.num_experts == 5  # 4 routed + the unconditional one, also a copy
    assert torch.equal(experts.w1_EDH[4], dense.blocks[0].mlp.fc1.weight.T)


def test_fine_grained_split_is_exact_with_uniform_gates_only():
    dense = dense_model()
    split = moe(num_experts=4, expert_ratio=1.0, top_k=4, normalize=True)  # 4 slices of hidden 32
    model, report = convert_and_verify(dense, split, gate_init="zero")
    assert report["exact_expected"] and report["max_abs"] <= TOL, report
    experts, mlp = model.blocks[1].moe.experts, dense.blocks[1].mlp
    assert torch.equal(experts.w1_EDH[2], mlp.fc1.weight.T[:, 64:96])
    assert torch.equal(experts.b1_EH[2], mlp.fc1.bias[64:96])
    assert torch.allclose(experts.w2_EHD[2], 4 * mlp.fc2.weight.T[64:96])
    assert torch.equal(experts.b2_ED[3], mlp.fc2.bias)
    _, random_gate = convert_and_verify(dense, split)
    assert not random_gate["exact_expected"] and "1/4" in random_gate["reason"]
    _, replicated = convert_and_verify(dense, moe(num_experts=8, expert_ratio=1.0, top_k=4, normalize=True),
                                       gate_init="zero")
    assert not replicated["exact_expected"] and "num_experts = top_k = 4" in replicated["reason"]


# ----------------------------------------------------------------------------- the Three Laws


def test_experts_are_copies_and_only_routers_are_random():
    dense = dense_model()
    settings = moe(name="topk", top_k=2, normalize=True, num_shared=1)
    a, _ = convert_dense(dense, dense.cfg, settings, seed=0)
    b, _ = convert_dense(dense, dense.cfg, settings, seed=1)
    for model in (a, b):
        for i, block in enumerate(model.blocks):
            mlp = dense.blocks[i].mlp
            for e in range(4):
                assert torch.equal(block.moe.experts.w1_EDH[e], mlp.fc1.weight.T)
                assert torch.equal(block.moe.experts.w2_EHD[e], mlp.fc2.weight.T)
            assert torch.equal(block.attn.qkv.weight, dense.blocks[i].attn.qkv.weight)
    gate_a, gate_b = a.blocks[0].moe.router.gate.net.head.weight, b.blocks[0].moe.router.gate.net.head.weight
    assert not torch.equal(gate_a, gate_b)
    pa, _ = convert_dense(dense, dense.cfg, moe(name="promoe", top_k=1), seed=0)
    pb, _ = convert_dense(dense, dense.cfg, moe(name="promoe", top_k=1), seed=1)
    assert not torch.equal(pa.blocks[0].moe.router.prototypes_ED, pb.blocks[0].moe.router.prototypes_ED)
    again, _ = convert_dense(dense, dense.cfg, settings, seed=0)
    assert torch.equal(again.blocks[0].moe.router.gate.net.head.weight, gate_a)  # the seed decides


def test_shared_experts_zero_or_tiny_noise():
    dense = dense_model()
    settings = moe(top_k=2, normalize=True, num_shared=1)
    zero, _ = convert_dense(dense, dense.cfg, settings, shared_init="zero")
    assert all(bool((p == 0).all()) for p in zero.blocks[0].moe.shared.parameters())
    noisy, _ = convert_dense(dense, dense.cfg, settings, shared_init="noise", noise_std=1e-4)
    shared = noisy.blocks[0].moe.shared
    for w in (shared.w1_EDH, shared.w2_EHD):
        assert 0.8e-4 < w.std().item() < 1.2e-4 and abs(w.mean().item()) < 1e-5
    assert bool((shared.b1_EH == 0).all()) and bool((shared.b2_ED == 0).all())
    report = verify_conversion(dense, noisy)
    assert not report["exact_expected"] and "noise" in report["reason"]


# ----------------------------------------------------------------------------- key map errors


def test_unmapped_missing_and_misshapen_keys_are_listed():
    dense = dense_model()
    state = dict(dense.state_dict())
    state["blocks.0.extra.weight"] = torch.zeros(3)
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 32)
    del state["blocks.0.attn.proj.bias"]
    with pytest.raises(ConversionError) as err:
        convert_dense(state, dense.cfg, moe(top_k=2, normalize=True))
    text = str(err.value)
    assert "blocks.0.extra.weight" in text and "no row of the key map" in text
    assert "blocks.1.mlp.fc1.weight (100, 32)" in text and "blocks.1.moe.experts.w1_EDH" in text
    assert "blocks.0.attn.proj.bias" in text and "does not provide" in text


def test_config_transform_errors():
    dense = dense_model()
    with pytest.raises(ConversionError, match="must divide"):
        convert_dense(dense, dense.cfg, moe(expert_ratio=3.0))
    with pytest.raises(ConversionError, match="multiple of 4"):
        convert_dense(dense, dense.cfg, moe(num_experts=6, expert_ratio=1.0))
    other = from_dict({"model": {**MICRO, "ffn": "swiglu", "moe": moe()}}).model
    with pytest.raises(ConversionError, match="model.ffn"):
        convert_dense(dense, dense.cfg, other)
    moe_source = from_dict({"model": {**MICRO, "moe": moe()}}).model
    with pytest.raises(ConversionError, match="already a MoE"):
        convert_dense(dense, moe_source, moe())
    with pytest.raises(ConversionError, match="prototypes"):
        convert_dense(dense, dense.cfg, moe(name="promoe"), gate_init="zero")


# ----------------------------------------------------------------------------- facebookresearch/DiT


def test_dit_pos_embed_is_columns_first_and_sincos_is_unchanged():
    table = torch.from_numpy(dit_pos_embed(32, 4)).float()
    assert torch.allclose(sincos_2d(32, 4, columns_first=True), table, atol=1e-6)
    assert torch.allclose(sincos_2d(32, 4), torch.cat([table[:, 16:], table[:, :16]], 1), atol=1e-6)
    assert not torch.allclose(sincos_2d(32, 4), table, atol=1e-2)


def test_timestep_features_are_dits_at_1000t():
    n = torch.tensor([0, 125, 250, 500, 875])  # 1000 · (n/1000) is exact in float32 for these
    assert torch.equal(timestep_features(n / 1000, 256), dit_timestep_embedding(n))
    n = torch.arange(0, 1000, 37)
    assert torch.allclose(timestep_features(n / 1000, 256), dit_timestep_embedding(n), atol=1e-3)


def test_dit_import_matches_their_forward_and_converts_exactly():
    sd = dit_state_dict()
    dense_cfg = dit_model_config(sd, heads=2)
    assert (dense_cfg.width, dense_cfg.depth, dense_cfg.image_size, dense_cfg.in_channels) == (32, 2, 8, 4)
    assert (dense_cfg.out_channels, dense_cfg.num_classes, dense_cfg.pos_embed) == (8, 5, "sincos_wh")
    dense = build_dense(sd, dense_cfg)
    gen = torch.Generator().manual_seed(0)
    x, n = torch.randn(4, 4, 8, 8, generator=gen), torch.tensor([0, 125, 500, 875])
    y = torch.tensor([0, 5, 3, 5])  # 5 = the null class
    reference = dit_reference_forward(sd, x, n, y, heads=2, p=2)
    with torch.no_grad():
        assert (dense(x, n / 1000, y) - reference).abs().max() <= TOL
    settings = moe(top_k=2, normalize=True, num_shared=1)
    keep, _ = convert_dense(sd, dense_cfg, settings, shared_init="zero")
    assert verify_conversion(dense, keep)["max_abs"] <= TOL
    drop_cfg = from_dict({"model": {**vars(dense_cfg), "moe": settings, "out_channels": None}}).model
    drop, _ = convert_dense(sd, dense_cfg, drop_cfg, shared_init="zero")
    with torch.no_grad():
        out = drop(x, n / 1000, y)
    assert out.shape == (4, 4, 8, 8) and (out - reference[:, :4]).abs().max() <= TOL  # ε channels, not σ


def test_dit_import_errors():
    sd = dit_state_dict()
    with pytest.raises(ConfigError, match="--heads"):
        dit_model_config(sd)  # width 32 is no DiT preset
    bad = dict(sd, pos_embed=sd["pos_embed"] + 0.01)
    with pytest.raises(ConversionError, match="not a fixed 2-D sin-cos table"):
        dit_model_config(bad, heads=2)
    with pytest.raises(ConversionError, match="differs from the model's fixed sin-cos table"):
        build_dense(bad, dit_model_config(sd, heads=2))


# ----------------------------------------------------------------------------- CLI


def train_dense_run(run_dir):
    data = {"seed": 1, "model": {**MICRO, "num_classes": 10, "class_dropout": 0.2},
            "data": {"name": "synthetic", "image_size": 8},
            "train": {"out_dir": str(run_dir), "steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1},
            "sample": {"steps": 2, "per_class": 1}}
    Trainer(from_dict(data), progress=False).train()


def test_cli_converts_a_dense_run_that_samples_and_trains_on(tmp_path, capsys):
    dense_run, out = tmp_path / "dense", tmp_path / "moe"
    train_dense_run(dense_run)
    args = ["convert", str(dense_run), "--out", str(out), "--verify", "--set", "model.moe.num_experts=4",
            "model.moe.router.normalize=true", "model.moe.num_shared=1"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "exact: yes" in printed and "within tolerance" in printed
    cfg = from_dict(load_yaml(out / "config.yaml"))
    assert cfg.model.moe.num_experts == 4 and cfg.model.moe.expert_ratio == 4.0 and cfg.train.out_dir == str(out)
    info = json.loads((out / "conversion.json").read_text())
    assert info["exact_expected"] and info["verification"]["max_abs"] <= TOL
    state = ckpt.read_state(out / "checkpoints" / "step_00000000")
    assert state["weights_only"] and not (out / "checkpoints" / "step_00000000" / "trainer.safetensors").exists()
    assert cli_main(["sample", "--run", str(out), "--set", "sample.steps=2", "sample.per_class=1"]) == 0
    resumed = Trainer(from_dict(apply_overrides(load_yaml(out / "config.yaml"), ["train.steps=2"])),
                      resume=True, progress=False)
    assert resumed.start_step == 0
    resumed.train()
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_00000000", "step_00000002"]
    before = (out / "config.yaml").read_text()
    assert cli_main(args) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err and (out / "config.yaml").read_text() == before


def test_cli_imports_a_dit_training_checkpoint(tmp_path, capsys):
    sd = dit_state_dict(seed=3)
    path = tmp_path / "dit.pt"
    torch.save({"model": {k: v + 1 for k, v in sd.items()}, "ema": sd, "opt": {}, "args": argparse.Namespace(a=1)},
               path)
    moe_yaml = tmp_path / "moe.yaml"
    moe_yaml.write_text(yaml.safe_dump({"model": {"moe": moe(top_k=1, normalize=True, normalize_top1=True)}}))
    out = tmp_path / "imported"
    assert cli_main(["convert", str(path), "--out", str(out), "--moe", str(moe_yaml), "--heads", "2",
                     "--learn-sigma", "drop", "--verify"]) == 0
    assert "exact: yes" in capsys.readouterr().out
    cfg = from_dict(load_yaml(out / "config.yaml"))
    assert cfg.model.pos_embed == "sincos_wh" and cfg.model.out_channels is None and cfg.objective.name == "ddpm"
    source = load_source(path, heads=2)
    assert torch.equal(source.state["blocks.0.mlp.fc1.weight"], sd["blocks.0.mlp.fc1.weight"])  # EMA by default
    assert cli_main(["convert", str(path), "--out", str(tmp_path / "x"), "--set", "model.moe.num_experts=4"]) == 2
    assert "--heads" in capsys.readouterr().err


def test_extra_output_channels_are_ignored_by_objectives_and_samplers():
    from moedit.config import ObjectiveConfig, SampleConfig
    from moedit.generate import generate
    from moedit.objectives import build_objective

    model = dense_model(out_channels=2)  # in_channels 1, learned-sigma style 2·C outputs
    x0, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    assert model(x0, torch.rand(2), y).shape == (2, 2, 8, 8)
    for name in ("rectified_flow", "ddpm"):
        objective = build_objective(ObjectiveConfig(name=name))
        loss, _ = objective.loss(model, x0, y)
        assert torch.isfinite(loss)
    images = generate(model, build_objective(ObjectiveConfig()), SampleConfig(steps=2, cfg_scale=2.0), y,
                      torch.device("cpu"))
    assert images.shape == (2, 1, 8, 8)

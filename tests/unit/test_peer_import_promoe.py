"""`moedit import` of a ProMoE token-choice checkpoint: a state dict with ali-vilab/ProMoE's names and shapes
(models_ProMoE_TC.py) and random weights, imported through the CLI, computes what ProMoE-TC computes —
checked against a reference written from the paper's equations: DiT blocks whose MoE FFN sends every
token of a null-label sample (label 1000) to the unconditional expert E with weight 1 and every other
token to its top-k prototypes by w_e = G(cos(x, C_e)), not renormalised, plus an always-on shared
expert; every expert a GELU(tanh) MLP with biases. Time: rectified flow, the embedder fed 1000·σ.
Keys that do not fit, and what moedit cannot compute exactly, are refused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from moedit.cli.main import main as cli_main
from moedit.convert.keys import ConversionError
from moedit.convert.peers import detect_layout, import_run
from moedit.runs import open_run

from dit_reference import dit_reference_forward, dit_state_dict  # tests/
from test_peer_import import dit_moe_state_dict  # tests/unit/

pytestmark = pytest.mark.usefixtures("one_thread")
D, DEPTH, C, P, GRID, E, H, H_SHARED, HEADS = 32, 4, 4, 2, 4, 4, 64, 48, 2
CLASSES = NULL = 1000  # ProMoE hard-codes label 1000 as the null (unconditional) label


def promoe_state_dict(seed: int = 0, placement: str = "interleaved", shared: bool = True,
                      dense_names: tuple[str, str] = ("fc1", "fc2"), classes: int = CLASSES) -> dict[str, torch.Tensor]:
    """ProMoE-TC's layout: DiT's keys; each MoE block's `mlp` holds cluster_centers, E + 1 experts (the last
    one unconditional) and a shared expert, all up_proj/down_proj with biases; dense blocks keep their Mlp
    (fc1/fc2), or up_proj/down_proj (their use_swiglu, still a GELU MLP)."""
    sd = dit_state_dict(D, DEPTH, C, P, GRID, classes, learn_sigma=True, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.2

    moe_blocks = range(1, DEPTH, 2) if placement == "interleaved" else range(DEPTH)
    for i in range(DEPTH):
        w1, b1, w2, b2 = (sd.pop(f"blocks.{i}.mlp.{n}.{kind}") for n in ("fc1", "fc2") for kind in ("weight", "bias"))
        if i not in moe_blocks:
            sd.update({f"blocks.{i}.mlp.{dense_names[0]}.weight": w1, f"blocks.{i}.mlp.{dense_names[0]}.bias": b1,
                       f"blocks.{i}.mlp.{dense_names[1]}.weight": w2, f"blocks.{i}.mlp.{dense_names[1]}.bias": b2})
            continue
        sd[f"blocks.{i}.mlp.cluster_centers"] = rand(E, D)
        experts = [f"experts.{e}" for e in range(E + 1)] + (["shared_expert"] if shared else [])
        for name in experts:
            width = H_SHARED if name == "shared_expert" else H
            sd[f"blocks.{i}.mlp.{name}.up_proj.weight"], sd[f"blocks.{i}.mlp.{name}.up_proj.bias"] = rand(width, D), rand(width)
            sd[f"blocks.{i}.mlp.{name}.down_proj.weight"], sd[f"blocks.{i}.mlp.{name}.down_proj.bias"] = rand(D, width), rand(D)
    return sd


def promoe_ffn(sd, y, top_k: int, score: str):
    """Block i's FFN by the equations, token by token. MoE blocks: for a sample with y = 1000,
    out = f_E(x); otherwise s_e = G(cos(x, C_e)) over the E prototypes, out = Σ_{e ∈ top-k(s)} s_e·f_e(x);
    then + f_shared(x). f(x) = W_down·GELU_tanh(W_up·x + b_up) + b_down. Dense blocks: the same f."""
    G = {"identity": lambda s: s, "softmax": lambda s: torch.softmax(s, dim=-1), "sigmoid": torch.sigmoid}[score]

    def gelu_mlp(x, first, second):
        hidden = F.gelu(F.linear(x, sd[f"{first}.weight"], sd[f"{first}.bias"]), approximate="tanh")
        return F.linear(hidden, sd[f"{second}.weight"], sd[f"{second}.bias"])

    def expert(x, prefix):
        return gelu_mlp(x, f"{prefix}.up_proj", f"{prefix}.down_proj")

    def ffn(i, h_BND):
        p = f"blocks.{i}.mlp"
        if f"{p}.cluster_centers" not in sd:
            names = ("fc1", "fc2") if f"{p}.fc1.weight" in sd else ("up_proj", "down_proj")
            return gelu_mlp(h_BND, f"{p}.{names[0]}", f"{p}.{names[1]}")
        centers = sd[f"{p}.cluster_centers"]
        out = torch.zeros_like(h_BND)
        for b in range(h_BND.shape[0]):
            for n in range(h_BND.shape[1]):
                x = h_BND[b, n]
                if int(y[b]) == NULL:
                    out[b, n] = expert(x, f"{p}.experts.{E}")  # the unconditional expert, weight 1
                else:
                    s = G(F.cosine_similarity(x[None], centers, dim=-1))
                    weights, chosen = s.topk(top_k)  # no renormalisation
                    for w, e in zip(weights, chosen):
                        out[b, n] += w * expert(x, f"{p}.experts.{int(e)}")
                if f"{p}.shared_expert.up_proj.weight" in sd:
                    out[b, n] += expert(x, f"{p}.shared_expert")
        return out

    return ffn


def _forward_both(run_dir, sd, top_k, score):
    model = open_run(run_dir).load_model("ema").eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, C, GRID * P, GRID * P, generator=gen)
    y = torch.tensor([0, 3, NULL, 999])  # conditional and null-label samples mixed
    sigma = torch.tensor([0.0, 0.37, 1.0, 0.65])  # their σ; their embedder reads 1000·σ
    with torch.no_grad():
        want = dit_reference_forward(sd, x, 1000 * sigma, y, HEADS, P, ffn=promoe_ffn(sd, y, top_k, score))
        got = model(x, sigma, y)  # moedit's t = σ, t_scale 1000
    return got, want


@pytest.mark.parametrize("score", ["identity", "softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_an_imported_promoe_tc_computes_promoes_output(tmp_path, capsys, score, top_k):
    sd = promoe_state_dict()
    path = tmp_path / "promoe.pt"
    torch.save(sd, path)
    out = tmp_path / f"run_{score}_{top_k}"
    assert cli_main(["import", str(path), "--out", str(out), "--heads", str(HEADS), "--top-k", str(top_k),
                     "--score", score]) == 0, capsys.readouterr().err
    run = open_run(out)
    m = run.cfg.model
    assert (m.pos_embed, m.ffn, m.t_scale, m.out_channels, m.num_classes) == ("sincos_wh", "mlp", 1000.0, 2 * C, CLASSES)
    assert (m.moe.num_experts, m.moe.placement, m.moe.num_shared, m.moe.expert_ratio, m.moe.shared_ratio) == (
        E, "interleaved", 1, H / D, H_SHARED / D)
    r = m.moe.router
    assert (r.name, r.score, r.top_k, r.normalize) == ("promoe", score, top_k, False)
    assert (run.cfg.objective.name, run.cfg.sample.sampler, run.cfg.sample.steps) == ("rectified_flow", "euler", 250)
    assert json.loads((out / "conversion.json").read_text())["layout"] == "promoe_tc"
    got, want = _forward_both(out, sd, top_k, score)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("placement, shared, dense", [("all", False, ("fc1", "fc2")),
                                                      ("interleaved", True, ("up_proj", "down_proj"))])
def test_every_block_moe_no_shared_expert_and_moemlp_dense_blocks(tmp_path, placement, shared, dense):
    sd = promoe_state_dict(placement=placement, shared=shared, dense_names=dense)
    path = tmp_path / "promoe.pt"
    torch.save(sd, path)
    _, cfg = import_run(path, tmp_path / "run", heads=HEADS, top_k=2, log=lambda m: None)
    assert (cfg.model.moe.placement, cfg.model.moe.num_shared, cfg.model.moe.router.score) == (placement, int(shared), "identity")
    got, want = _forward_both(tmp_path / "run", sd, 2, "identity")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_their_training_checkpoint_ema_or_raw_and_sigma_dropped(tmp_path):
    sd = promoe_state_dict()
    raw = {k: v if k == "pos_embed" else 0.5 * v for k, v in sd.items()}
    path = tmp_path / "ckpt_step_1000.pth"
    torch.save({"step": 1000, "model_state_dict": raw, "ema_model_state_dict": sd,
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}, path)
    _, cfg = import_run(path, tmp_path / "ema", heads=HEADS, log=lambda m: None)
    assert (cfg.model.moe.router.top_k, cfg.model.moe.router.score) == (1, "identity")  # their configs' defaults
    got, want = _forward_both(tmp_path / "ema", sd, 1, "identity")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    _, cfg = import_run(path, tmp_path / "raw", heads=HEADS, raw=True, learn_sigma="drop", log=lambda m: None)
    assert cfg.model.out_channels is None
    got, want = _forward_both(tmp_path / "raw", raw, 1, "identity")
    torch.testing.assert_close(got, want[:, :C], rtol=1e-4, atol=1e-4)


def test_keys_that_do_not_fit_are_refused_with_the_list(tmp_path):
    sd = promoe_state_dict()
    sd["blocks.1.mlp.experts.0.extra.weight"] = torch.zeros(3)  # unmapped
    del sd["blocks.3.mlp.experts.2.down_proj.bias"]  # one expert's bias missing
    sd["blocks.3.mlp.shared_expert.up_proj.weight"] = torch.zeros(H_SHARED + 1, D)  # misshapen
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ConversionError) as info:
        import_run(path, tmp_path / "out", heads=HEADS, log=lambda m: None)
    text = str(info.value)
    assert "ProMoE-TC key map" in text and "blocks.1.mlp.experts.0.extra.weight" in text
    assert "blocks.3.moe.experts.b2_ED: experts [0, 1, 3, 4]" in text
    assert "shape mismatches" in text and "blocks.3.moe.shared.w1_EDH: (1, 32, 49)" in text and not (tmp_path / "out").exists()


def _refused(tmp_path, sd, *options) -> str:
    path = tmp_path / "x.pt"
    torch.save(sd, path)
    with pytest.raises((ConversionError, ValueError)) as info:
        import_run(path, tmp_path / "out", heads=HEADS, log=lambda m: None, **dict(options))
    assert not (tmp_path / "out").exists()
    return str(info.value)


def test_what_moedit_cannot_compute_exactly_is_refused(tmp_path):
    sd = promoe_state_dict()
    for i in range(DEPTH):  # their qk_norm: an affine LayerNorm per head
        for n in ("q_norm", "k_norm"):
            sd[f"blocks.{i}.attn.{n}.weight"], sd[f"blocks.{i}.attn.{n}.bias"] = torch.ones(D // HEADS), torch.zeros(D // HEADS)
    assert "q/k norm" in _refused(tmp_path, sd)
    sd = {k: v for k, v in promoe_state_dict().items() if f".experts.{E}." not in k}  # no unconditional expert
    assert "unconditional expert" in _refused(tmp_path, sd)
    assert "only 1000-class checkpoints" in _refused(tmp_path, promoe_state_dict(classes=10))
    assert "trained with rectified_flow" in _refused(tmp_path, promoe_state_dict(), ("objective", "ddpm"))
    assert "--top-k 5 must be between 1 and the checkpoint's 4 experts" in _refused(tmp_path, promoe_state_dict(), ("top_k", 5))
    sd = promoe_state_dict()  # a head_dim other than width/heads
    for i in range(DEPTH):
        sd[f"blocks.{i}.attn.qkv.weight"], sd[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(6 * D, D), torch.zeros(6 * D)
        sd[f"blocks.{i}.attn.proj.weight"] = torch.zeros(D, 2 * D)
    assert "head_dim" in _refused(tmp_path, sd)


def test_auto_detection_tells_the_layouts_apart(tmp_path, capsys):
    promoe, dit_moe = promoe_state_dict(), dit_moe_state_dict()
    assert (detect_layout(promoe), detect_layout(dit_moe), detect_layout(dit_state_dict())) == ("promoe_tc", "dit_moe", None)
    for name, sd in (("promoe", promoe), ("dit_moe", dit_moe)):
        torch.save(sd, tmp_path / f"{name}.pt")
    assert cli_main(["import", str(tmp_path / "dit_moe.pt"), "--out", str(tmp_path / "a"), "--heads", str(HEADS)]) == 0
    assert json.loads((tmp_path / "a" / "conversion.json").read_text())["layout"] == "dit_moe"
    assert open_run(tmp_path / "a").cfg.model.moe.router.name == "topk"
    assert cli_main(["import", str(tmp_path / "promoe.pt"), "--out", str(tmp_path / "b"), "--layout", "dit_moe",
                     "--heads", str(HEADS)]) == 2
    assert "is not a dit_moe checkpoint (its keys look like promoe_tc)" in capsys.readouterr().err
    assert cli_main(["import", str(tmp_path / "dit_moe.pt"), "--out", str(tmp_path / "c"), "--layout", "promoe_tc",
                     "--heads", str(HEADS)]) == 2
    assert "is not a promoe_tc checkpoint (its keys look like dit_moe)" in capsys.readouterr().err
    assert cli_main(["import", str(tmp_path / "dit_moe.pt"), "--out", str(tmp_path / "d"), "--heads", str(HEADS),
                     "--score", "sigmoid"]) == 2
    assert "DiT-MoE's gate is a softmax" in capsys.readouterr().err

"""`moedit import` of a DiT-MoE checkpoint: a state dict with feizc/DiT-MoE's names and shapes and random
weights, imported through the CLI, computes what DiT-MoE's model computes — checked against a reference
written from the paper's equations (DiT blocks whose FFN is softmax top-k over SwiGLU experts, not
renormalised, plus an always-on shared SwiGLU expert), under both time conventions. Keys that do not fit
are refused with the list."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moedit.cli.main import main as cli_main
from moedit.convert.keys import ConversionError
from moedit.convert.peers import import_run
from moedit.runs import open_run

from dit_reference import dit_reference_forward, dit_state_dict  # tests/

pytestmark = pytest.mark.usefixtures("one_thread")
D, DEPTH, C, P, GRID, CLASSES, E, H, H_SHARED, HEADS = 32, 2, 4, 2, 4, 5, 4, 64, 48, 2


def dit_moe_state_dict(seed: int = 0, shared: bool = True) -> dict[str, torch.Tensor]:
    """DiT-MoE's layout: DiT's keys, with each block's `mlp` replaced by `moe` (gate, experts, shared experts)."""
    sd = {k: v for k, v in dit_state_dict(D, DEPTH, C, P, GRID, CLASSES, learn_sigma=True, seed=seed).items()
          if not (k.startswith("blocks.") and ".mlp." in k)}
    gen = torch.Generator().manual_seed(seed + 100)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.2

    for i in range(DEPTH):
        sd[f"blocks.{i}.moe.gate.weight"] = rand(E, D)
        for e in range(E):
            for name, shape in (("gate_proj", (H, D)), ("up_proj", (H, D)), ("down_proj", (D, H))):
                sd[f"blocks.{i}.moe.experts.{e}.{name}.weight"] = rand(*shape)
        if shared:
            for name, shape in (("gate_proj", (H_SHARED, D)), ("up_proj", (H_SHARED, D)), ("down_proj", (D, H_SHARED))):
                sd[f"blocks.{i}.moe.shared_experts.{name}.weight"] = rand(*shape)
    return sd


def moe_ffn(sd, top_k: int):
    """The MoE FFN of DiT-MoE by its equations: s = softmax(x·Gᵀ), y = Σ_{e ∈ top-k(s)} s_e·f_e(x) + f_shared(x),
    with f(x) = W_down·(silu(W_gate·x) ⊙ W_up·x)."""
    def swiglu(x, prefix):
        gate, up, down = (sd[f"{prefix}.{n}_proj.weight"] for n in ("gate", "up", "down"))
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

    def ffn(i, h_BND):
        x = h_BND.reshape(-1, D)
        s = torch.softmax(F.linear(x, sd[f"blocks.{i}.moe.gate.weight"]), dim=-1)
        weight_NK, expert_NK = s.topk(top_k, dim=-1)  # no renormalisation (DiT-MoE's norm_topk_prob = False)
        out = torch.zeros_like(x)
        for n in range(x.shape[0]):
            for w, e in zip(weight_NK[n], expert_NK[n]):
                out[n] += w * swiglu(x[n], f"blocks.{i}.moe.experts.{int(e)}")
        if f"blocks.{i}.moe.shared_experts.gate_proj.weight" in sd:
            out = out + swiglu(x, f"blocks.{i}.moe.shared_experts")
        return out.reshape(h_BND.shape)

    return ffn


def _raw(sd):
    """Other weights for the raw model (the fixed position table stays what it is)."""
    return {k: v if k == "pos_embed" else 0.5 * v for k, v in sd.items()}


@pytest.fixture
def checkpoint(tmp_path):
    sd = dit_moe_state_dict()
    path = tmp_path / "dit_moe.pt"
    torch.save({"model": _raw(sd), "ema": sd}, path)  # their training checkpoint: raw and EMA weights
    return path, sd


@pytest.mark.parametrize("objective, t_scale", [("ddpm", 1000.0), ("rectified_flow", 1.0)])
@pytest.mark.parametrize("top_k", [1, 2])
def test_an_imported_dit_moe_computes_dit_moes_output(tmp_path, capsys, checkpoint, objective, t_scale, top_k):
    path, sd = checkpoint
    out = tmp_path / f"run_{objective}_{top_k}"
    assert cli_main(["import", str(path), "--out", str(out), "--objective", objective, "--heads", str(HEADS),
                     "--top-k", str(top_k)]) == 0, capsys.readouterr().err
    run = open_run(out)
    m = run.cfg.model
    assert (m.pos_embed, m.ffn, m.t_scale, m.out_channels, m.moe.router.top_k) == ("sincos_wh", "swiglu", t_scale, 2 * C, top_k)
    assert run.cfg.objective.name == objective
    model = run.load_model("ema").eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, C, GRID * P, GRID * P, generator=gen)
    y = torch.tensor([0, 3, CLASSES])  # the last one: the null class
    peer_t = torch.tensor([0.0, 417.0, 999.0]) if objective == "ddpm" else torch.tensor([0.0, 0.37, 1.0])
    with torch.no_grad():
        want = dit_reference_forward(sd, x, peer_t, y, HEADS, P, ffn=moe_ffn(sd, top_k))
        got = model(x, peer_t / t_scale, y)  # moedit's t ∈ [0, 1]: DiT's step n is t = n/1000
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_learned_sigma_can_be_dropped_and_raw_weights_chosen(tmp_path, checkpoint):
    path, sd = checkpoint
    _, cfg = import_run(path, tmp_path / "drop", heads=HEADS, learn_sigma="drop", raw=True, log=lambda m: None)
    assert cfg.model.out_channels is None
    model = open_run(tmp_path / "drop").load_model("ema")
    raw = _raw(sd)
    torch.testing.assert_close(model.state_dict()["blocks.0.moe.router.gate.net.head.weight"],
                               raw["blocks.0.moe.gate.weight"])
    x, t, y = torch.randn(1, C, 8, 8), torch.tensor([0.5]), torch.tensor([1])
    with torch.no_grad():
        want = dit_reference_forward(raw, x, t * 1000, y, HEADS, P, ffn=moe_ffn(raw, 2))[:, :C]
        torch.testing.assert_close(model.eval()(x, t, y), want, rtol=1e-4, atol=1e-4)


def test_keys_that_do_not_fit_are_refused_with_the_list(tmp_path):
    sd = dit_moe_state_dict()
    sd["blocks.0.moe.experts.0.extra.weight"] = torch.zeros(3)  # unmapped
    del sd["blocks.1.moe.experts.3.up_proj.weight"]  # an expert's matrix missing
    sd["blocks.0.moe.shared_experts.down_proj.weight"] = torch.zeros(D, H_SHARED + 1)  # misshapen
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ConversionError) as info:
        import_run(path, tmp_path / "out", heads=HEADS, log=lambda m: None)
    text = str(info.value)
    assert "blocks.0.moe.experts.0.extra.weight" in text and "blocks.1.moe.experts.wu_EDH" in text
    assert "shape mismatches" in text and not (tmp_path / "out").exists()


def test_other_checkpoints_and_bad_options_are_clear_errors(tmp_path, capsys):
    dense = tmp_path / "dit.pt"
    torch.save(dit_state_dict(D, DEPTH, C, P, GRID, CLASSES), dense)
    assert cli_main(["import", str(dense), "--out", str(tmp_path / "a"), "--heads", str(HEADS)]) == 2
    assert "is not a known checkpoint" in capsys.readouterr().err  # a dense DiT: `moedit convert` takes it
    moe = tmp_path / "moe.pt"
    torch.save(dit_moe_state_dict(shared=False), moe)
    assert cli_main(["import", str(moe), "--out", str(tmp_path / "b"), "--heads", str(HEADS), "--top-k", "9"]) == 2
    assert "--top-k 9 must be between 1 and the checkpoint's 4 experts" in capsys.readouterr().err
    assert cli_main(["import", str(moe), "--out", str(tmp_path / "c"), "--heads", str(HEADS)]) == 0
    assert open_run(tmp_path / "c").cfg.model.moe.num_shared == 0  # no shared_experts keys: none

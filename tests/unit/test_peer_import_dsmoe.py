"""`moedit import` of a DSMoE checkpoint: a state dict with the names and shapes of EfficientMoE's released
DSMoE model (yhlleo/EfficientMoE DSMoE/models/models_DSMoE.py) and random weights, imported through the
CLI, computes what that model computes — checked against a reference written from the equations:
2-D RoPE with rotate-half pairing (row half, column half), dense blocks fc2(SiLU(fc1 x)), MoE blocks with
sigmoid scores s, a selection bias b, group-limited choice (a group scores its two best s + b, the
others masked), top-k of s + b, weights s renormalised then scaled, SwiGLU experts and a shared expert.
Their rectified flow runs from noise (t = 0) to data (t = 1) and predicts x − ε: moedit's model at
1 − t must return the negation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moedit.cli.main import main as cli_main
from moedit.config import ConfigError
from moedit.convert.keys import ConversionError
from moedit.convert.peers import detect_layout, import_run
from moedit.runs import open_run

from dit_reference import dit_reference_forward, dit_state_dict  # tests/

pytestmark = pytest.mark.usefixtures("one_thread")
D, DEPTH, C, P, GRID, E, H, HEADS, CLASSES, GROUPS, TOP_K, SCALE = 32, 4, 4, 2, 4, 4, 32, 2, 5, 2, 2, 2.0


def dsmoe_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in dit_state_dict(D, DEPTH, C, P, GRID, CLASSES, learn_sigma=True, seed=seed).items()
          if k != "pos_embed"}  # RoPE: no position table
    gen = torch.Generator().manual_seed(seed + 300)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.3

    for i in range(1, DEPTH, 2):
        for k in [k for k in sd if k.startswith(f"blocks.{i}.mlp.")]:
            del sd[k]
        m = f"blocks.{i}.mlp"
        sd[f"{m}.gate.weight"] = rand(E, D)
        sd[f"{m}.gate.e_score_correction_bias"] = torch.rand(E, generator=gen) * 0.05
        for e in range(E):
            for name, shape in (("gate_proj", (H, D)), ("up_proj", (H, D)), ("down_proj", (D, H))):
                sd[f"{m}.experts.blocks.{e}.{name}.weight"] = rand(*shape)
        for name, shape in (("gate_proj", (H, D)), ("up_proj", (H, D)), ("down_proj", (D, H))):
            sd[f"{m}.shared_experts.{name}.weight"] = rand(*shape)
    return sd


def rope_rotate_half(q_BHNd: torch.Tensor) -> torch.Tensor:
    """Rows rotate channels [0, d/2), columns [d/2, d); inside each half channel j pairs with j + d/4 at
    angle pos · 10000^(−j/(d/4))."""
    d = q_BHNd.shape[-1]
    q4 = d // 4
    freq = 10000.0 ** (-torch.arange(q4, dtype=torch.float64) / q4)
    rows = torch.arange(GRID, dtype=torch.float64).repeat_interleave(GRID)
    cols = torch.arange(GRID, dtype=torch.float64).repeat(GRID)
    out = q_BHNd.double().clone()
    for half, pos in ((0, rows), (d // 2, cols)):
        angle = (pos[:, None] * freq).float()
        a, b = q_BHNd[..., half:half + q4], q_BHNd[..., half + q4:half + 2 * q4]
        out[..., half:half + q4] = (a * angle.cos() - b * angle.sin()).double()
        out[..., half + q4:half + 2 * q4] = (a * angle.sin() + b * angle.cos()).double()
    return out.float()


def dsmoe_ffn(sd):
    def swiglu(x, prefix):
        g, u, dn = (sd[f"{prefix}.{n}_proj.weight"] for n in ("gate", "up", "down"))
        return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), dn)

    def ffn(i, h_BND):
        m = f"blocks.{i}.mlp"
        if f"{m}.fc1.weight" in sd:  # dense block: their timm Mlp with SiLU
            return F.linear(F.silu(F.linear(h_BND, sd[f"{m}.fc1.weight"], sd[f"{m}.fc1.bias"])),
                            sd[f"{m}.fc2.weight"], sd[f"{m}.fc2.bias"])
        x = h_BND.reshape(-1, D)
        s = torch.sigmoid(F.linear(x, sd[f"{m}.gate.weight"]))
        biased = s + sd[f"{m}.gate.e_score_correction_bias"]
        group_score = biased.view(-1, GROUPS, E // GROUPS).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(1, dim=-1).indices, 1.0)
        masked = biased.masked_fill(~keep.repeat_interleave(E // GROUPS, dim=1).bool(), 0.0)
        chosen = masked.topk(TOP_K, dim=-1).indices
        w = s.gather(1, chosen)
        w = w / w.sum(-1, keepdim=True) * SCALE
        out = torch.stack([sum(w[n, j] * swiglu(x[n], f"{m}.experts.blocks.{int(chosen[n, j])}") for j in range(TOP_K))
                           for n in range(x.shape[0])])
        return (out + swiglu(x, f"{m}.shared_experts")).reshape(h_BND.shape)

    return ffn


def test_an_imported_dsmoe_computes_dsmoes_output(tmp_path, capsys):
    sd = dsmoe_state_dict()
    path = tmp_path / "dsmoe.pt"
    torch.save(sd, path)
    assert detect_layout(sd) == "dsmoe"
    out = tmp_path / "run"
    assert cli_main(["import", str(path), "--out", str(out), "--heads", str(HEADS), "--image-size", str(GRID * P),
                     "--top-k", str(TOP_K), "--set", f"model.moe.router.num_groups={GROUPS}",
                     "model.moe.router.top_groups=1", f"model.moe.router.scale={SCALE}"]) == 0, capsys.readouterr().err
    run = open_run(out)
    m = run.cfg.model
    assert (m.pos_embed, m.rope_pairing, m.dense_ffn, m.t_flip, m.t_scale) == ("rope", "rotate_half", "mlp_silu", True, 1.0)
    model = run.load_model("ema").eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, C, GRID * P, GRID * P, generator=gen)
    y = torch.tensor([0, 4, CLASSES])
    t_theirs = torch.tensor([0.0, 0.3, 0.9])  # their time: 0 noise, 1 data
    with torch.no_grad():
        want = dit_reference_forward(sd, x, t_theirs, y, HEADS, P, ffn=dsmoe_ffn(sd), rope=rope_rotate_half)
        got = model(x, 1 - t_theirs, y)
    torch.testing.assert_close(got, -want, rtol=1e-4, atol=1e-4)  # moedit's ε − x is their x − ε negated


def test_what_dsmoe_options_moedit_lacks_are_refused(tmp_path):
    sd = dsmoe_state_dict()
    for i in range(1, DEPTH, 2):
        for k in [k for k in sd if ".shared_experts." in k]:
            del sd[k]
    path = tmp_path / "noshared.pt"
    torch.save(sd, path)
    with pytest.raises(ConversionError, match="no shared expert"):
        import_run(path, tmp_path / "a", heads=HEADS, image_size=8, log=lambda m: None)
    sd = dsmoe_state_dict()
    sd["blocks.0.norm1.weight"] = torch.ones(D)  # their norm_type rmsnorm
    torch.save(sd, path)
    with pytest.raises(ConversionError, match="RMSNorm blocks"):
        import_run(path, tmp_path / "b", heads=HEADS, image_size=8, log=lambda m: None)
    sd = dsmoe_state_dict()
    torch.save(sd, path)
    with pytest.raises(ConfigError, match="--image-size 9 must be a positive multiple of the checkpoint's patch size 2"):
        import_run(path, tmp_path / "c", heads=HEADS, image_size=9, log=lambda m: None)

"""`moedit import` of a DiffMoE checkpoint: a state dict with the names and shapes of DiffMoE's model (as
shipped in ali-vilab/ProMoE and yhlleo/EfficientMoE, models_DiffMoE.py) and random weights, imported
through the CLI, computes what that model computes at inference — checked against a reference written
from the equations: in each MoE block the gate gives s = softmax(x·Gᵀ), the capacity predictor
p = σ(W2·SiLU(W1·x + b1) + b2), expert e takes the k_e = |{i : p_ie > θ_e}| tokens with the highest s_ie of
the call and weights them by s_ie; the conditional and unconditional samples run as separate calls (as
their sampler does). Time: rectified flow, the embedder fed 1000·σ. Keys that do not fit are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moedit.cli.main import main as cli_main
from moedit.convert.keys import ConversionError
from moedit.convert.peers import detect_layout, import_run
from moedit.runs import open_run

from dit_reference import dit_reference_forward, dit_state_dict  # tests/

pytestmark = pytest.mark.usefixtures("one_thread")
D, DEPTH, C, P, GRID, E, H, HEADS, CLASSES = 32, 4, 4, 2, 4, 4, 64, 2, 5


def diffmoe_state_dict(seed: int = 0, shared: bool = False) -> dict[str, torch.Tensor]:
    sd = dit_state_dict(D, DEPTH, C, P, GRID, CLASSES, learn_sigma=True, seed=seed)
    gen = torch.Generator().manual_seed(seed + 200)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.3

    for i in range(1, DEPTH, 2):  # their `interleave`: the odd blocks are MoE
        for k in [k for k in sd if k.startswith(f"blocks.{i}.mlp.")]:
            del sd[k]
        m = f"blocks.{i}.mlp"
        sd[f"{m}.gate_weight"] = rand(E, D)
        sd[f"{m}.capacity_predictor.0.weight"], sd[f"{m}.capacity_predictor.0.bias"] = rand(D, D), rand(D)
        sd[f"{m}.capacity_predictor.2.weight"], sd[f"{m}.capacity_predictor.2.bias"] = rand(E, D), rand(E)
        sd[f"{m}.expert_threshold"] = torch.rand(E, generator=gen) * 0.4 + 0.3  # some tokens pass, some not
        sd[f"{m}.ema_decay"] = torch.tensor([0.95])
        for e in range(E):
            sd[f"{m}.experts.{e}.fc1.weight"], sd[f"{m}.experts.{e}.fc1.bias"] = rand(H, D), rand(H)
            sd[f"{m}.experts.{e}.fc2.weight"], sd[f"{m}.experts.{e}.fc2.bias"] = rand(D, H), rand(D)
        if shared:
            sd[f"{m}.shared_experts.fc1.weight"], sd[f"{m}.shared_experts.fc1.bias"] = rand(2 * H, D), rand(2 * H)
            sd[f"{m}.shared_experts.fc2.weight"], sd[f"{m}.shared_experts.fc2.bias"] = rand(D, 2 * H), rand(D)
    return sd


def diffmoe_ffn(sd, y_B: torch.Tensor, null: int):
    def mlp(x, prefix):
        h = F.gelu(F.linear(x, sd[f"{prefix}.fc1.weight"], sd[f"{prefix}.fc1.bias"]), approximate="tanh")
        return F.linear(h, sd[f"{prefix}.fc2.weight"], sd[f"{prefix}.fc2.bias"])

    def one_call(i, x_SD):
        m = f"blocks.{i}.mlp"
        s_SE = torch.softmax(F.linear(x_SD, sd[f"{m}.gate_weight"]), dim=-1)
        hidden = F.silu(F.linear(x_SD, sd[f"{m}.capacity_predictor.0.weight"], sd[f"{m}.capacity_predictor.0.bias"]))
        p_SE = torch.sigmoid(F.linear(hidden, sd[f"{m}.capacity_predictor.2.weight"], sd[f"{m}.capacity_predictor.2.bias"]))
        out = torch.zeros_like(x_SD)
        for e in range(E):
            k = int((p_SE[:, e] > sd[f"{m}.expert_threshold"][e]).sum())
            weight, index = s_SE[:, e].topk(k)
            out[index] += weight[:, None] * mlp(x_SD[index], f"{m}.experts.{e}")
        if f"{m}.shared_experts.fc1.weight" in sd:
            out = out + mlp(x_SD, f"{m}.shared_experts")
        return out

    def ffn(i, h_BND):
        if f"blocks.{i}.mlp.fc1.weight" in sd:  # a dense block
            return mlp(h_BND, f"blocks.{i}.mlp")
        out = torch.zeros_like(h_BND)
        for pool in (y_B != null, y_B == null):  # their sampler: conditional and unconditional calls apart
            if pool.any():
                B, N, _ = h_BND[pool].shape
                out[pool] = one_call(i, h_BND[pool].reshape(B * N, D)).reshape(B, N, D)
        return out

    return ffn


@pytest.mark.parametrize("shared", [False, True])
def test_an_imported_diffmoe_computes_diffmoes_inference(tmp_path, capsys, shared):
    sd = diffmoe_state_dict(shared=shared)
    path = tmp_path / "diffmoe.pt"
    torch.save({"model": sd, "ema": sd}, path)
    assert detect_layout(sd) == "diffmoe"
    out = tmp_path / "run"
    assert cli_main(["import", str(path), "--out", str(out), "--heads", str(HEADS)]) == 0, capsys.readouterr().err
    run = open_run(out)
    r = run.cfg.model.moe.router
    assert (r.name, r.capacity_inference, r.threshold_decay, run.cfg.model.moe.placement) == ("diffmoe", "topk", 0.95, "interleaved")
    assert run.cfg.model.t_scale == 1000.0 and run.cfg.objective.name == "rectified_flow"
    model = run.load_model("ema").eval()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, C, GRID * P, GRID * P, generator=gen)
    y = torch.tensor([0, CLASSES, 3, CLASSES])  # two conditional samples, two unconditional ones
    sigma = torch.tensor([0.1, 0.1, 0.6, 0.6])
    with torch.no_grad():
        want = dit_reference_forward(sd, x, 1000 * sigma, y, HEADS, P, ffn=diffmoe_ffn(sd, y, CLASSES))
        got = model(x, sigma, y)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    load_E = model.moe_layers()[0].last_routing.load_E()
    assert any(0 < load < 4 * GRID * GRID for load in load_E.tolist())  # a real choice: some tokens, not all
    other = tmp_path / "threshold_rule"  # moedit's default batch-independent rule is another function
    assert cli_main(["import", str(path), "--out", str(other), "--heads", str(HEADS),
                     "--set", "model.moe.router.capacity_inference=threshold"]) == 0
    with torch.no_grad():
        assert not torch.allclose(open_run(other).load_model("ema").eval()(x, sigma, y), want, atol=1e-3)


def test_diffmoe_keys_that_do_not_fit_are_refused(tmp_path):
    sd = diffmoe_state_dict()
    sd["blocks.1.mlp.capacity_predictor.1.weight"] = torch.zeros(3)  # unmapped
    sd["blocks.3.mlp.expert_threshold"] = torch.zeros(E + 1)  # misshapen
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ConversionError) as info:
        import_run(path, tmp_path / "out", heads=HEADS, log=lambda m: None)
    assert "capacity_predictor.1.weight" in str(info.value) and "threshold.value_X" in str(info.value)
    assert not (tmp_path / "out").exists()

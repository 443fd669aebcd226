"""Expert weight layouts (`moe.expert_layout`): `col` stores each expert's matrices column-major. Only
memory order may differ: outputs, gradients, optimizer steps and checkpoints must be the same as `row`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from moedit.config import MoEConfig
from moedit.moe import glue_triton
from moedit.moe.dispatch import dispatch
from moedit.moe.experts import StackedExperts
from moedit.moe.layer import MoELayer
from moedit.moe.routing import Routing

E, D, H, N, K = 4, 16, 24, 10, 2
MATRICES = {"mlp": ("w1_EDH", "w2_EHD"), "swiglu": ("w1_EDH", "w2_EHD", "wu_EDH")}
BACKENDS = ("loop", "grouped", "fused") if glue_triton.unavailable_reason(torch.device("cpu")) is None else ("loop", "grouped")


def _pair(kind: str) -> tuple[StackedExperts, StackedExperts]:
    torch.manual_seed(0)
    row = StackedExperts(E, D, H, kind)
    if kind == "mlp":
        with torch.no_grad():
            row.b1_EH.normal_()
            row.b2_ED.normal_()
    col = StackedExperts(E, D, H, kind, layout="col")
    col.load_state_dict(row.state_dict())
    return row, col


def _column_major(t: torch.Tensor) -> bool:
    E_, r, c = t.shape
    return t.stride() == (r * c, 1, r)


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_col_layout_computes_what_row_computes(kind: str, backend: str) -> None:
    row, col = _pair(kind)
    for name in MATRICES[kind]:
        assert _column_major(getattr(col, name)) and getattr(row, name).is_contiguous(), name
    gen = torch.Generator().manual_seed(1)
    x_ND, g_ND = torch.randn(N, D, generator=gen), torch.randn(N, D, generator=gen)
    expert_M = torch.cat([torch.randperm(E - 1, generator=gen)[:K] for _ in range(N)])  # expert E-1 empty
    routing = Routing(torch.arange(N).repeat_interleave(K), expert_M, torch.rand(N * K, generator=gen), N, E, per_token=K)
    outs = {}
    for name, experts in (("row", row), ("col", col)):
        x = x_ND.clone().requires_grad_(True)
        out = dispatch(x, routing, experts, backend)
        (out * g_ND).sum().backward()
        outs[name] = (out.detach(), x.grad, {n: p.grad for n, p in experts.named_parameters()})
    torch.testing.assert_close(outs["col"][0], outs["row"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["col"][1], outs["row"][1], rtol=1e-5, atol=1e-5)
    for name, grad in outs["col"][2].items():
        torch.testing.assert_close(grad, outs["row"][2][name], rtol=1e-5, atol=1e-5, msg=name)
        # autograd's layout contract: a gradient has its parameter's strides, so optimizer state does too
        assert grad.stride() == getattr(col, name).stride(), name


def test_col_layout_survives_casts_optimizer_steps_and_checkpoints(tmp_path) -> None:
    row, col = _pair("mlp")
    assert _column_major(col.to(torch.bfloat16).w1_EDH)  # a module cast keeps the memory order
    col.float()
    opt = torch.optim.AdamW(col.parameters(), lr=1e-2)
    x_ND = torch.randn(N, D)
    routing = Routing(torch.arange(N), torch.arange(N) % E, torch.ones(N), N, E, per_token=1)
    dispatch(x_ND, routing, col, "loop").square().sum().backward()
    opt.step()
    assert _column_major(col.w1_EDH) and _column_major(col.w2_EHD)
    assert _column_major(opt.state[col.w1_EDH]["exp_avg"])
    # a checkpoint is written contiguous and loads into either layout, values unchanged
    save_file({k: v.contiguous() for k, v in col.state_dict().items()}, str(tmp_path / "experts.safetensors"))
    loaded = load_file(str(tmp_path / "experts.safetensors"))
    row.load_state_dict(loaded)
    again = StackedExperts(E, D, H, "mlp", layout="col")
    again.load_state_dict(loaded)
    assert _column_major(again.w1_EDH)
    for name, p in col.state_dict().items():
        assert torch.equal(row.state_dict()[name], p) and torch.equal(again.state_dict()[name], p), name


def test_layer_takes_the_configured_layout_for_routed_and_shared_experts() -> None:
    layer = MoELayer(D, MoEConfig(num_experts=E, num_shared=1, expert_layout="col"))
    assert _column_major(layer.experts.w1_EDH) and _column_major(layer.shared.w2_EHD)
    assert "layout=col" in repr(layer.experts)
    with pytest.raises(ValueError, match="layout 'diagonal' is unknown; choose row or col"):
        StackedExperts(E, D, H, layout="diagonal")

"""The fused backend's activation kernels against PyTorch: bias + GELU_tanh(z + b[expert]) and SwiGLU's
silu(a)·b, forward and gradients, in float32 and bfloat16 (run under Triton's interpreter where no GPU is: tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moedit.moe import glue_triton

pytestmark = pytest.mark.skipif(not glue_triton.unavailable_reason(torch.device("cpu")) is None,
                                reason="Triton's interpreter is off (a GPU machine: tests/gpu) or triton is not installed")


def _both(z_MH, b_EH, expert_M, g_MH):
    out = {}
    for name in ("torch", "triton"):
        z, b = z_MH.clone().requires_grad_(True), b_EH.clone().requires_grad_(True)
        h = F.gelu(z + b[expert_M], approximate="tanh") if name == "torch" else glue_triton.bias_gelu(z, b, expert_M)
        h.backward(g_MH)
        out[name] = (h.detach(), z.grad, b.grad)
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("M, H", [(37, 48), (1, 20), (0, 16)], ids=["rows", "one_row", "no_rows"])
def test_bias_gelu_matches_torch(dtype, tol, M, H) -> None:
    gen = torch.Generator().manual_seed(M + H)
    E = 5
    # rows sorted by expert, expert 3 empty; values wide enough to reach GELU's curved and flat parts
    expert_M = torch.sort(torch.tensor([0, 1, 2, 4])[torch.randint(4, (M,), generator=gen)]).values
    z_MH = (3 * torch.randn(M, H, generator=gen)).to(dtype)
    b_EH = torch.randn(E, H, generator=gen).to(dtype)
    g_MH = torch.randn(M, H, generator=gen).to(dtype)
    got = _both(z_MH, b_EH, expert_M, g_MH)
    for part, want, have in zip(("h", "dz", "db"), got["torch"], got["triton"]):
        assert have.dtype == dtype and have.shape == want.shape, part
        torch.testing.assert_close(have.float(), want.float(), rtol=tol, atol=tol, msg=part)
    assert torch.count_nonzero(got["triton"][2][3]) == 0  # the empty expert's bias gets no gradient


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape", [(37, 48), (3, 700), (0, 16)], ids=["rows", "across_blocks", "no_rows"])
def test_swiglu_matches_torch(dtype, tol, shape) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    a_MH, b_MH, g_MH = ((3 * torch.randn(*shape, generator=gen)).to(dtype) for _ in range(3))
    out = {}
    for name in ("torch", "triton"):
        a, b = a_MH.clone().requires_grad_(True), b_MH.clone().requires_grad_(True)
        h = F.silu(a) * b if name == "torch" else glue_triton.swiglu(a, b)
        h.backward(g_MH)
        out[name] = (h.detach(), a.grad, b.grad)
    for part, want, have in zip(("h", "da", "db"), out["torch"], out["triton"]):
        assert have.dtype == dtype and have.shape == want.shape, part
        torch.testing.assert_close(have.float(), want.float(), rtol=tol, atol=tol, msg=part)

"""On a CUDA GPU: the fast paths against the loop on the device they are for, and the training step free
of host synchronisation as CUDA itself reports it. Skipped where no GPU is (CI); run on a lent GPU
machine with `PYTHONPATH=src python3 -m pytest tests/gpu -q`.

The CPU suite checks the same agreements with Triton's interpreter and finds host syncs by patching
the Python methods that cause them; here `torch.cuda.set_sync_debug_mode("error")` raises on any
synchronising call, C++ ones included."""

from __future__ import annotations

import pytest
import torch

from moedit.config import from_dict
from moedit.moe import glue_triton
from moedit.moe.dispatch import dispatch
from moedit.moe.experts import StackedExperts
from moedit.moe.routing import Routing
from moedit.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
FUSED = pytest.mark.skipif(glue_triton.unavailable_reason(CUDA) is not None, reason="needs Triton")
E, D, H = 8, 128, 256


def _routing(case: str, gen: torch.Generator) -> Routing:
    """Token choice (k = 2 per token, token-major) or a general list with unrouted tokens; expert E-1 empty."""
    if case == "no_tokens":
        empty = torch.zeros(0, dtype=torch.long, device=CUDA)
        return Routing(empty, empty, torch.zeros(0, device=CUDA), 0, E, per_token=2)
    N = 1 if case == "batch_of_one" else 300
    if case in ("token_choice", "batch_of_one"):
        token_M = torch.arange(N).repeat_interleave(2)
        expert_M = torch.stack([torch.randperm(E - 1, generator=gen)[:2] for _ in range(N)]).reshape(-1)
        per_token = 2
    else:
        token_M = torch.randint(0, N - 10, (500,), generator=gen)  # the last ten tokens unrouted
        expert_M = torch.randint(0, E - 1, (500,), generator=gen)
        per_token = None
    weight_M = torch.rand(token_M.shape[0], generator=gen)
    return Routing(token_M.to(CUDA), expert_M.to(CUDA), weight_M.to(CUDA), N, E, per_token=per_token)


def _run(backend: str, experts: StackedExperts, routing: Routing, x_ND: torch.Tensor, g_ND: torch.Tensor, bf16: bool):
    experts.zero_grad()
    x = x_ND.clone().requires_grad_(True)
    w = routing.weight_M.clone().requires_grad_(True)
    r = Routing(routing.token_M, routing.expert_M, w, routing.num_tokens, E, per_token=routing.per_token)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = dispatch(x, r, experts, backend)
    if out.requires_grad:
        (out * g_ND).sum().backward()
    grads = [x.grad, w.grad] + [p.grad for p in experts.parameters()]
    return [out.detach()] + [torch.zeros(1, device=CUDA) if g is None else g for g in grads]


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
@pytest.mark.parametrize("case", ["token_choice", "general", "batch_of_one", "no_tokens"])
@pytest.mark.parametrize("backend", ["grouped", pytest.param("fused", marks=FUSED)])
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_fast_paths_match_the_loop_on_cuda(kind, case, backend, layout, bf16) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    experts = StackedExperts(E, D, H, kind, layout=layout).to(CUDA)
    if kind == "mlp":
        with torch.no_grad():
            experts.b1_EH.normal_()
            experts.b2_ED.normal_()
    routing = _routing(case, gen)
    x_ND = torch.randn(routing.num_tokens, D, generator=gen).to(CUDA)
    g_ND = torch.randn(routing.num_tokens, D, generator=gen).to(CUDA)
    want = _run("loop", experts, routing, x_ND, g_ND, bf16)
    got = _run(backend, experts, routing, x_ND, g_ND, bf16)
    tol = 3e-2 if bf16 else 1e-4
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, (i, case)
        if b.numel():
            scale = max(b.float().abs().max().item(), 1.0)
            assert (a.float() - b.float()).abs().max().item() <= tol * scale, (i, case)


ROUTERS = [("topk", {}, "grouped"), ("expert_choice", {"capacity": 2.0}, "grouped"),
           ("diffmoe", {"capacity": 2.0}, "grouped"), ("race", {}, "grouped"), ("promoe", {"top_k": 1}, "grouped"),
           pytest.param("topk", {}, "fused", marks=FUSED), pytest.param("race", {}, "fused", marks=FUSED)]


@pytest.mark.parametrize("router, extra, backend", ROUTERS)
def test_train_step_makes_no_host_sync_on_cuda(tmp_path, router, extra, backend) -> None:
    cfg = from_dict({
        "model": {"preset": "micro", "moe": {"num_experts": 4, "expert_ratio": 2.0, "backend": backend,
                                              "router": {"name": router, "top_k": 2, **extra}}},
        "data": {"name": "synthetic"},
        "train": {"out_dir": str(tmp_path), "steps": 4, "batch_size": 8, "ckpt_every": 0, "log_every": 2,
                  "device": "cuda", "precision": "bf16"},
    })
    trainer = Trainer(cfg, progress=False)
    trainer.train_step(0)  # first step: lazy set-up may read the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")

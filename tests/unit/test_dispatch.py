"""Dispatch backends: `grouped` and `fused` (fast paths) and `loop` (reference) must agree with each
other and with a naive per-assignment reference, in the forward output and in every gradient
(docs/ARCHITECTURE.md rule 4). `fused` runs its Triton kernels under Triton's interpreter here
(tests/conftest.py)."""

from __future__ import annotations

import importlib

import pytest
import torch

from moedit.config import ConfigError, from_dict
from moedit.moe import glue_triton
from moedit.moe.dispatch import BACKENDS, CPU_GROUPED_BELOW, dispatch, resolve_backend
from moedit.moe.experts import StackedExperts
from moedit.moe.routing import Routing
from moedit.device import check_backend_runs

dispatch_module = importlib.import_module("moedit.moe.dispatch")  # the module, not the function moedit.moe exports

D, H, E = 32, 48, 5
# fused runs on CPU tensors under Triton's interpreter (tests/conftest.py turns it on where no GPU is)
FUSED_ON_CPU = glue_triton.unavailable_reason(torch.device("cpu")) is None
FAST = ("grouped", "fused") if FUSED_ON_CPU else ("grouped",)


def _routing(token_M, expert_M, weight_M, num_tokens, num_experts=E) -> Routing:
    return Routing(
        token_M=torch.as_tensor(token_M, dtype=torch.int64),
        expert_M=torch.as_tensor(expert_M, dtype=torch.int64),
        weight_M=torch.as_tensor(weight_M, dtype=torch.float32),
        num_tokens=num_tokens,
        num_experts=num_experts,
    )


def _case(name: str, gen: torch.Generator) -> tuple[int, list[int], list[int]]:
    """(N, token_M, expert_M) for one routing scenario."""
    if name == "random":  # arbitrary M; expert 1 and tokens 3, 8 never used
        N, M = 11, 23
        tokens = [i for i in range(N) if i not in (3, 8)]
        experts = [0, 2, 3, 4]
        tok = [tokens[j] for j in torch.randint(len(tokens), (M,), generator=gen).tolist()]
        exp = [experts[j] for j in torch.randint(len(experts), (M,), generator=gen).tolist()]
        return N, tok, exp
    if name == "repeated_token":  # token 2 listed for four different experts, token 0 twice for one
        return 6, [2, 0, 2, 5, 2, 0, 2, 4], [0, 3, 1, 3, 4, 3, 2, 0]
    if name == "empty":  # M = 0: nobody is routed
        return 4, [], []
    if name == "batch_of_one":  # N = 1 with k = 3
        return 1, [0, 0, 0], [4, 1, 2]
    if name == "one_expert":  # every assignment on expert 2, several tokens twice
        return 7, [0, 1, 2, 3, 4, 5, 6, 1, 4], [2] * 9
    if name == "all_pairs":  # every token on every expert
        N = 3
        return N, [i for i in range(N) for _ in range(E)], [e for _ in range(N) for e in range(E)]
    if name == "unsorted_last_expert_only":  # only the last expert, tokens unsorted
        return 5, [4, 0, 3], [E - 1] * 3
    raise KeyError(name)


CASES = ["random", "repeated_token", "empty", "batch_of_one", "one_expert", "all_pairs", "unsorted_last_expert_only"]


def _naive(x_ND: torch.Tensor, routing: Routing, experts: StackedExperts) -> torch.Tensor:
    """Independent reference: one expert call per assignment, summed per token."""
    rows = [torch.zeros(x_ND.shape[1], dtype=x_ND.dtype) for _ in range(x_ND.shape[0])]
    for i, e, w in zip(routing.token_M.tolist(), routing.expert_M.tolist(), routing.weight_M):
        rows[i] = rows[i] + w * experts.forward_expert(e, x_ND[i : i + 1])[0]
    return torch.stack(rows)


def _run(impl: str, x_ND, token_M, expert_M, weight_M, N, experts, g_ND):
    """Forward through one implementation; returns (out, grad_x, grad_w, {param: grad})."""
    x = x_ND.clone().requires_grad_(True)
    w = weight_M.clone().requires_grad_(True)
    routing = _routing(token_M, expert_M, w, N)
    out = _naive(x, routing, experts) if impl == "naive" else dispatch(x, routing, experts, backend=impl)
    params = dict(experts.named_parameters())
    inputs = [x, w, *params.values()]
    if out.requires_grad:
        grads = torch.autograd.grad((out * g_ND).sum(), inputs, allow_unused=True)
    else:
        grads = [None] * len(inputs)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    return out.detach(), grads[0], grads[1], dict(zip(params, grads[2:]))


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
@pytest.mark.parametrize("case", CASES)
def test_grouped_equals_loop_equals_naive(kind: str, case: str) -> None:
    gen = torch.Generator().manual_seed(100 * CASES.index(case) + len(kind))
    torch.manual_seed(0)
    experts = StackedExperts(E, D, H, kind)
    if kind == "mlp":  # non-zero biases so that bias gradients are exercised too
        with torch.no_grad():
            experts.b1_EH.normal_(generator=gen)
            experts.b2_ED.normal_(generator=gen)
    N, token_M, expert_M = _case(case, gen)
    x_ND = torch.randn(N, D, generator=gen)
    weight_M = torch.rand(len(token_M), generator=gen) + 0.1
    g_ND = torch.randn(N, D, generator=gen)

    results = {impl: _run(impl, x_ND, token_M, expert_M, weight_M, N, experts, g_ND)
               for impl in ("naive", "loop", *FAST)}
    ref_out, ref_gx, ref_gw, ref_gp = results["naive"]
    assert ref_out.shape == (N, D)
    for impl in ("loop", *FAST):
        out, gx, gw, gp = results[impl]
        assert out.shape == (N, D) and out.dtype == x_ND.dtype, impl
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=f"{impl} forward")
        torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-5, msg=f"{impl} grad x")
        torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-5, msg=f"{impl} grad weights")
        assert set(gp) == set(ref_gp)
        for name in ref_gp:
            torch.testing.assert_close(gp[name], ref_gp[name], rtol=1e-5, atol=1e-5, msg=f"{impl} grad {name}")

    # tokens with no assignment: exactly zero output and zero gradient into x
    unrouted = sorted(set(range(N)) - set(token_M))
    for impl in ("loop", *FAST):
        out, gx, _, gp = results[impl]
        assert torch.count_nonzero(out[unrouted]) == 0, impl
        assert torch.count_nonzero(gx[unrouted]) == 0, impl
        # experts that received nothing get exactly zero gradient, used ones a non-zero one
        for e in range(E):
            used = e in expert_M
            for name, grad in gp.items():
                assert bool(torch.count_nonzero(grad[e])) == used, (impl, name, e)
    if case == "random":
        assert unrouted == [3, 8]


def test_combine_weights_and_repeats_by_hand() -> None:
    """Weights scale linearly and repeated (token, expert) pairs add up; grads to weights are e·g."""
    torch.manual_seed(1)
    experts = StackedExperts(E, D, H, "mlp")
    x = torch.randn(3, D)
    with torch.no_grad():
        f0 = experts.forward_expert(0, x[1:2])[0]
        f3 = experts.forward_expert(3, x[1:2])[0]
    for backend in ("loop", *FAST):
        w = torch.tensor([0.25, 0.5, 2.0], requires_grad=True)
        out = dispatch(x, _routing([1, 1, 1], [0, 3, 0], w, 3), experts, backend)
        torch.testing.assert_close(out[1], 2.25 * f0 + 0.5 * f3, rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(out[0]) == 0 and torch.count_nonzero(out[2]) == 0
        g = torch.randn(3, D)
        (out * g).sum().backward()
        expected = torch.stack([f0 @ g[1], f3 @ g[1], f0 @ g[1]])
        torch.testing.assert_close(w.grad, expected, rtol=1e-5, atol=1e-5)


def test_backends_agree_under_bf16_autocast() -> None:
    torch.manual_seed(2)
    experts = StackedExperts(E, D, 64, "swiglu")
    x = torch.randn(9, D)
    routing = _routing([0, 1, 2, 3, 4, 5, 6, 7, 8, 0], [0, 0, 1, 2, 2, 2, 4, 4, 4, 3], torch.rand(10), 9)
    outs = {}
    for backend in ("loop", *FAST):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[backend] = dispatch(x, routing, experts, backend)
        assert outs[backend].dtype == torch.float32  # combined back into x's dtype
    for backend in FAST:
        torch.testing.assert_close(outs["loop"], outs[backend], rtol=2e-2, atol=2e-2)
    fp32 = dispatch(x, routing, experts, "loop")
    torch.testing.assert_close(outs["loop"], fp32, rtol=5e-2, atol=5e-2)
    assert not torch.equal(outs["loop"], fp32)  # experts really ran in bf16
    # the token-major permutation path too (two experts per token)
    fixed = Routing(torch.arange(9).repeat_interleave(2), torch.tensor([0, 1, 1, 2, 2, 3, 4, 0] * 2 + [3, 4]),
                    torch.rand(18), 9, E, per_token=2)
    for backend in FAST:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = dispatch(x, fixed, experts, backend)
            ref = dispatch(x, fixed, experts, "loop")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


def test_resolve_backend() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "loop"
    assert resolve_backend("auto", torch.device("cuda")) == "grouped"
    # on CPU by the shape: few rows per expert -> one grouped call, many -> the loop
    assert resolve_backend("auto", torch.device("cpu"), rows_per_expert=CPU_GROUPED_BELOW - 1) == "grouped"
    assert resolve_backend("auto", torch.device("cpu"), rows_per_expert=CPU_GROUPED_BELOW) == "loop"
    assert resolve_backend("auto", torch.device("cuda"), rows_per_expert=10_000) == "grouped"
    assert resolve_backend("loop", torch.device("cpu"), rows_per_expert=1) == "loop"
    for name in ("loop", "grouped"):
        assert resolve_backend(name, torch.device("cpu")) == name
    with pytest.raises(ValueError) as err:
        resolve_backend("triton", torch.device("cpu"))
    assert "triton" in str(err.value)
    for name in BACKENDS:
        assert name in str(err.value)


def test_dispatch_rejects_unknown_backend_and_wrong_token_count() -> None:
    experts = StackedExperts(E, D, H, "mlp")
    routing = _routing([0, 1], [0, 1], [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="loop"):
        dispatch(torch.randn(2, D), routing, experts, backend="triton")
    with pytest.raises(ValueError, match="3"):
        dispatch(torch.randn(3, D), routing, experts, backend="loop")


@pytest.mark.parametrize(
    "lengths", [(3, 2, 3), (3, 3, 2), (2, 3, 3), (0, 1, 0)]
)
def test_routing_rejects_mismatched_lengths(lengths) -> None:
    m_tok, m_exp, m_w = lengths
    with pytest.raises(ValueError, match="one length"):
        Routing(
            token_M=torch.zeros(m_tok, dtype=torch.int64),
            expert_M=torch.zeros(m_exp, dtype=torch.int64),
            weight_M=torch.ones(m_w),
            num_tokens=4,
            num_experts=E,
        )


def test_routing_counts() -> None:
    r = _routing([0, 2, 2, 2], [1, 1, 3, 4], [1.0] * 4, num_tokens=4)
    assert r.load_E().tolist() == [0, 2, 0, 1, 1]
    assert r.experts_per_token_N().tolist() == [1, 0, 3, 0]


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
@pytest.mark.parametrize("N, k", [(9, 2), (1, 3), (6, 1), (4, E), (0, 2)], ids=["k2", "batch_of_one", "k1", "all", "no_tokens"])
def test_grouped_fixed_k_path_equals_loop_and_naive(kind: str, N: int, k: int) -> None:
    """Token-major routings with `per_token` take the permutation path of `grouped`; it must match the
    loop and the naive reference in the output and every gradient, empty experts included."""
    gen = torch.Generator().manual_seed(7 * N + k)
    torch.manual_seed(1)
    experts = StackedExperts(E, D, H, kind)
    if kind == "mlp":
        with torch.no_grad():
            experts.b1_EH.normal_(generator=gen)
            experts.b2_ED.normal_(generator=gen)
    # each token's k distinct experts, drawn from experts 0..3 when k < E so expert 4 stays empty
    pool = E if k == E else E - 1
    expert_M = torch.cat([torch.randperm(pool, generator=gen)[:k] for _ in range(N)]) if N else torch.zeros(0, dtype=torch.int64)
    token_M = torch.arange(N).repeat_interleave(k)
    weight_M = torch.rand(N * k, generator=gen) + 0.1
    x_ND, g_ND = torch.randn(N, D, generator=gen), torch.randn(N, D, generator=gen)

    def run(impl: str, fixed: bool):
        x = x_ND.clone().requires_grad_(True)
        w = weight_M.clone().requires_grad_(True)
        routing = Routing(token_M, expert_M, w, N, E, per_token=k if fixed else None)
        out = _naive(x, routing, experts) if impl == "naive" else dispatch(x, routing, experts, backend=impl)
        inputs = [x, w, *experts.parameters()]
        grads = torch.autograd.grad((out * g_ND).sum(), inputs, allow_unused=True) if out.requires_grad else [None] * len(inputs)
        return [out.detach()] + [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]

    want = run("naive", False) if N else run("loop", False)
    for impl in ("loop", *FAST):
        for got, ref in zip(run(impl, True), want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=impl)
    if 0 < k < E and N:
        for impl in FAST:
            assert torch.count_nonzero(run(impl, True)[3][E - 1]) == 0, impl  # the empty expert's w1 gradient


def test_routing_per_token_must_match_the_assignment_count() -> None:
    with pytest.raises(ValueError, match="per_token=2 needs M = 2 x 3"):
        Routing(torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), torch.ones(5), 3, E, per_token=2)



@pytest.mark.parametrize("tokens, expect", [(8, "grouped"), (4 * CPU_GROUPED_BELOW, "loop")])
def test_auto_on_cpu_takes_the_path_for_the_shape_and_agrees_with_loop(tokens, expect, monkeypatch) -> None:
    torch.manual_seed(0)
    E, k = 4, 2
    experts = StackedExperts(E, 8, 16)
    x = torch.randn(tokens, 8)
    routing = Routing(torch.arange(tokens).repeat_interleave(k), torch.randint(0, E, (tokens * k,)),
                      torch.rand(tokens * k), tokens, E, per_token=k)
    reference = dispatch(x, routing, experts, "loop")
    taken = []
    real_fixed, real_loop = dispatch_module.dispatch_grouped_fixed, dispatch_module.dispatch_loop
    monkeypatch.setattr(dispatch_module, "dispatch_grouped_fixed", lambda *a: taken.append("grouped") or real_fixed(*a))
    monkeypatch.setitem(dispatch_module._IMPLS, "loop", lambda *a: taken.append("loop") or real_loop(*a))
    got = dispatch(x, routing, experts, "auto")
    assert taken == [expect]
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_fused_refuses_where_its_kernels_cannot_run(monkeypatch) -> None:
    experts = StackedExperts(E, D, H, "mlp")
    routing = _routing([0, 1], [0, 1], [1.0, 1.0], 2)
    fused_cfg = from_dict({"model": {"moe": {"backend": "fused"}}})
    if glue_triton.TRITON_FOUND:
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor, no interpreter: the kernels have no device
        with pytest.raises(ValueError, match="CUDA, not cpu.*use backend grouped or auto"):
            dispatch(torch.randn(2, D), routing, experts, backend="fused")
        # training says so before it touches the run directory
        with pytest.raises(ConfigError, match="model.moe.backend=fused: .*CUDA, not cpu"):
            check_backend_runs(fused_cfg, torch.device("cpu"))
    monkeypatch.setattr(glue_triton, "TRITON_FOUND", False)
    with pytest.raises(ValueError, match="pip install triton"):
        dispatch(torch.randn(2, D), routing, experts, backend="fused")
    with pytest.raises(ConfigError, match="model.moe.backend=fused: .*pip install triton"):
        check_backend_runs(fused_cfg, torch.device("cpu"))
    check_backend_runs(from_dict({"model": {"moe": {"backend": "grouped"}}}), torch.device("cpu"))


@pytest.mark.skipif(not FUSED_ON_CPU, reason="Triton's interpreter is off or triton is not installed")
def test_fused_glue_kernels_by_hand() -> None:
    """The two kernels on a CSR written out: token 0 has rows 2 and 0, token 1 none, token 2 row 1."""
    ys_MD = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    w_J = torch.tensor([0.5, 2.0, -1.0], requires_grad=True)
    tok_J, pos_J, ptr_N1 = torch.tensor([0, 0, 2]), torch.tensor([2, 0, 1]), torch.tensor([0, 2, 2, 3])
    out_ND = glue_triton.combine_rows(ys_MD, w_J, tok_J, pos_J, ptr_N1, torch.float32)
    torch.testing.assert_close(out_ND, torch.tensor([[4.5, 7.0], [0.0, 0.0], [-3.0, -4.0]]))
    g_ND = torch.tensor([[1.0, 10.0], [7.0, 7.0], [100.0, 1000.0]])
    out_ND.backward(g_ND)
    torch.testing.assert_close(w_J.grad, torch.tensor([65.0, 21.0, 4300.0]))  # ⟨g[tok], ys[pos]⟩
    torch.testing.assert_close(ys_MD.grad, torch.tensor([[2.0, 20.0], [-100.0, -1000.0], [0.5, 5.0]]))
    x_ND = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    src_M = torch.tensor([0, 2, 0])  # sorted rows 0 and 2 come from token 0, row 1 from token 2
    xs_MD = glue_triton.gather_rows(x_ND, src_M, ptr_N1, pos_J, torch.bfloat16)
    assert xs_MD.dtype == torch.bfloat16
    torch.testing.assert_close(xs_MD.float(), x_ND.detach()[src_M])
    xs_MD.float().backward(torch.tensor([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]))
    torch.testing.assert_close(x_ND.grad, torch.tensor([[5.0, 5.0], [0.0, 0.0], [2.0, 2.0]]))

"""Token-choice top-k router (docs/ROUTING_MATH.md §2-5): selection, weights, selection-only bias and its
auxiliary-loss-free update, auxiliary losses, float32 gates."""

from __future__ import annotations

import math

import pytest
import torch

from moedit.config import RouterConfig
from moedit.moe.gates import Gate, score
from moedit.moe.losses import router_z_loss, switch_balance
from moedit.moe.routers import ROUTERS, build_router
from moedit.moe.routers.topk import TopKRouter
from moedit.moe.routing import RoutingContext

D, E = 32, 6


def _ctx(B: int, L: int, gen: torch.Generator | None = None, cond: bool = True) -> RoutingContext:
    cond_BSD = torch.randn(B, 2, D, generator=gen) if cond else None
    return RoutingContext(batch=B, seq_len=L, cond_BSD=cond_BSD)


def _router(seed: int = 0, **kw) -> TopKRouter:
    torch.manual_seed(seed)
    return TopKRouter(D, E, RouterConfig(**kw))


def _tokens(B=3, L=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B * L, D, generator=gen), _ctx(B, L, gen)


def _per_token(routing):
    """token -> {expert: weight}."""
    table: dict[int, dict[int, float]] = {}
    for i, e, w in zip(routing.token_M.tolist(), routing.expert_M.tolist(), routing.weight_M.tolist()):
        assert e not in table.setdefault(i, {}), f"token {i} got expert {e} twice"
        table[i][e] = w
    return table


def test_registry() -> None:
    assert ROUTERS["topk"] is TopKRouter
    assert isinstance(build_router(D, E, RouterConfig()), TopKRouter)
    with pytest.raises(ValueError, match="topk"):
        build_router(D, E, RouterConfig(name="nope"))


@pytest.mark.parametrize("k", [1, 2, 3, E])
@pytest.mark.parametrize("gate", ["linear", "mlp", "cross_attn"])
def test_each_token_gets_its_k_best_distinct_experts(k: int, gate: str) -> None:
    router = _router(gate=gate, top_k=k)
    x, ctx = _tokens()
    routing = router(x, ctx)
    N = x.shape[0]
    assert routing.num_tokens == N and routing.num_experts == E
    assert routing.token_M.shape == (N * k,)
    assert routing.experts_per_token_N().tolist() == [k] * N
    assert routing.load_E().sum().item() == N * k
    table = _per_token(routing)
    scores = routing.scores_NE
    for i in range(N):
        chosen = sorted(table[i])
        assert len(chosen) == k
        rest = [e for e in range(E) if e not in chosen]
        if rest:  # the kept experts are the k best by score
            assert scores[i, chosen].min() >= scores[i, rest].max()
    assert set(routing.aux) == {"balance", "z"}
    assert routing.stats["load_E"].tolist() == routing.load_E().tolist()


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "identity"])
def test_weights_are_scores_of_chosen_experts(kind: str) -> None:
    router = _router(score=kind, top_k=2)
    x, ctx = _tokens(seed=1)
    routing = router(x, ctx)
    logits = x @ router.gate.net.head.weight.T  # independent recomputation of the linear gate
    expected = {"softmax": torch.softmax(logits, -1), "sigmoid": torch.sigmoid(logits), "identity": logits}[kind]
    torch.testing.assert_close(routing.scores_NE, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routing.weight_M, expected[routing.token_M, routing.expert_M], rtol=1e-5, atol=1e-6)
    if kind == "softmax":  # two of six softmax probabilities never sum to one
        sums = torch.zeros(x.shape[0]).index_add_(0, routing.token_M, routing.weight_M.detach())
        assert (sums < 1 - 1e-3).all()
    # weights are differentiable with respect to the gate
    routing.weight_M.sum().backward()
    assert router.gate.net.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_normalize_makes_weights_sum_to_scale(kind: str, scale: float) -> None:
    plain = _router(score=kind, top_k=3, scale=scale)
    normed = _router(score=kind, top_k=3, scale=scale, normalize=True)
    x, ctx = _tokens(seed=2)
    r_plain, r_norm = plain(x, ctx), normed(x, ctx)
    N = x.shape[0]
    sums = torch.zeros(N).index_add_(0, r_norm.token_M, r_norm.weight_M.detach())
    torch.testing.assert_close(sums, torch.full((N,), scale), rtol=1e-5, atol=1e-5)
    # same selection; unnormalised weights are scale * score
    assert torch.equal(r_plain.expert_M, r_norm.expert_M)
    torch.testing.assert_close(
        r_plain.weight_M, scale * r_plain.scores_NE[r_plain.token_M, r_plain.expert_M], rtol=1e-5, atol=1e-6
    )
    plain_sums = torch.zeros(N).index_add_(0, r_plain.token_M, r_plain.weight_M.detach())
    assert not torch.allclose(plain_sums, torch.full((N,), scale), atol=1e-3)


def test_selection_bias_changes_selection_not_weights() -> None:
    biased = _router(selection_bias=True, top_k=2, score="softmax")
    x, ctx = _tokens(seed=3)
    before = biased(x, ctx)
    assert (before.expert_M == 4).sum() < x.shape[0]  # without bias expert 4 is not everybody's pick
    with torch.no_grad():
        biased.bias_E[4] = 100.0
    after = biased(x, ctx)
    N = x.shape[0]
    table = _per_token(after)
    assert all(4 in table[i] for i in range(N)), "the biased expert must be chosen by every token"
    unbiased_scores = torch.softmax(x @ biased.gate.net.head.weight.T, -1)
    for i in range(N):
        for e, w in table[i].items():
            assert w == pytest.approx(unbiased_scores[i, e].item(), rel=1e-5, abs=1e-7)
    assert after.weight_M.max() < 1.0  # a weight of 100+score would mean the bias leaked in
    # the raw scores reported for diagnostics exclude the bias too
    torch.testing.assert_close(after.scores_NE, before.scores_NE)


def test_bias_buffers_only_with_selection_bias() -> None:
    plain = _router()
    assert not hasattr(plain, "bias_E")
    plain.train()
    x, ctx = _tokens()
    plain(x, ctx)
    plain.after_optimizer_step()  # no-op, no error
    biased = _router(selection_bias=True)
    assert "bias_E" in biased.state_dict() and "step_load_E" not in biased.state_dict()
    assert not any(n == "bias_E" for n, _ in biased.named_parameters())  # never trained by SGD


def _max_vio(load_E: torch.Tensor) -> float:
    load = load_E.float()
    return (load.max() / load.mean() - 1).item()


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_aux_loss_free_update_balances_an_overloaded_expert(kind: str) -> None:
    gamma = 0.02
    router = _router(seed=4, selection_bias=True, bias_update_rate=gamma, top_k=1, score=kind)
    with torch.no_grad():  # gate strongly prefers expert 0: logit_0 = 3 + noise, others noise
        w = router.gate.net.head.weight
        w.normal_(0, 0.5)
        w[:, 0] = 0.0
        w[0, 0] = 3.0
    gen = torch.Generator().manual_seed(5)

    def batch(n: int):
        x = torch.randn(n, D, generator=gen) * 0.5
        x[:, 0] = 1.0  # the feature only expert 0 reads
        return x, _ctx(1, n, cond=False)

    eval_batch = batch(1024)
    router.eval()
    initial = _max_vio(router(*eval_batch).load_E())
    assert initial > 3.0  # MaxVio = E - 1 = 5 when everything goes to one expert
    router.train()
    history = []
    for step in range(100):
        history.append(_max_vio(router(*batch(128)).load_E()))
        router.after_optimizer_step()
        if step == 0:  # the overloaded expert's bias went down, the idle ones' up
            assert router.bias_E[0].item() == pytest.approx(-gamma)
            assert router.bias_E.max().item() == pytest.approx(gamma)
    router.eval()
    final = _max_vio(router(*eval_batch).load_E())
    assert final < 0.25 * initial, (initial, final)
    assert sum(history[-20:]) / 20 < 0.25 * history[0], history
    # the rule does not centre b (all biases may drift together): only relative values matter
    assert router.bias_E[0] == router.bias_E.min()
    assert router.bias_E[0] < router.bias_E[1:].mean() - 10 * gamma
    assert torch.count_nonzero(router.step_load_E) == 0  # eval forwards do not count


def test_step_load_accumulates_over_micro_batches_and_resets() -> None:
    router = _router(seed=6, selection_bias=True, bias_update_rate=0.01, top_k=2)
    router.train()
    loads = []
    for seed in range(3):  # three micro-batches of one optimizer step
        x, ctx = _tokens(B=2, L=5, seed=10 + seed)
        loads.append(router(x, ctx).load_E())
    total = torch.stack(loads).sum(0).float()
    assert router.step_load_E.sum().item() == 3 * 2 * 5 * 2
    torch.testing.assert_close(router.step_load_E, total)
    router.eval()
    router(*_tokens(seed=20))  # eval forwards do not count
    torch.testing.assert_close(router.step_load_E, total)
    router.after_optimizer_step()
    expected_bias = 0.01 * torch.sign(total.mean() - total)
    torch.testing.assert_close(router.bias_E, expected_bias)
    assert torch.count_nonzero(router.bias_E) > 0
    assert torch.count_nonzero(router.step_load_E) == 0
    router.after_optimizer_step()  # an empty step moves every bias up by gamma * sign(0) = 0
    torch.testing.assert_close(router.bias_E, expected_bias)


def test_reduce_fn_receives_the_step_load_and_its_result_is_used() -> None:
    router = _router(seed=7, selection_bias=True, bias_update_rate=0.1, top_k=1)
    router.train()
    x, ctx = _tokens(seed=8)
    local = router(x, ctx).load_E().float()
    seen = []

    def reduce_fn(load_E: torch.Tensor) -> torch.Tensor:  # pretend another rank loaded expert 5 only
        seen.append(load_E.clone())
        out = load_E.clone()
        out[5] += 1000
        return out

    router.after_optimizer_step(reduce_fn)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], local)
    reduced = local.clone()
    reduced[5] += 1000
    torch.testing.assert_close(router.bias_E, 0.1 * torch.sign(reduced.mean() - reduced))
    assert router.bias_E[5] == pytest.approx(-0.1)
    assert torch.count_nonzero(router.step_load_E) == 0


def test_switch_balance_uniform_and_collapsed() -> None:
    N = 24
    uniform = switch_balance(torch.zeros(N, E), torch.arange(N) % E)
    assert uniform.item() == pytest.approx(1.0, abs=1e-6)
    peaked = torch.full((N, E), -30.0)
    peaked[:, 0] = 30.0
    collapsed = switch_balance(peaked, torch.zeros(N, dtype=torch.int64))
    assert collapsed.item() == pytest.approx(E, rel=1e-4)
    # by hand: f = (3/4, 1/4, 0...), P̄ = softmax(logits) averaged
    logits = torch.randn(4, E, generator=torch.Generator().manual_seed(0))
    experts = torch.tensor([0, 0, 0, 1])
    p = torch.softmax(logits, -1).mean(0)
    assert switch_balance(logits, experts).item() == pytest.approx(E * (0.75 * p[0] + 0.25 * p[1]).item(), rel=1e-5)
    # differentiable through P̄ only
    logits.requires_grad_(True)
    switch_balance(logits, experts).backward()
    assert logits.grad.abs().sum() > 0


def test_z_loss_known_values() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4 = 2 log 2 -> mean of squares = (1 + 4) / 2 * log(2)^2
    assert router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2.0) ** 2, rel=1e-6)
    assert router_z_loss(torch.full((3, 4), 5.0)).item() == pytest.approx((5.0 + math.log(4.0)) ** 2, rel=1e-6)


def test_router_aux_losses_match_the_functions() -> None:
    router = _router(seed=9, top_k=2, score="sigmoid")
    x, ctx = _tokens(seed=9)
    routing = router(x, ctx)
    logits = x @ router.gate.net.head.weight.T
    torch.testing.assert_close(routing.aux["balance"], switch_balance(logits, routing.expert_M))
    torch.testing.assert_close(routing.aux["z"], router_z_loss(logits))
    assert routing.aux["balance"].requires_grad and routing.aux["z"].requires_grad


def test_score_unknown_kind() -> None:
    with pytest.raises(ValueError, match="softmax"):
        score(torch.zeros(2, 3), "relu")


@pytest.mark.parametrize("gate", ["linear", "mlp", "cross_attn"])
def test_gates_run_in_float32_under_bf16_autocast(gate: str) -> None:
    torch.manual_seed(10)
    g = Gate(D, E, RouterConfig(gate=gate, gate_heads=2))
    x, ctx = _tokens(B=2, L=4, seed=11)
    reference = g(x, ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.Linear(D, E)(x).dtype == torch.bfloat16  # autocast is really on
        logits = g(x.bfloat16(), ctx)
        logits_fp32_in = g(x, ctx)
    assert logits.dtype == torch.float32 and logits_fp32_in.dtype == torch.float32
    torch.testing.assert_close(logits_fp32_in, reference, rtol=0, atol=0)  # not computed in bf16
    router = _router(gate=gate, gate_heads=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x.bfloat16(), ctx)
    assert routing.weight_M.dtype == torch.float32 and routing.scores_NE.dtype == torch.float32


def test_mlp_gate_hidden_width() -> None:
    assert Gate(D, E, RouterConfig(gate="mlp")).net.fc1.out_features == D
    net = Gate(D, E, RouterConfig(gate="mlp", gate_hidden=12)).net
    assert (net.fc1.out_features, net.head.out_features) == (12, E)


def test_cross_attn_gate_reads_its_own_samples_condition() -> None:
    torch.manual_seed(12)
    g = Gate(D, E, RouterConfig(gate="cross_attn", gate_heads=4))
    B, L = 4, 5
    x, ctx = _tokens(B=B, L=L, seed=13)
    base = g(x, ctx)
    cond = ctx.cond_BSD.clone()
    cond[1] = torch.randn(2, D)
    changed = g(x, RoutingContext(batch=B, seq_len=L, cond_BSD=cond))
    same = [0, 2, 3]
    rows = lambda b: slice(b * L, (b + 1) * L)  # noqa: E731
    for b in same:
        torch.testing.assert_close(changed[rows(b)], base[rows(b)])
    assert not torch.allclose(changed[rows(1)], base[rows(1)])


def test_cross_attn_gate_without_condition_raises() -> None:
    router = _router(gate="cross_attn")
    x, _ = _tokens(B=2, L=4)
    with pytest.raises(ValueError, match="cond"):
        router(x, RoutingContext(batch=2, seq_len=4))
    with pytest.raises(ValueError, match="gate_heads"):
        Gate(D, E, RouterConfig(gate="cross_attn", gate_heads=5))

"""Known answers for each router on hand-built inputs (docs/ROUTING_MATH.md §4): gates set by hand so that the
scores are exactly the tokens (linear gate with an identity head), or the pure functions called
directly and compared with loop-based evaluations of the formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moedit.config import RouterConfig
from moedit.moe.routers import build_router
from moedit.moe.routers.diffmoe import DiffMoERouter
from moedit.moe.routers.expert_choice import ExpertChoiceRouter
from moedit.moe.routers.promoe import ProMoERouter, routing_contrastive
from moedit.moe.routers.race import RaceRouter, race_mask, router_similarity
from moedit.moe.routers.topk import TopKRouter, limit_to_groups
from moedit.moe.routing import Routing, RoutingContext
from moedit.moe.threshold import StepThreshold


def _identity_gate(router: torch.nn.Module, scale: float = 1.0) -> None:
    """Linear gate head = scale·I (width = experts), so the logits are scale·x."""
    head = router.gate.net.head
    assert head.weight.shape[0] == head.weight.shape[1]
    with torch.no_grad():
        head.weight.copy_(scale * torch.eye(head.weight.shape[0]))


def _pairs(routing: Routing) -> set[tuple[int, int]]:
    return set(zip(routing.token_M.tolist(), routing.expert_M.tolist()))


def _weights(routing: Routing) -> dict[tuple[int, int], float]:
    triples = zip(routing.token_M.tolist(), routing.expert_M.tolist(), routing.weight_M.tolist())
    return {(i, e): w for i, e, w in triples}


def _ctx(batch: int, seq: int, **kw) -> RoutingContext:
    return RoutingContext(batch=batch, seq_len=seq, **kw)


# ----------------------------------------------------------------------------- expert choice (§4.2)


def test_expert_choice_hand_built_case() -> None:
    """E = 4, L = 8, capacity 1 → C = 2 per expert per sample. Logits 10·x with x one-hot patterns:
    token 0 is strong on experts 0 and 1, token 7 is all zeros (uniform 0.25) and loses everywhere."""
    router = ExpertChoiceRouter(4, 4, RouterConfig(name="expert_choice", gate="linear", capacity=1.0))
    _identity_gate(router, scale=10.0)
    rows = [[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
            [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    sample = torch.tensor(rows, dtype=torch.float32)
    x = torch.cat([sample, sample.flip(0)])  # sample 1: the same tokens in reverse order
    routing = router(x, _ctx(2, 8))
    expected = {0: {0, 1}, 1: {0, 2}, 2: {3, 4}, 3: {5, 6}}  # expert -> positions in sample 0
    want = {(i, e) for e, toks in expected.items() for i in toks}
    want |= {(8 + (7 - i), e) for (i, e) in want}  # the mirrored picks of sample 1
    assert _pairs(routing) == want
    per_token = routing.experts_per_token_N().tolist()
    assert per_token[7] == 0 and per_token[8] == 0, "the all-zero token gets no expert in either sample"
    assert per_token[0] == 2 and per_token[15] == 2
    scores = torch.softmax(10.0 * x, dim=-1)
    for (i, e), w in _weights(routing).items():
        assert w == pytest.approx(scores[i, e].item(), rel=1e-6)


@pytest.mark.parametrize("capacity, expected_C", [(1.0, 4), (2.0, 8), (0.5, 2), (1.3, 5)])
def test_expert_choice_takes_top_C_per_sample(capacity: float, expected_C: int) -> None:
    B, L, D, E = 3, 16, 12, 4  # C = floor(capacity·L/E)
    torch.manual_seed(0)
    router = build_router(D, E, RouterConfig(name="expert_choice", capacity=capacity))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B * L, D, generator=gen)
    x[L:2 * L] *= 5.0  # sample 1 much peakier: a global pool would favour it
    routing = router(x, _ctx(B, L))
    scores = torch.softmax(x @ router.gate.net.head.weight.T, dim=-1)
    pairs = _pairs(routing)
    for b in range(B):
        for e in range(E):
            taken = {i for (i, f) in pairs if f == e and b * L <= i < (b + 1) * L}
            assert len(taken) == expected_C, (b, e)
            top = set((scores[b * L:(b + 1) * L, e].topk(expected_C).indices + b * L).tolist())
            assert taken == top, (b, e)
    assert routing.load_E().tolist() == [B * expected_C] * E


# ----------------------------------------------------------------------------- race (§4.4)


def _race(top_k: int = 1, **kw) -> RaceRouter:
    router = RaceRouter(3, 3, RouterConfig(name="race", gate="linear", score="identity", top_k=top_k, **kw))
    _identity_gate(router)  # logits = x
    return router


def test_race_mask_keeps_the_global_top_K() -> None:
    S = torch.tensor([[9.0, 8.0, 7.0], [6.0, 1.0, 0.5], [0.1, 0.2, 0.3], [0.4, 0.0, -1.0]])
    (token_M, expert_M), tau = race_mask(S, K=4)
    assert set(zip(token_M.tolist(), expert_M.tolist())) == {(0, 0), (0, 1), (0, 2), (1, 0)}
    assert tau.item() == 6.0
    assert token_M.numel() == 4


def test_race_training_routing_threshold_and_eval() -> None:
    router = _race(top_k=1).train()
    S1 = torch.tensor([[9.0, 8.0, 7.0], [6.0, 1.0, 0.5], [0.1, 0.2, 0.3], [0.4, 0.0, -1.0]])
    routing = router(S1, _ctx(1, 4))
    # K = N·k = 4 assignments: token 0 takes all three experts, token 1 one, tokens 2 and 3 none
    assert routing.token_M.numel() == 4
    assert _pairs(routing) == {(0, 0), (0, 1), (0, 2), (1, 0)}
    assert routing.experts_per_token_N().tolist() == [3, 1, 0, 0]
    assert _weights(routing) == {(0, 0): 9.0, (0, 1): 8.0, (0, 2): 7.0, (1, 0): 6.0}  # identity weights
    assert router.threshold.value_X.item() == 0.0  # not folded in before the optimizer step
    router.after_optimizer_step()
    assert router.threshold.value_X.item() == pytest.approx(6.0)  # first update: the batch τ
    S2 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 2.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    router(S2, _ctx(2, 2))  # τ_batch = 4th largest = 2.5
    router.after_optimizer_step()
    beta = 0.99
    tau_hat = beta * 6.0 + (1 - beta) * 2.5
    assert router.threshold.value_X.item() == pytest.approx(tau_hat, rel=1e-6)
    # eval: M = [S ≥ τ̂], however many that is (here 5 ≠ N·k), a tie with τ̂ included
    router.eval()
    S3 = torch.tensor([[tau_hat, 10.0, 0.0], [tau_hat - 1e-3, 0.0, 0.0], [20.0, 30.0, 40.0], [0.0, 0.0, 0.0]])
    S3[0, 0] = router.threshold.value_X.item()  # exactly τ̂ in float32
    routing = router(S3, _ctx(1, 4))
    assert _pairs(routing) == {(0, 0), (0, 1), (2, 0), (2, 1), (2, 2)}
    assert router.threshold.value_X.item() == pytest.approx(tau_hat, rel=1e-6)  # eval does not observe


def test_race_without_ema_threshold_races_in_eval() -> None:
    router = _race(top_k=1, ema_threshold=False).eval()
    S = torch.tensor([[9.0, 8.0, 7.0], [6.0, 1.0, 0.5], [0.1, 0.2, 0.3], [0.4, 0.0, -1.0]])
    assert _pairs(router(S, _ctx(1, 4))) == {(0, 0), (0, 1), (0, 2), (1, 0)}
    assert router.threshold.step_count.item() == 0


def _similarity_by_loops(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """docs/ROUTING_MATH.md §4.4 evaluated entry by entry in float64."""
    N, E = logits.shape
    p = torch.softmax(logits.double(), dim=-1).tolist()
    m = mask.double().tolist()
    P = [[sum(p[i][e] * p[i][f] for i in range(N)) for f in range(E)] for e in range(E)]
    M = [[sum(m[i][e] * m[i][f] for i in range(N)) for f in range(E)] for e in range(E)]
    diag = sum(M[j][j] for j in range(E))
    off = sum(M[j][l] for j in range(E) for l in range(E) if j != l)
    total = 0.0
    for e in range(E):
        for f in range(E):
            if e == f:
                w = E * M[e][e] / diag if diag else 0.0
            else:
                w = (E * E - E) * M[e][f] / off if off else 0.0
            total += w * P[e][f]
    return total / N


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_router_similarity_matches_the_formula(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    N, E = 13, 5
    logits = torch.randn(N, E, generator=gen) * 2
    random_mask = torch.rand(N, E, generator=gen) < 0.4
    (tok, exp), _ = race_mask(logits, K=2 * N)
    race_selection = torch.zeros(N, E, dtype=torch.bool)
    race_selection[tok, exp] = True
    one_each = F.one_hot(logits.argmax(-1), E).bool()  # no co-selection: off-diagonal weights are 0
    for mask in (random_mask, race_selection, one_each):
        got = router_similarity(logits, mask).item()
        assert got == pytest.approx(_similarity_by_loops(logits, mask), rel=1e-5)
    # gradient flows to the logits, never through the (0/1) selection
    logits.requires_grad_(True)
    router_similarity(logits, random_mask).backward()
    assert logits.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- ProMoE (§4.5)


def _contrastive_direct(C: torch.Tensor, x: torch.Tensor, token_M, expert_M, tau: float) -> float:
    E = C.shape[0]
    groups = {e: [i for i, f in zip(token_M, expert_M) if f == e] for e in range(E)}
    V = [e for e in range(E) if groups[e]]
    if len(V) < 2:
        return 0.0
    means = {e: x[groups[e]].double().mean(0) for e in V}
    cos = lambda a, b: (a @ b / (a.norm() * b.norm())).item()  # noqa: E731
    total = 0.0
    for e in V:
        num = math.exp(cos(C[e].double(), means[e]) / tau)
        den = sum(math.exp(cos(C[e].double(), means[f]) / tau) for f in V)
        total += -math.log(num / den)
    return total / len(V)


def test_routing_contrastive_matches_the_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    E, D, N, tau = 5, 8, 20, 0.07
    C = torch.randn(E, D, generator=gen)
    x = torch.randn(N, D, generator=gen)
    token_M = list(range(N)) + [0, 3, 7]  # some tokens twice (top-2)
    expert_M = [[0, 1, 2, 4][j] for j in torch.randint(4, (len(token_M),), generator=gen).tolist()]  # expert 3 empty
    got = routing_contrastive(C, x, torch.tensor(token_M), torch.tensor(expert_M), tau)
    assert got.item() == pytest.approx(_contrastive_direct(C, x, token_M, expert_M, tau), rel=1e-5)
    # the empty expert takes no part: its prototype may be anything
    C2 = C.clone()
    C2[3] = torch.randn(D, generator=gen) * 100
    torch.testing.assert_close(routing_contrastive(C2, x, torch.tensor(token_M), torch.tensor(expert_M), tau), got)
    # differentiable in the prototypes and in the tokens (means are not detached)
    Cg, xg = C.clone().requires_grad_(True), x.clone().requires_grad_(True)
    routing_contrastive(Cg, xg, torch.tensor(token_M), torch.tensor(expert_M), tau).backward()
    assert Cg.grad[[0, 1, 2, 4]].abs().sum(-1).min() > 0 and Cg.grad[3].abs().sum() == 0
    assert xg.grad.abs().sum() > 0
    # fewer than two non-empty experts (or none): zero
    for tokens, experts in (([0, 1, 2], [2, 2, 2]), ([], [])):
        value = routing_contrastive(C, x, torch.tensor(tokens, dtype=torch.int64),
                                    torch.tensor(experts, dtype=torch.int64), tau)
        assert value.item() == 0.0


def test_promoe_null_tokens_go_to_the_unconditional_expert_only() -> None:
    E, D, B, L = 3, 6, 4, 5
    torch.manual_seed(0)
    router = ProMoERouter(D, E, RouterConfig(name="promoe", top_k=1))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B * L, D, generator=gen)
    null = 10
    labels = torch.tensor([2, null, 7, null])
    routing = router(x, _ctx(B, L, labels_B=labels, null_label=null))
    assert routing.num_experts == E + 1
    uncond_tokens = set(range(L, 2 * L)) | set(range(3 * L, 4 * L))
    for i, e, w in zip(routing.token_M.tolist(), routing.expert_M.tolist(), routing.weight_M.tolist()):
        if i in uncond_tokens:
            assert e == E and w == 1.0
        else:
            assert e != E, "a conditional token went to the unconditional expert"
    assert routing.experts_per_token_N().tolist() == [1] * (B * L)
    # the contrastive loss sees conditional tokens only
    x2 = x.clone()
    x2[sorted(uncond_tokens)] = torch.randn(len(uncond_tokens), D, generator=gen) * 50
    torch.testing.assert_close(router(x2, _ctx(B, L, labels_B=labels, null_label=null)).aux["contrastive"],
                               routing.aux["contrastive"])


def test_promoe_prototypical_routing_is_argmax_cosine() -> None:
    E, D, N = 4, 6, 24
    router = ProMoERouter(D, E, RouterConfig(name="promoe", top_k=1))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        router.prototypes_ED.copy_(torch.randn(E, D, generator=gen) * 3)
    x = torch.randn(N, D, generator=gen)
    routing = router(x, _ctx(2, N // 2, labels_B=torch.tensor([1, 2]), null_label=10))
    assert routing.token_M.tolist() == list(range(N))  # each conditional token exactly once, in order
    for i in range(N):
        cos = [F.cosine_similarity(x[i], router.prototypes_ED[e], dim=0).item() for e in range(E)]
        best = max(range(E), key=lambda e: cos[e])
        assert routing.expert_M[i].item() == best
        assert routing.weight_M[i].item() == pytest.approx(cos[best], abs=1e-6)  # identity score
    # softmax score, top-2: the two best cosines, weight = softmax over the cosines
    router2 = ProMoERouter(D, E, RouterConfig(name="promoe", top_k=2, score="softmax"))
    with torch.no_grad():
        router2.prototypes_ED.copy_(router.prototypes_ED)
    routing2 = router2(x, _ctx(1, N))
    cos_NE = F.normalize(x, dim=-1) @ F.normalize(router.prototypes_ED.detach(), dim=-1).T
    soft = torch.softmax(cos_NE, dim=-1)
    for i in range(N):
        assert {e for (t, e) in _pairs(routing2) if t == i} == set(cos_NE[i].topk(2).indices.tolist())
    for (i, e), w in _weights(routing2).items():
        assert w == pytest.approx(soft[i, e].item(), rel=1e-5)


@pytest.mark.parametrize("labels", [[1, 10, 3], [10, 10, 10], [4, 5, 6], [10]], ids=["mixed", "all-null", "no-null", "one"])
def test_promoe_top1_fast_path_agrees_with_the_general_path(labels) -> None:
    """The sync-free k = 1 path (torch.where) against the nonzero() split: same assignments and weights,
    same layer output, contrastive loss and gradients; all-null and single-sample batches included."""
    from moedit.moe.dispatch import dispatch
    from moedit.moe.experts import StackedExperts

    E, D, L = 4, 6, 5
    torch.manual_seed(3)
    router = ProMoERouter(D, E, RouterConfig(name="promoe", top_k=1))
    experts = StackedExperts(E + 1, D, 8)
    x = torch.randn(len(labels) * L, D)
    ctx = _ctx(len(labels), L, labels_B=torch.tensor(labels), null_label=10)

    def run(fast: bool):
        router.zero_grad()
        experts.zero_grad()
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", enabled=False):
            cos_NE = F.normalize(xg, dim=-1) @ F.normalize(router.prototypes_ED, dim=-1).T
        weights_NE = cos_NE  # identity score
        uncond_N = ctx.null_tokens_N(x.device)
        r = router._route_top1(xg, cos_NE, weights_NE, uncond_N) if fast else router._route(xg, cos_NE, weights_NE, uncond_N, 1)
        y = dispatch(xg, r, experts, "loop")
        ((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + r.aux["contrastive"]).backward()
        return r, y.detach(), xg.grad, router.prototypes_ED.grad.clone(), experts.w1_EDH.grad.clone()

    fast, slow = run(True), run(False)
    assert _weights(fast[0]) == pytest.approx(_weights(slow[0]))
    torch.testing.assert_close(fast[0].aux["contrastive"], slow[0].aux["contrastive"])
    for got, want in zip(fast[1:], slow[1:]):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- DiffMoE (§4.3)


def test_diffmoe_training_global_pool_bce_and_threshold() -> None:
    E, B, L = 4, 2, 8
    N = B * L
    router = DiffMoERouter(E, E, RouterConfig(name="diffmoe", gate="linear", capacity=1.0))
    _identity_gate(router, scale=5.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, E, generator=gen) * 0.1
    x[:L, 0] += 3.0  # every token of sample 0 prefers expert 0 strongly
    router.train()
    routing = router(x, _ctx(B, L))
    C = int(1.0 * N / E)  # 4
    scores = torch.softmax(5.0 * x, dim=-1)
    mask = torch.zeros(N, E)
    for e in range(E):
        taken = {i for (i, f) in _pairs(routing) if f == e}
        assert len(taken) == C
        assert taken == set(scores[:, e].topk(C).indices.tolist())
        mask[sorted(taken), e] = 1.0
    assert all(i < L for (i, e) in _pairs(routing) if e == 0), "expert 0 takes all its tokens from sample 0"
    for (i, e), w in _weights(routing).items():
        assert w == pytest.approx(scores[i, e].item(), rel=1e-6)
    pred = router.predictor(x)
    torch.testing.assert_close(routing.aux["capacity"], F.binary_cross_entropy_with_logits(pred, mask))
    assert router.threshold.value_X.tolist() == [0.0] * E  # DiffMoE's threshold starts at 0 ...
    router.after_optimizer_step()
    kth = torch.sigmoid(pred.detach()).topk(C, dim=0).values[-1]
    torch.testing.assert_close(router.threshold.value_X, 0.05 * kth)  # ... and blends in 5% of each step's value
    router.threshold.observe(kth)
    router.after_optimizer_step()
    torch.testing.assert_close(router.threshold.value_X, 0.95 * 0.05 * kth + 0.05 * kth)
    # eval: exactly {(i, e): σ(pred)_ie > θ_e}, any number per expert, weights = gate scores
    router.eval()
    x_eval = torch.randn(10, E, generator=gen)
    prob = torch.sigmoid(router.predictor(x_eval)).detach()
    with torch.no_grad():  # put θ_1 exactly on one probability: strictly greater excludes it
        router.threshold.value_X[1] = prob[3, 1]
    theta = router.threshold.value_X
    routing = router(x_eval, _ctx(1, 10))
    want = {(i, e) for i in range(10) for e in range(E) if prob[i, e] > theta[e]}
    assert _pairs(routing) == want and (3, 1) not in want
    eval_scores = torch.softmax(5.0 * x_eval, dim=-1)
    for (i, e), w in _weights(routing).items():
        assert w == pytest.approx(eval_scores[i, e].item(), rel=1e-6)


# ----------------------------------------------------------------------------- group-limited top-k (§4.1, §4.6)


def test_group_limited_topk_skips_the_best_expert_of_a_weak_group() -> None:
    # groups {0, 1} and {2, 3}: group scores 0.9 + 0.0 = 0.9 < 0.6 + 0.5 = 1.1
    S = torch.tensor([[0.9, 0.0, 0.6, 0.5], [0.1, 0.2, 0.3, 0.35]])
    limited = limit_to_groups(S, num_groups=2, top_groups=1)
    assert torch.isinf(limited[0, :2]).all() and torch.equal(limited[0, 2:], S[0, 2:])
    for k, want in ((1, [{2}, {3}]), (2, [{2, 3}, {2, 3}])):
        plain = TopKRouter(4, 4, RouterConfig(gate="linear", score="identity", top_k=k))
        grouped = TopKRouter(4, 4, RouterConfig(gate="linear", score="identity", top_k=k, num_groups=2, top_groups=1))
        _identity_gate(plain)
        _identity_gate(grouped)
        r = grouped(S, _ctx(1, 2))
        assert [{e for (t, e) in _pairs(r) if t == i} for i in range(2)] == want, k
        assert _weights(r)[(0, 2)] == pytest.approx(0.6)  # weight = its own score
        assert 0 in {e for (t, e) in _pairs(plain(S, _ctx(1, 2))) if t == 0}  # without groups expert 0 wins
    # groups of one expert: a group scores its only expert, so it is plain top-k
    assert torch.equal(limit_to_groups(S, num_groups=4, top_groups=2).isinf(), torch.tensor(
        [[False, True, False, True], [True, True, False, False]]))
    # the selection bias takes part in the group choice
    biased = TopKRouter(4, 4, RouterConfig(gate="linear", score="identity", top_k=1, num_groups=2, top_groups=1,
                                           selection_bias=True))
    _identity_gate(biased)
    with torch.no_grad():
        biased.bias_E[1] = 0.5  # group {0, 1}: 0.9 + 0.5 = 1.4 > 1.1
    r = biased(S[:1], _ctx(1, 1))
    assert _pairs(r) == {(0, 0)} and _weights(r)[(0, 0)] == pytest.approx(0.9)  # bias never in the weight


# ----------------------------------------------------------------------------- StepThreshold


def test_step_threshold_no_update_without_observations() -> None:
    th = StepThreshold(3, decay=0.9, initial=0.25)
    calls = []
    th.update(lambda t: calls.append(t) or t)
    assert th.value_X.tolist() == [0.25] * 3 and th.updates.item() == 0 and calls == []
    th.observe(torch.tensor([1.0, 2.0, 3.0]))
    th.update()
    th.update()  # a second step that observed nothing changes nothing
    assert th.value_X.tolist() == [1.0, 2.0, 3.0] and th.updates.item() == 1


def test_step_threshold_averages_observations_within_a_step() -> None:
    th = StepThreshold(2, decay=0.9)
    for v in ([1.0, 10.0], [2.0, 20.0], [6.0, 60.0]):  # three micro-batches of one step
        th.observe(torch.tensor(v))
    th.update()
    torch.testing.assert_close(th.value_X, torch.tensor([3.0, 30.0]))  # first update: the step mean
    th.observe(torch.tensor([5.0, 0.0]))
    th.observe(torch.tensor([7.0, 2.0]))
    th.update()
    torch.testing.assert_close(th.value_X, torch.tensor([0.9 * 3.0 + 0.1 * 6.0, 0.9 * 30.0 + 0.1 * 1.0]))
    assert th.step_count.item() == 0 and torch.count_nonzero(th.step_sum_X) == 0


def test_step_threshold_reduce_fn_gets_sums_then_count() -> None:
    th = StepThreshold(2, decay=0.5)
    th.observe(torch.tensor([1.0, 4.0]))
    th.observe(torch.tensor([3.0, 8.0]))
    seen = []

    def reduce_fn(packed: torch.Tensor) -> torch.Tensor:  # another rank observed [10, 0] twice
        seen.append(packed.clone())
        return packed + torch.tensor([20.0, 0.0, 2.0])

    th.update(reduce_fn)
    assert len(seen) == 1 and seen[0].tolist() == [4.0, 12.0, 2.0]  # [sum..., count]
    torch.testing.assert_close(th.value_X, torch.tensor([24.0 / 4, 12.0 / 4]))

"""The contract every registered router keeps (docs/ROUTING_MATH.md §4-5, docs/ARCHITECTURE.md):
well-formed assignments, float32 routing math under bf16 autocast, determinism, eval() that moves no
statistic, eval outputs independent of the batch, finite training, a gradient path for each named
auxiliary loss, and one shared dispatcher whose backends agree.

Parametrised over `ROUTERS`, so a router added to the registry is covered at once with its default
settings; VARIANTS adds settings that exercise each router's options (gates, scores, selection bias,
group-limited routing, capacities)."""

from __future__ import annotations

import pytest
import torch

from moedit.config import RouterConfig, default_aux_weights, from_dict

DEFAULT_AUX_WEIGHTS = default_aux_weights()  # every registered router's losses
from moedit.models import build_model
from moedit.models.dit import DiT
from moedit.moe import layer as layer_module
from moedit.moe.dispatch import dispatch
from moedit.moe.experts import StackedExperts
from moedit.moe.routers import ROUTERS, build_router, extra_experts
from moedit.moe.routing import Routing, RoutingContext
from moedit.objectives.rectified_flow import RectifiedFlow
from moedit.samplers.guidance import classifier_free_guidance

from model_helpers import wake_up  # tests/model_helpers.py

D, E, P = 32, 4, 4  # width, routed experts, patchified target width
B, L = 3, 8  # samples, tokens per sample (router-level tests)
NUM_CLASSES = 10
NULL = NUM_CLASSES  # the null label (classifier-free guidance)

VARIANTS: dict[str, list[dict]] = {
    "topk": [
        {},
        {"gate": "mlp", "score": "sigmoid"},
        {"gate": "cross_attn", "gate_heads": 2},
        {"selection_bias": True, "bias_update_rate": 0.05, "num_groups": 2, "top_groups": 1,
         "score": "sigmoid", "normalize": True, "scale": 2.5},
    ],
    "expert_choice": [{}, {"gate": "mlp", "capacity": 1.5}],
    "diffmoe": [{}, {"gate": "mlp", "top_k": 1}],
    "race": [{}, {"score": "softmax"}, {"gate": "linear", "score": "sigmoid", "top_k": 1}],
    "promoe": [{}, {"top_k": 2, "score": "softmax"}],
    "promoe_ec": [{}, {"top_k": 2, "score": "softmax"}],
}

# what each auxiliary loss must train (docs/ROUTING_MATH.md §4-5): (parameter prefixes of which EVERY parameter
# gets a non-zero gradient, prefixes that must get none, whether the loss reaches the input tokens)
AUX_PATHS: dict[str, tuple[tuple[str, ...], tuple[str, ...], bool]] = {
    "balance": (("gate.",), ("predictor.", "target_head."), True),
    "z": (("gate.",), ("predictor.", "target_head."), True),
    "similarity": (("gate.",), ("predictor.", "target_head."), True),
    "capacity": (("predictor.",), ("gate.", "target_head.", "prototypes_ED"), False),  # detached input
    "plr": (("target_head.",), ("predictor.", "gate.net.head."), True),
    "contrastive": (("prototypes_ED",), (), True),
}


def _case_id(name: str, kw: dict) -> str:
    return name + ("" if not kw else "-" + "-".join(f"{k}={v}" for k, v in kw.items()))


CASES = [pytest.param(name, kw, id=_case_id(name, kw)) for name in ROUTERS for kw in VARIANTS.get(name, [{}])]


def test_variants_name_registered_routers() -> None:
    assert set(VARIANTS) <= set(ROUTERS), "VARIANTS names a router that is not in the registry"


# ----------------------------------------------------------------------------- helpers


def _router(name: str, kw: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_router(D, E, RouterConfig(name=name, **kw), target_dim=P)


def _batch(seed: int = 0, batch: int = B, x_grad: bool = False) -> tuple[torch.Tensor, RoutingContext]:
    """Tokens of `batch` samples; sample 1 carries the null label (CFG-dropped), the others real ones."""
    gen = torch.Generator().manual_seed(seed)
    x_ND = torch.randn(batch * L, D, generator=gen)
    labels_B = torch.randint(NUM_CLASSES, (batch,), generator=gen)
    if batch > 1:
        labels_B[1] = NULL
    ctx = RoutingContext(batch=batch, seq_len=L, cond_BSD=torch.randn(batch, 2, D, generator=gen),
                         labels_B=labels_B, null_label=NULL, target_BLP=torch.randn(batch, L, P, generator=gen))
    return x_ND.requires_grad_(x_grad), ctx


def _warm_router(router: torch.nn.Module, steps: int = 2) -> None:
    """A few training forwards and optimizer-step hooks, so thresholds and biases leave their initial values."""
    router.train()
    for s in range(steps):
        router(*_batch(seed=100 + s))
        if hasattr(router, "after_optimizer_step"):
            router.after_optimizer_step()


def _num_routed(name: str) -> int:
    return E + extra_experts(name)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer (persistent or not) and parameter, cloned."""
    out = {f"buffer:{n}": b.detach().clone() for n, b in module.named_buffers()}
    out.update({f"param:{n}": p.detach().clone() for n, p in module.named_parameters()})
    return out


def _assert_same_state(before: dict, after: dict, what: str) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{what} changed: {changed}"


def _model(name: str, kw: dict, seed: int = 0, **model) -> DiT:
    """A micro MoE-DiT (8x8 images, patch 2: L = 16) built through from_dict, so the config is validated."""
    cfg = from_dict({"model": {
        "preset": "micro", "image_size": 8, "patch_size": 2, "class_dropout": 0.25, **model,
        "moe": {"num_experts": E, "expert_ratio": 1.0, "num_shared": 1 if name.startswith("promoe") else 0,
                "router": {"name": name, **kw}},
    }}).model
    torch.manual_seed(seed)
    return build_model(cfg)


def _images(batch: int, seed: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=gen) * scale
    return x, torch.rand(batch, generator=gen), torch.randint(NUM_CLASSES, (batch,), generator=gen)


def _train_steps(model: DiT, steps: int, seed: int = 0, batch: int = 8, amp: bool = False) -> list[dict]:
    """The trainer's step without the Trainer: RF loss + Σ default weight · aux, AdamW, router hooks."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    flow, gen = RectifiedFlow(), torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps):
        x0, _, y = _images(batch, seed=1000 * seed + step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _ = flow.loss(model, x0, y, generator=gen, pass_target=model.wants_target)
            aux = model.aux_losses()
            total = loss.float() + sum((DEFAULT_AUX_WEIGHTS[n] * v.float() for n, v in aux.items()), torch.zeros(()))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        model.after_optimizer_step()
        history.append({"loss": loss.detach(), "total": total.detach(), **{k: v.detach() for k, v in aux.items()}})
    return history


def _pairs(routing: Routing) -> torch.Tensor:
    return routing.token_M * routing.num_experts + routing.expert_M


# ----------------------------------------------------------------------------- well-formed assignments


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name, kw", CASES)
def test_assignments_are_well_formed(name: str, kw: dict, mode: str) -> None:
    router = _router(name, kw)
    if mode == "eval":
        _warm_router(router)
        router.eval()
    else:
        router.train()
    x, ctx = _batch(seed=1)
    routing = router(x, ctx)
    N, E_all = B * L, _num_routed(name)
    assert isinstance(routing, Routing)
    assert routing.num_tokens == N and routing.num_experts == E_all
    M = routing.token_M.shape[0]
    assert M > 0, "nobody was routed"
    assert routing.token_M.shape == routing.expert_M.shape == routing.weight_M.shape == (M,)
    assert routing.token_M.dtype == routing.expert_M.dtype == torch.int64
    assert 0 <= routing.token_M.min() and routing.token_M.max() < N
    assert 0 <= routing.expert_M.min() and routing.expert_M.max() < E_all
    assert routing.weight_M.dtype == torch.float32 and torch.isfinite(routing.weight_M).all()
    assert torch.unique(_pairs(routing)).numel() == M, "a (token, expert) pair is listed twice"
    assert routing.load_E().shape == (E_all,) and routing.load_E().sum() == M
    if routing.per_token is not None:  # the promise dispatch's reshape-and-sum combine relies on
        torch.testing.assert_close(routing.token_M, torch.arange(N).repeat_interleave(routing.per_token))
    assert routing.experts_per_token_N().shape == (N,)
    if "load_E" in routing.stats:
        assert torch.equal(routing.stats["load_E"], routing.load_E())
    assert routing.scores_NE is not None and routing.scores_NE.shape[0] == N
    assert not routing.scores_NE.requires_grad and torch.isfinite(routing.scores_NE).all()
    for aux_name, value in routing.aux.items():
        assert aux_name in DEFAULT_AUX_WEIGHTS, f"{name} emits aux {aux_name!r} without a default weight"
        assert value.shape == () and torch.isfinite(value), aux_name


# ----------------------------------------------------------------------------- float32 under autocast


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name, kw", CASES)
def test_scores_and_weights_float32_under_bf16_autocast(name: str, kw: dict, mode: str) -> None:
    router = _router(name, kw)
    _warm_router(router)
    router.train(mode == "train")
    x, ctx = _batch(seed=2)
    x_bf16 = x.bfloat16()
    reference = router(x_bf16.float(), ctx)  # the same input, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(x, torch.ones(3, D)).dtype == torch.bfloat16  # autocast is on
        routing = router(x_bf16, ctx)
    assert routing.scores_NE.dtype == torch.float32 and routing.weight_M.dtype == torch.float32
    # the routing math ran in float32: the same decisions and weights as without autocast
    assert torch.equal(routing.token_M, reference.token_M) and torch.equal(routing.expert_M, reference.expert_M)
    torch.testing.assert_close(routing.scores_NE, reference.scores_NE, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(routing.weight_M, reference.weight_M, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, kw", CASES)
def test_aux_losses_float32_under_bf16_autocast(name: str, kw: dict) -> None:
    router = _router(name, kw).train()
    x, ctx = _batch(seed=3)
    x_bf16 = x.bfloat16()
    reference = router(x_bf16.float(), ctx).aux
    with torch.autocast("cpu", dtype=torch.bfloat16):
        aux = router(x_bf16, ctx).aux
    assert aux.keys() == reference.keys()
    for aux_name, value in aux.items():
        assert value.dtype == torch.float32, (aux_name, value.dtype)
        torch.testing.assert_close(value, reference[aux_name], rtol=1e-5, atol=1e-7, msg=aux_name)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name, kw", CASES)
def test_deterministic_under_a_seed(name: str, kw: dict) -> None:
    a, b = _router(name, kw, seed=5), _router(name, kw, seed=5)
    for mode in ("train", "eval"):
        if mode == "eval":
            _warm_router(a)
            _warm_router(b)
        a.train(mode == "train")
        b.train(mode == "train")
        ra, rb = a(*_batch(seed=6)), b(*_batch(seed=6))
        for field in ("token_M", "expert_M", "weight_M", "scores_NE"):
            assert torch.equal(getattr(ra, field), getattr(rb, field)), (mode, field)
        assert ra.aux.keys() == rb.aux.keys()
        for key in ra.aux:
            assert torch.equal(ra.aux[key], rb.aux[key]), (mode, key)
    other = _router(name, kw, seed=7)
    assert not torch.equal(other(*_batch(seed=6)).scores_NE, ra.scores_NE), "the seed did not matter"


# ----------------------------------------------------------------------------- eval() mutates nothing


@pytest.mark.parametrize("name, kw", CASES)
def test_eval_mutates_no_statistics_or_thresholds(name: str, kw: dict) -> None:
    router = _router(name, kw)
    _warm_router(router)
    model = wake_up(_model(name, kw))
    _train_steps(model, steps=2)
    for module, forward in (
        (router, lambda: (router(*_batch(seed=8)), router(*_batch(seed=9, batch=1)))),
        (model, lambda: (model(*_images(5, seed=8)), model(*_images(1, seed=9)))),
    ):
        before = _state(module)
        module.eval()
        with torch.no_grad():
            forward()
        _assert_same_state(before, _state(module), f"{name}: an eval forward")
        hook = getattr(module, "after_optimizer_step", None)  # a step hook after eval forwards only
        if hook is not None:
            hook()
        _assert_same_state(before, _state(module), f"{name}: after_optimizer_step after eval forwards")


# ----------------------------------------------------------------------------- batch independence in eval


@pytest.fixture(scope="module")
def trained_models() -> dict:
    """A cache, shared by the batch-independence tests, of the models `_trained` builds."""
    return {}


def _trained(cache: dict, name: str, kw: dict) -> DiT:
    """A micro model with random adaLN/output layers, trained 2 steps (thresholds moved), in eval()."""
    key = _case_id(name, kw)
    if key not in cache:
        m = wake_up(_model(name, kw))
        _train_steps(m, steps=2, seed=1)
        cache[key] = m.eval()
    return cache[key]


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=what)


@pytest.mark.parametrize("name, kw", CASES)
def test_eval_output_independent_of_the_batch(name: str, kw: dict, trained_models: dict) -> None:
    model = _trained(trained_models, name, kw)
    x1, t1, y1 = _images(1, seed=20)
    with torch.no_grad():
        alone = model(x1, t1, y1)
        null_alone = model(x1, t1, torch.full_like(y1, NULL))
        assert alone.abs().max() > 1e-3  # the check below is not trivially true on a zero output
        for layer in model.moe_layers():  # eval routing is not degenerate
            assert 0 < layer.last_routing.token_M.numel()
        # inside a larger random batch (other samples larger, some with the null label), at position 3
        xs, ts, ys = _images(6, seed=21, scale=3.0)
        ys[1] = NULL
        xb, tb, yb = (torch.cat([v[:3], w, v[3:]]) for v, w in ((xs, x1), (ts, t1), (ys, y1)))
        _close(model(xb, tb, yb)[3:4], alone, f"{name}: sample inside a batch of 7")
        # inside a CFG-doubled batch: conditional then null-label copy
        doubled = model(torch.cat([x1, x1]), torch.cat([t1, t1]), torch.cat([y1, torch.full_like(y1, NULL)]))
        _close(doubled[:1], alone, f"{name}: conditional half of a CFG batch")
        _close(doubled[1:], null_alone, f"{name}: unconditional half of a CFG batch")
        scale = 1.0001
        guided = classifier_free_guidance(model, scale, NULL)(x1, t1, y1)
        _close(guided, null_alone + scale * (alone - null_alone), f"{name}: classifier_free_guidance")


def test_batch_independence_check_detects_a_batch_dependent_router(trained_models: dict) -> None:
    """Control: race without its EMA threshold runs the batch race in eval, which the check must catch."""
    model = _trained(trained_models, "race", {"ema_threshold": False})
    x1, t1, y1 = _images(1, seed=20)
    xs, ts, ys = _images(6, seed=21, scale=3.0)
    with torch.no_grad():
        alone = model(x1, t1, y1)
        in_batch = model(torch.cat([x1, xs]), torch.cat([t1, ts]), torch.cat([y1, ys]))[:1]
    assert (alone - in_batch).abs().max() > 1e-4


# ----------------------------------------------------------------------------- training stays finite


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, kw", CASES)
def test_two_training_steps_stay_finite(name: str, kw: dict, amp: bool) -> None:
    model = _model(name, kw)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = _train_steps(model, steps=2, amp=amp)
    for step, logs in enumerate(history):
        for key, value in logs.items():
            assert torch.isfinite(value).all(), f"{key} is not finite at step {step}"
    assert set(history[-1]) - {"loss", "total"} <= set(DEFAULT_AUX_WEIGHTS)
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"parameter {n} is not finite"
    for n, b in model.named_buffers():
        assert not b.is_floating_point() or torch.isfinite(b).all(), f"buffer {n} is not finite"
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()), "nothing trained"
    for layer in model.moe_layers():  # the routers' own parameters move too
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()
                   if n.startswith(_prefix(model, layer) + "router."))


def _prefix(model: DiT, layer) -> str:
    return next(n for n, m in model.named_modules() if m is layer) + "."


# ----------------------------------------------------------------------------- aux-loss gradient paths


@pytest.mark.parametrize("name, kw", CASES)
def test_each_aux_loss_trains_what_it_is_meant_to(name: str, kw: dict) -> None:
    router = _router(name, kw).train()
    x, ctx = _batch(seed=10, x_grad=True)
    routing = router(x, ctx)
    params = dict(router.named_parameters())
    assert routing.aux, f"{name} emits no auxiliary loss"
    for aux_name, value in routing.aux.items():
        grads = torch.autograd.grad(value, [*params.values(), x], allow_unused=True, retain_graph=True)
        moved = {n for n, g in zip(params, grads) if g is not None and g.abs().sum() > 0}
        x_grad = grads[-1] is not None and grads[-1].abs().sum() > 0
        if aux_name not in AUX_PATHS:  # a new loss: it must at least train something of the router
            assert moved, f"{name}'s aux {aux_name!r} trains none of the router's parameters"
            continue
        required, forbidden, reaches_x = AUX_PATHS[aux_name]
        for prefix in required:
            under = [n for n in params if n.startswith(prefix)]
            assert under, f"{name} has no parameter {prefix}* for {aux_name!r}"
            assert set(under) <= moved, f"{aux_name!r} does not reach {sorted(set(under) - moved)}"
        wrong = sorted(n for n in moved if n.startswith(forbidden))
        assert not wrong, f"{aux_name!r} reaches {wrong}"
        assert x_grad == reaches_x, f"{aux_name!r} {'does not reach' if reaches_x else 'reaches'} the tokens x"
        if aux_name == "capacity":  # the predictor's BCE trains the predictor and nothing else
            assert moved == {n for n in params if n.startswith("predictor.")}


@pytest.mark.parametrize("name, kw", CASES)
def test_combine_weights_train_the_scoring_parameters(name: str, kw: dict) -> None:
    router = _router(name, kw).train()
    x, ctx = _batch(seed=11)
    routing = router(x, ctx)
    params = dict(router.named_parameters())
    grads = torch.autograd.grad(routing.weight_M.sum(), list(params.values()), allow_unused=True)
    moved = {n for n, g in zip(params, grads) if g is not None and g.abs().sum() > 0}
    assert moved, f"{name}'s combine weights are not differentiable with respect to the router"
    assert not [n for n in moved if n.startswith(("predictor.", "target_head."))], moved


# ----------------------------------------------------------------------------- one shared dispatcher


@pytest.mark.parametrize("name, kw", CASES)
def test_every_router_runs_through_the_shared_dispatcher(name: str, kw: dict, monkeypatch) -> None:
    model = wake_up(_model(name, kw))
    state = {"inside": False, "calls": []}
    real_dispatch = layer_module.dispatch

    def counting_dispatch(x_ND, routing, experts, backend="auto"):
        state["calls"].append((routing, experts))
        state["inside"] = True
        try:
            return real_dispatch(x_ND, routing, experts, backend)
        finally:
            state["inside"] = False

    layers = model.moe_layers()
    for layer in layers:  # the layer executes its routing through dispatch_fn (moe.dispatch.dispatch here)
        assert layer.dispatch_fn is real_dispatch
        layer.dispatch_fn = counting_dispatch
    for layer in layers:  # routed experts may only run inside the dispatcher
        for method in ("forward", "forward_expert", "forward_chunks", "forward_grouped", "forward_all", "per_expert"):
            original = getattr(layer.experts, method)

            def guarded(*args, _original=original, _method=method, **kwargs):
                assert state["inside"], f"{name}: routed experts' {_method} ran outside the shared dispatcher"
                return _original(*args, **kwargs)

            monkeypatch.setattr(layer.experts, method, guarded)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        state["calls"].clear()
        x, t, y = _images(3, seed=12)
        model(x, t, y)
        assert len(state["calls"]) == len(layers), mode
        for layer, (routing, experts) in zip(layers, state["calls"]):
            assert routing is layer.last_routing and experts is layer.experts
            assert routing.num_experts == layer.experts.num_experts == _num_routed(name)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name, kw", CASES)
def test_loop_and_grouped_backends_agree_on_the_routers_routing(name: str, kw: dict, mode: str) -> None:
    router = _router(name, kw)
    if mode == "eval":
        _warm_router(router)
    router.train(mode == "train")
    torch.manual_seed(13)
    experts = StackedExperts(_num_routed(name), D, 32, "mlp")
    with torch.no_grad():
        experts.b1_EH.normal_()
        experts.b2_ED.normal_()
    x, ctx = _batch(seed=14, x_grad=True)
    routing = router(x, ctx)
    g = torch.randn(x.shape)
    inputs = [x, *experts.parameters(), *router.parameters()]
    results = {}
    for backend in ("loop", "grouped"):
        out = dispatch(x, routing, experts, backend)
        grads = torch.autograd.grad((out * g).sum(), inputs, allow_unused=True, retain_graph=True)
        results[backend] = (out.detach(), [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, grads)])
    (out_loop, grads_loop), (out_grouped, grads_grouped) = results["loop"], results["grouped"]
    torch.testing.assert_close(out_grouped, out_loop, rtol=1e-5, atol=1e-5)
    assert out_loop.abs().sum() > 0
    for i, (a, b) in enumerate(zip(grads_loop, grads_grouped)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"gradient of input {i}")
    router_grads = grads_loop[len(inputs) - len(list(router.parameters())):]
    assert grads_loop[0].abs().sum() > 0 and any(gr.abs().sum() > 0 for gr in router_grads)


def test_model_backends_agree_for_every_router() -> None:
    """The same model with `backend: loop` and `backend: grouped` gives the same output for every router."""
    for name in ROUTERS:
        outs = []
        for backend in ("loop", "grouped"):
            model = wake_up(_model(name, {}))
            model.cfg.moe.backend = backend  # the layers share this config object
            assert all(layer.cfg.backend == backend for layer in model.moe_layers())
            model.eval()
            with torch.no_grad():
                outs.append(model(*_images(3, seed=15)))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5, msg=name)

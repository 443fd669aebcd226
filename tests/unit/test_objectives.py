"""Objectives: rectified flow and DDPM formulas on known inputs, zero loss for oracle models, the
t distributions, the β schedules and the discrete-index → t mapping."""

from __future__ import annotations

import math

import pytest
import torch

from moedit.config import ObjectiveConfig
from moedit.objectives import OBJECTIVES, build_objective
from moedit.objectives.ddpm import DDPM, make_betas
from moedit.objectives.rectified_flow import RectifiedFlow
from moedit.objectives.timesteps import (
    logit_normal_time,
    random_index,
    sample_time,
    shift_time,
    standard_normal,
    uniform_time,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(B: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    x0_BCHW = torch.randn((B, 2, 4, 4), generator=_gen(123)).clamp(-1, 1)
    return x0_BCHW, torch.arange(B) % 3


# ----------------------------------------------------------------------------- registry


def test_build_objective_and_registry() -> None:
    assert set(OBJECTIVES) == {"rectified_flow", "ddpm"}
    assert isinstance(build_objective(ObjectiveConfig(name="rectified_flow")), RectifiedFlow)
    ddpm = build_objective(ObjectiveConfig(name="ddpm", ddpm_steps=50))
    assert isinstance(ddpm, DDPM) and ddpm.T == 50
    assert RectifiedFlow.prediction_kind == "velocity" and DDPM.prediction_kind == "epsilon"
    with pytest.raises(ValueError, match="rectified_flow, ddpm"):
        build_objective(ObjectiveConfig(name="edm"))


# ----------------------------------------------------------------------------- timesteps


def test_uniform_and_logit_normal_ranges() -> None:
    t_B = uniform_time(10_000, "cpu", _gen())
    assert t_B.dtype == torch.float32 and t_B.shape == (10_000,)
    assert 0 <= t_B.min() and t_B.max() < 1
    assert abs(t_B.mean().item() - 0.5) < 0.02
    t_B = logit_normal_time(10_000, "cpu", mean=0.0, std=1.0, generator=_gen())
    assert 0 < t_B.min() and t_B.max() < 1


@pytest.mark.parametrize("mean", [-1.0, 0.0, 0.5])
def test_logit_normal_median_is_sigmoid_of_mean(mean: float) -> None:
    t_B = logit_normal_time(20_000, "cpu", mean=mean, std=1.0, generator=_gen(1))
    assert abs(t_B.median().item() - 1 / (1 + math.exp(-mean))) < 0.01


def test_shift_is_monotone_identity_at_one_and_keeps_endpoints() -> None:
    t_B = torch.linspace(0, 1, 101)
    assert shift_time(t_B, 1.0) is t_B
    for shift in (0.5, 3.0):
        s_B = shift_time(t_B, shift)
        assert torch.all(s_B[1:] > s_B[:-1])
        assert s_B[0] == 0 and s_B[-1] == 1
    assert torch.all(shift_time(t_B[1:-1], 3.0) > t_B[1:-1])  # shift > 1 moves mass toward noise
    assert shift_time(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="t_shift"):
        shift_time(t_B, 0.0)


def test_sample_time_follows_config_and_seed() -> None:
    cfg = ObjectiveConfig(t_sampling="logit_normal", logit_mean=0.0, t_shift=3.0)
    a_B = sample_time(cfg, 5000, "cpu", _gen(7))
    assert torch.equal(a_B, sample_time(cfg, 5000, "cpu", _gen(7)))
    assert abs(a_B.median().item() - 0.75) < 0.02  # median maps through the monotone shift
    u_B = sample_time(ObjectiveConfig(t_sampling="uniform"), 5000, "cpu", _gen(7))
    assert abs(u_B.mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="uniform, logit_normal"):
        sample_time(ObjectiveConfig(t_sampling="beta"), 4, "cpu")


def test_random_draws_shapes_and_generator() -> None:
    eps = standard_normal((3, 1, 2, 2), "cpu", _gen(3))
    assert eps.shape == (3, 1, 2, 2) and eps.dtype == torch.float32
    assert torch.equal(eps, standard_normal(torch.Size([3, 1, 2, 2]), "cpu", _gen(3)))
    n_B = random_index(10, 1000, "cpu", _gen())
    assert n_B.dtype == torch.int64 and n_B.min() == 0 and n_B.max() == 9


# ----------------------------------------------------------------------------- rectified flow


def test_rectified_flow_interpolate_and_target_on_known_inputs() -> None:
    x0, eps = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 3.0)
    t_B = torch.tensor([0.25, 1.0])
    x_t = RectifiedFlow.interpolate(x0, eps, t_B)
    assert torch.allclose(x_t[0], torch.full((1, 2, 2), 1.5))
    assert torch.allclose(x_t[1], eps[1])  # t = 1 is pure noise
    assert torch.allclose(RectifiedFlow.interpolate(x0, eps, torch.zeros(2)), x0)  # t = 0 is data
    assert torch.allclose(RectifiedFlow.target(x0, eps, t_B), torch.full_like(x0, 2.0))


def test_rectified_flow_oracle_has_zero_loss() -> None:
    x0_BCHW, y_B = _data()
    obj = RectifiedFlow(ObjectiveConfig())

    def oracle(x_t, t_B, y):  # knows x0, so v = ε − x0 = (x_t − x0)/t
        assert t_B.shape == (x0_BCHW.shape[0],) and torch.equal(y, y_B)
        return (x_t - x0_BCHW) / t_B.view(-1, 1, 1, 1)

    loss, info = obj.loss(oracle, x0_BCHW, y_B, generator=_gen())
    assert loss.ndim == 0 and loss.item() < 1e-9
    assert info["t_B"].shape == (6,) and info["loss_B"].shape == (6,)


def test_rectified_flow_loss_is_mse_to_the_target_and_seeded() -> None:
    x0_BCHW, y_B = _data()
    obj = RectifiedFlow(ObjectiveConfig(t_sampling="uniform"))
    x_t, t_B, v = obj.training_target(x0_BCHW, _gen(5))

    def model(x, t, y):
        return 0.5 * x  # any fixed function of the input

    loss, info = obj.loss(model, x0_BCHW, y_B, generator=_gen(5))
    assert torch.equal(info["t_B"], t_B)
    assert loss.item() == pytest.approx((0.5 * x_t - v).square().mean().item(), rel=1e-6)
    assert loss.requires_grad is False
    w = torch.ones((), requires_grad=True)
    loss, _ = obj.loss(lambda x, t, y: w * x, x0_BCHW, y_B)
    loss.backward()
    assert w.grad is not None


# ----------------------------------------------------------------------------- DDPM


def test_linear_betas_and_alphas_cumprod() -> None:
    obj = DDPM(ObjectiveConfig(name="ddpm"))
    assert obj.T == 1000 and obj.betas.shape == (1000,)
    assert obj.betas.dtype == torch.float32 and obj.alphas_cumprod.dtype == torch.float32
    assert obj.betas[0].item() == pytest.approx(1e-4) and obj.betas[-1].item() == pytest.approx(0.02)
    abar = obj.alphas_cumprod
    assert torch.all(abar[1:] < abar[:-1])
    assert abar[0].item() == pytest.approx(1 - 1e-4)
    assert abar[-1].item() == pytest.approx(4.04e-5, rel=0.01)  # Ho et al.: x_T is almost pure noise
    exact = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    assert torch.allclose(abar.double(), exact, rtol=1e-6, atol=0)


def test_cosine_schedule_properties() -> None:
    obj = DDPM(ObjectiveConfig(name="ddpm", beta_schedule="cosine"))
    betas, abar = obj.betas, obj.alphas_cumprod
    assert torch.all(betas > 0) and betas.max().item() == pytest.approx(0.999)
    assert betas[-1].item() == pytest.approx(0.999)  # the clip binds at the end (f(T) = 0)
    assert torch.all(abar[1:] < abar[:-1]) and 0 < abar[-1] < 1e-6

    def f(tau: float) -> float:  # Nichol & Dhariwal eq. 17
        return math.cos((tau / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    for n in (0, 100, 500, 900):
        assert abar[n].item() == pytest.approx(f(n + 1) / f(0), rel=1e-5)
    assert abar[499].item() == pytest.approx(0.5, abs=0.03)  # cosine: half the signal at mid-chain


def test_bad_schedules_raise() -> None:
    with pytest.raises(ValueError, match="linear, cosine"):
        make_betas(ObjectiveConfig(beta_schedule="sigmoid"))
    with pytest.raises(ValueError, match="beta_start"):
        make_betas(ObjectiveConfig(beta_start=0.1, beta_end=0.01))
    with pytest.raises(ValueError, match="ddpm_steps"):
        make_betas(ObjectiveConfig(ddpm_steps=0))


def test_ddpm_time_mapping() -> None:
    obj = DDPM(ObjectiveConfig(name="ddpm", ddpm_steps=10))
    t_B = obj.time_of(torch.arange(10))
    assert t_B.dtype == torch.float32
    assert torch.allclose(t_B, torch.arange(1, 11) / 10)  # t = (n + 1)/T: n = T − 1 → 1, t → 0 clean
    assert torch.all(t_B > 0) and t_B[-1] == 1


def test_ddpm_interpolate_on_known_inputs() -> None:
    obj = DDPM(ObjectiveConfig(name="ddpm", ddpm_steps=10, beta_start=0.1, beta_end=0.1))
    x0, eps = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    x_n = obj.interpolate(x0, eps, torch.tensor([0, 1]))
    assert torch.allclose(x_n[0], torch.full((1, 2, 2), math.sqrt(0.9) + 2 * math.sqrt(0.1)))
    assert torch.allclose(x_n[1], torch.full((1, 2, 2), 0.9 + 2 * math.sqrt(1 - 0.81)))
    assert torch.equal(obj.target(x0, eps), eps)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_oracle_has_zero_loss(schedule: str) -> None:
    x0_BCHW, y_B = _data(8)
    obj = DDPM(ObjectiveConfig(name="ddpm", beta_schedule=schedule))

    def oracle(x_n, t_B, y):  # knows x0; recovers n from t = (n + 1)/T, then ε from x_n
        n_B = (t_B * obj.T).round().long() - 1
        a = obj.alpha_bar(n_B).view(-1, 1, 1, 1).double()
        return ((x_n.double() - a.sqrt() * x0_BCHW) / (1 - a).sqrt()).float()

    loss, info = obj.loss(oracle, x0_BCHW, y_B, generator=_gen(2))
    assert loss.item() < 1e-8
    assert torch.all((info["t_B"] > 0) & (info["t_B"] <= 1))


def test_ddpm_loss_is_mse_to_epsilon() -> None:
    x0_BCHW, y_B = _data()
    obj = DDPM(ObjectiveConfig(name="ddpm", ddpm_steps=100))
    x_n, t_B, eps = obj.training_target(x0_BCHW, _gen(9))
    loss, info = obj.loss(lambda x, t, y: torch.zeros_like(x), x0_BCHW, y_B, generator=_gen(9))
    assert torch.equal(info["t_B"], t_B)
    assert loss.item() == pytest.approx(eps.square().mean().item(), rel=1e-6)

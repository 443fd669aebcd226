"""Samplers: convergence order of Euler/Heun on an exact flow, DDIM/DDPM on an ε-oracle for a point
mass, DDIM(η=1) = DDPM ancestral, the registry, and the classifier-free-guidance wrapper."""

from __future__ import annotations

import pytest
import torch

from moedit.config import ObjectiveConfig
from moedit.objectives import DDPM, RectifiedFlow
from moedit.samplers import SAMPLERS, build_sampler
from moedit.samplers.ddim import DDIMSampler
from moedit.samplers.ddpm import DDPMSampler, respaced_indices
from moedit.samplers.euler import EulerSampler, time_grid
from moedit.samplers.guidance import classifier_free_guidance
from moedit.samplers.heun import HeunSampler

MU, S = 0.7, 0.5  # data N(μ, s²) per element


def gaussian_flow_velocity(x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
    """Exact rectified-flow velocity E[ε − x0 | x_t] for x0 ~ N(μ, s²), ε ~ N(0, 1).

    x_t is Gaussian with mean (1−t)μ and variance σ_t² = (1−t)²s² + t², and Cov(ε − x0, x_t) =
    t − (1−t)s², so v(x, t) = −μ + (t − (1−t)s²)/σ_t²·(x − (1−t)μ). Its flow is the monotone map
    x_t = (1−t)μ + σ_t·ε, so integrating from x_1 = ε to t = 0 gives exactly x_0 = μ + s·ε.
    """
    t = t_B.view(-1, 1, 1, 1)
    var = (1 - t) ** 2 * S**2 + t**2
    return -MU + (t - (1 - t) * S**2) / var * (x_BCHW - (1 - t) * MU)


def _noise(B: int = 11) -> torch.Tensor:
    return torch.linspace(-2.5, 2.5, B).view(B, 1, 1, 1)


def _flow_error(sampler, steps: int) -> float:
    eps = _noise()
    y_B = torch.zeros(eps.shape[0], dtype=torch.long)
    return (sampler.sample(gaussian_flow_velocity, eps, y_B, steps=steps) - (MU + S * eps)).abs().max().item()


# ----------------------------------------------------------------------------- flow samplers


def test_time_grid() -> None:
    ts = time_grid(4, "cpu")
    assert ts.dtype == torch.float32 and torch.allclose(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="steps"):
        time_grid(0, "cpu")


def test_euler_is_first_order() -> None:
    errors = [_flow_error(EulerSampler(), steps) for steps in (16, 32, 64)]
    assert errors[-1] < 0.05
    for coarse, fine in zip(errors, errors[1:]):
        assert 1.8 < coarse / fine < 2.2, errors


def test_heun_is_second_order() -> None:
    errors = [_flow_error(HeunSampler(), steps) for steps in (16, 32, 64)]
    assert errors[-1] < 5e-4
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.4 < coarse / fine < 4.5, errors


@pytest.mark.parametrize("cls,calls_per_step", [(EulerSampler, 1), (HeunSampler, 2)])
def test_flow_sampler_calls_state_and_progress(cls, calls_per_step: int) -> None:
    seen = []

    def model_fn(x, t_B, y_B):
        seen.append((x.dtype, t_B.shape, t_B.min().item(), y_B.clone()))
        return torch.ones_like(x, dtype=torch.bfloat16)  # a low-precision model output

    y_B = torch.tensor([3, 1])
    out = cls(RectifiedFlow()).sample(model_fn, torch.zeros(2, 1, 2, 2, dtype=torch.bfloat16), y_B,
                                      steps=5, progress=True)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 2, 2)
    assert torch.allclose(out, torch.full_like(out, -1.0))  # ∫_1^0 1 dt
    assert len(seen) == 5 * calls_per_step
    assert all(d == torch.float32 and s == (2,) and torch.equal(y, y_B) for d, s, _, y in seen)
    assert seen[0][2] == 1.0 and min(tmin for _, _, tmin, _ in seen) >= 0.0


# ----------------------------------------------------------------------------- DDPM samplers


def point_mass_oracle(obj: DDPM, x_star_BCHW: torch.Tensor):
    """The perfect ε-prediction when every datum is x*: ε = (x_n − √ᾱ_n·x*)/√(1 − ᾱ_n)."""

    def eps_fn(x_BCHW, t_B, y_B):
        n_B = (t_B * obj.T).round().long() - 1  # inverse of t = (n + 1)/T
        assert torch.allclose(obj.time_of(n_B), t_B)
        a = obj.alpha_bar(n_B).view(-1, 1, 1, 1)
        return (x_BCHW - a.sqrt() * x_star_BCHW) / (1 - a).sqrt()

    return eps_fn


def _x_star() -> torch.Tensor:
    return torch.tensor([0.5, -0.25, 1.0, -1.0]).view(1, 1, 2, 2).expand(3, 1, 2, 2)


def test_respaced_indices() -> None:
    assert respaced_indices(1000, 1000) == list(range(1000))
    for steps in (2, 7, 50, 333, 999):
        idx = respaced_indices(1000, steps)
        assert len(set(idx)) == steps and idx == sorted(idx) and idx[0] == 0 and idx[-1] == 999
    assert respaced_indices(1000, 1) == [999]
    with pytest.raises(ValueError, match="ddpm_steps=10"):
        respaced_indices(10, 11)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1, 10, 50])
def test_ddim_recovers_point_mass(schedule: str, steps: int) -> None:
    obj = DDPM(ObjectiveConfig(name="ddpm", beta_schedule=schedule))
    noise = torch.randn((3, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    out = DDIMSampler(obj).sample(point_mass_oracle(obj, _x_star()), noise, torch.zeros(3, dtype=torch.long), steps)
    assert out.dtype == torch.float32
    # one cosine step is x̂0 at n = T − 1, where 1/√ᾱ ≈ 2e4 amplifies the float32 rounding of ε
    atol = 5e-3 if (schedule, steps) == ("cosine", 1) else 1e-4
    assert torch.allclose(out, _x_star(), atol=atol)


@pytest.mark.parametrize("steps", [20, 1000])
def test_ddpm_ancestral_ends_at_point_mass(steps: int) -> None:
    obj = DDPM(ObjectiveConfig(name="ddpm"))
    noise = torch.randn((3, 1, 2, 2), generator=torch.Generator().manual_seed(1))
    out = DDPMSampler(obj).sample(point_mass_oracle(obj, _x_star()), noise, torch.zeros(3, dtype=torch.long), steps,
                                  generator=torch.Generator().manual_seed(2))
    assert torch.allclose(out, _x_star(), atol=1e-3)


def test_ddim_eta_one_is_ddpm_ancestral() -> None:
    """With η = 1, DDIM's update has DDPM's posterior mean and variance (Song et al. §4.1)."""
    obj = DDPM(ObjectiveConfig(name="ddpm", beta_schedule="cosine"))

    def eps_fn(x, t_B, y_B):  # an arbitrary smooth "model", not an oracle
        return torch.tanh(x) * t_B.view(-1, 1, 1, 1) + 0.1 * y_B.view(-1, 1, 1, 1)

    noise = torch.randn((4, 1, 3, 3), generator=torch.Generator().manual_seed(0))
    y_B = torch.tensor([0, 1, 2, 3])
    a = DDPMSampler(obj).sample(eps_fn, noise, y_B, 25, generator=torch.Generator().manual_seed(5))
    b = DDIMSampler(obj, eta=1.0).sample(eps_fn, noise, y_B, 25, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-4)
    c = DDIMSampler(obj, eta=0.0).sample(eps_fn, noise, y_B, 25)
    assert not torch.allclose(a, c, atol=1e-2)


def test_ddim_eta_zero_is_deterministic_and_sees_mapped_times() -> None:
    obj = DDPM(ObjectiveConfig(name="ddpm", ddpm_steps=100))
    times = []

    def eps_fn(x, t_B, y_B):
        times.append(t_B[0].item())
        return 0.5 * x

    noise = torch.randn((2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    y_B = torch.zeros(2, dtype=torch.long)
    first = DDIMSampler(obj).sample(eps_fn, noise, y_B, 4)
    assert torch.equal(first, DDIMSampler(obj).sample(eps_fn, noise, y_B, 4))
    assert times[:4] == pytest.approx([1.0, 0.67, 0.34, 0.01])  # n = 99, 66, 33, 0 → (n + 1)/T


# ----------------------------------------------------------------------------- registry


def test_build_sampler_matches_objective() -> None:
    flow, ddpm = RectifiedFlow(), DDPM(ObjectiveConfig(name="ddpm"))
    assert set(SAMPLERS) == {"euler", "heun", "ddpm", "ddim"}
    assert isinstance(build_sampler("euler", flow), EulerSampler)
    assert isinstance(build_sampler("heun", None), HeunSampler)
    assert isinstance(build_sampler("ddpm", ddpm), DDPMSampler)
    ddim = build_sampler("ddim", ddpm, eta=0.3)
    assert isinstance(ddim, DDIMSampler) and ddim.eta == 0.3
    with pytest.raises(ValueError, match="choose one of: ddpm, ddim"):
        build_sampler("euler", ddpm)
    with pytest.raises(ValueError, match="choose one of: euler, heun"):
        build_sampler("ddim", flow)
    with pytest.raises(ValueError, match="euler, heun, ddpm, ddim"):
        build_sampler("dpm++", flow)
    with pytest.raises(ValueError, match="objective"):
        build_sampler("ddpm", None)
    with pytest.raises(ValueError, match="eta"):
        build_sampler("ddim", ddpm, eta=-1.0)


# ----------------------------------------------------------------------------- guidance

NULL = 10


class LabelModel:
    """Output = (label + 1) + t at every pixel; records the batch size of each call."""

    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, x_BCHW, t_B, y_B):
        self.batches.append(x_BCHW.shape[0])
        return torch.zeros_like(x_BCHW) + (y_B.float() + 1 + t_B).view(-1, 1, 1, 1)


def test_cfg_combines_cond_and_uncond_in_one_batched_call() -> None:
    model = LabelModel()
    guided = classifier_free_guidance(model, 3.0, NULL)
    x, t_B, y_B = torch.zeros(3, 1, 2, 2), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 4, 7])
    out = guided(x, t_B, y_B)
    cond, uncond = (y_B + 1 + t_B), (NULL + 1 + t_B)
    assert torch.allclose(out[:, 0, 0, 0], uncond + 3.0 * (cond - uncond))
    assert model.batches == [6] and out.shape == x.shape and out.dtype == torch.float32


def test_cfg_one_call_per_step_inside_a_sampler() -> None:
    model = LabelModel()
    guided = classifier_free_guidance(model, 2.0, NULL)
    EulerSampler().sample(guided, torch.zeros(4, 1, 2, 2), torch.arange(4), steps=7)
    assert model.batches == [8] * 7


def test_cfg_interval_gating() -> None:
    model = LabelModel()
    guided = classifier_free_guidance(model, 4.0, NULL, interval=(0.3, 0.7))
    x, t_B, y_B = torch.zeros(3, 1, 1, 1), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([2, 2, 2])
    out = guided(x, t_B, y_B).flatten()
    cond, uncond = y_B + 1 + t_B, NULL + 1 + t_B
    assert out[0].item() == pytest.approx(cond[0].item())  # below the interval: conditional only
    assert out[1].item() == pytest.approx((uncond + 4.0 * (cond - uncond))[1].item())
    assert out[2].item() == pytest.approx(cond[2].item())  # above the interval
    assert model.batches == [6]
    out = guided(x, torch.tensor([0.8, 0.9, 1.0]), y_B)  # nobody inside: no unconditional half
    assert model.batches == [6, 3] and torch.allclose(out.flatten(), torch.tensor([3.8, 3.9, 4.0]))
    with pytest.raises(ValueError, match="t_lo <= t_hi"):
        classifier_free_guidance(model, 4.0, NULL, interval=(0.7, 0.3))


def test_cfg_scale_one_is_passthrough() -> None:
    model = LabelModel()
    assert classifier_free_guidance(model, 1.0, NULL) is model
    assert classifier_free_guidance(model, 1, NULL, interval=(0.2, 0.8)) is model


def test_cfg_scale_zero_is_unconditional() -> None:
    model = LabelModel()
    out = classifier_free_guidance(model, 0.0, NULL)(torch.zeros(2, 1, 1, 1), torch.tensor([0.2, 0.4]),
                                                     torch.tensor([1, 5]))
    assert torch.allclose(out.flatten(), torch.tensor([NULL + 1.2, NULL + 1.4]))

"""Tests of the training math (library.training.noise, library.training.losses, library.training.train_math) against hand-computed
numbers and the formulas of spec/training-math.md."""

import argparse
import math
import subprocess
import sys

import pytest
import torch

from library.errors import UserError
from library.training.train_math import (
    SNR_CLAMP,
    SNR_FLOOR,
    LossSettings,
    NoiseSettings,
    add_train_math_arguments,
    apply_snr_weights,
    compute_loss,
    elementwise_loss,
    forward_process,
    huber_c,
    latent_mask,
    make_noise,
    make_noise_scheduler,
    mask_from_conditioning_images,
    noisy_latents,
    reduce_loss,
    sample_timesteps,
    snr_table,
    target,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sched():
    return make_noise_scheduler(zero_terminal_snr=False, v_parameterization=False)


@pytest.fixture(scope="module")
def ztsnr():
    return make_noise_scheduler(zero_terminal_snr=True, v_parameterization=True)


# ---------------------------------------------------------------------------------------------
# schedule


def spec_alphas_cumprod(zero_terminal_snr: bool) -> torch.Tensor:
    """The spec's formulas, written out independently of diffusers."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    if zero_terminal_snr:
        s = ac.sqrt()
        s0, sT = s[0].clone(), s[-1].clone()
        s = (s - sT) * s0 / (s0 - sT)
        ac = s**2
    return ac


def test_schedule_matches_spec(sched):
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.clip_sample is False
    assert sched.config.prediction_type == "epsilon"
    assert torch.allclose(sched.alphas_cumprod.double(), spec_alphas_cumprod(False), rtol=1e-5, atol=0)
    assert sched.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    snr = snr_table(sched)
    assert snr.shape == (1000,) and snr.dtype == torch.float32
    assert snr[0].item() == pytest.approx(0.99915 / 0.00085, rel=1e-4)
    assert snr[-1].item() == pytest.approx(SNR_FLOOR, rel=1e-7)  # the floor is this schedule's last SNR


def test_zero_terminal_snr_rescale_and_table(sched, ztsnr):
    assert ztsnr.config.prediction_type == "v_prediction"
    ac = ztsnr.alphas_cumprod
    assert ac[-1].item() == 0.0 and ztsnr.betas[-1].item() == pytest.approx(1.0)
    assert ac[0].item() == pytest.approx(sched.alphas_cumprod[0].item(), rel=1e-6)  # first step unchanged
    assert torch.allclose(ac.double(), spec_alphas_cumprod(True), rtol=1e-4, atol=1e-7)
    snr = snr_table(ztsnr)
    # the table comes from the rescaled schedule (sd-scripts' bug would keep 0.00468 here)
    assert snr[-1].item() == 0.0
    assert snr[998].item() < 1e-6 < snr_table(sched)[998].item()
    assert torch.allclose(snr, ac / (1 - ac))


# ---------------------------------------------------------------------------------------------
# timesteps


def test_timesteps_range_exclusive_and_deterministic():
    t = sample_timesteps(4000, generator=gen(1))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999 and t.max() >= 990
    assert torch.equal(t, sample_timesteps(4000, generator=gen(1)))
    assert not torch.equal(t, sample_timesteps(4000, generator=gen(2)))
    assert torch.equal(sample_timesteps(50, 998, 999, gen()), torch.full((50,), 998))  # max is exclusive
    narrow = sample_timesteps(2000, 100, 103, gen())
    assert set(narrow.tolist()) == {100, 101, 102}
    assert torch.equal(sample_timesteps(3, 500, 500, gen()), torch.full((3,), 500))
    assert torch.equal(sample_timesteps(3, 700, 600, gen()), torch.full((3,), 600))  # min > max ⇒ all max


@pytest.mark.parametrize("low,high", [(-1, None), (None, 1001), (1000, 1000), (1200, None)])
def test_timestep_range_errors(low, high):
    with pytest.raises(UserError, match="timestep"):
        sample_timesteps(2, low, high, gen())


# ---------------------------------------------------------------------------------------------
# noise


def test_plain_noise_is_seeded_standard_normal():
    latents = torch.zeros(2, 4, 8, 8)
    noise = make_noise(latents, gen(3))
    assert torch.equal(noise, torch.randn(2, 4, 8, 8, generator=gen(3)))
    assert torch.equal(noise, make_noise(latents, gen(3)))
    half = make_noise(latents.half(), gen(3))
    assert half.dtype == torch.float16 and torch.allclose(half.float(), noise, atol=2e-3)


def test_noise_offset_is_per_sample_channel_constant():
    latents = torch.zeros(3, 4, 8, 8)
    g = gen(5)
    base = torch.randn(3, 4, 8, 8, generator=g)
    offset = torch.randn(3, 4, 1, 1, generator=g)
    noise = make_noise(latents, gen(5), noise_offset=0.1)
    assert torch.allclose(noise, base + 0.1 * offset, atol=1e-6)
    diff = noise - make_noise(latents, gen(5))
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)  # shape [B,C,1,1] offset
    assert diff.abs().max() > 0


def test_noise_offset_random_strength():
    latents = torch.zeros(2, 4, 4, 4)
    g = gen(6)
    base = torch.randn(2, 4, 4, 4, generator=g)
    u = torch.rand((), generator=g).item()
    offset = torch.randn(2, 4, 1, 1, generator=g)
    noise = make_noise(latents, gen(6), noise_offset=0.2, noise_offset_random_strength=True)
    assert torch.allclose(noise, base + 0.2 * u * offset, atol=1e-6)


def test_adaptive_noise_scale_and_clamp():
    latents = torch.zeros(1, 2, 4, 4)
    latents[0, 0] = 0.5   # |mean| 0.5
    latents[0, 1] = -2.0  # |mean| 2.0
    g = gen(7)
    base = torch.randn(1, 2, 4, 4, generator=g)
    offset = torch.randn(1, 2, 1, 1, generator=g)
    noise = make_noise(latents, gen(7), noise_offset=0.1, adaptive_noise_scale=0.2)
    o = torch.tensor([0.1 + 0.2 * 0.5, 0.1 + 0.2 * 2.0]).view(1, 2, 1, 1)
    assert torch.allclose(noise, base + o * offset, atol=1e-6)
    # a negative adaptive scale can push the offset below 0: it is clamped to 0
    noise = make_noise(latents, gen(7), noise_offset=0.1, adaptive_noise_scale=-0.1)
    o = torch.tensor([0.1 - 0.05, 0.0]).view(1, 2, 1, 1)
    assert torch.allclose(noise, base + o * offset, atol=1e-6)


def neighbour_correlation(x: torch.Tensor) -> float:
    a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_multires_noise_statistics():
    latents = torch.zeros(4, 4, 64, 64)
    white = make_noise(latents, gen(8))
    pyramid = make_noise(latents, gen(8), multires_noise_iterations=6, multires_noise_discount=0.3)
    strong = make_noise(latents, gen(8), multires_noise_iterations=6, multires_noise_discount=0.8)
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)  # renormalised by one batch-wide std
    assert strong.std().item() == pytest.approx(1.0, abs=1e-5)
    assert abs(neighbour_correlation(white)) < 0.01
    # low-frequency levels make neighbouring pixels correlated, more so with a larger discount
    assert neighbour_correlation(pyramid) > 0.012
    assert neighbour_correlation(strong) > 0.2
    assert torch.equal(pyramid, make_noise(latents, gen(8), multires_noise_iterations=6))
    assert not torch.equal(pyramid, make_noise(latents, gen(9), multires_noise_iterations=6))


def test_multires_single_iteration_is_base_plus_full_resolution_noise():
    latents = torch.zeros(1, 1, 4, 4)
    g = gen(10)
    base = torch.randn(1, 1, 4, 4, generator=g)
    torch.rand((), generator=g)  # the scale factor r (irrelevant at level 0: r**0 = 1)
    level0 = torch.randn(1, 1, 4, 4, generator=g)
    expected = base + level0
    expected = expected / expected.std()
    assert torch.allclose(make_noise(latents, gen(10), multires_noise_iterations=1), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# noisy latents and targets


def test_noisy_latents_formula(sched):
    latents = torch.randn(3, 4, 4, 4, generator=gen(11))
    noise = torch.randn(3, 4, 4, 4, generator=gen(12))
    t = torch.tensor([0, 500, 999])
    ac = sched.alphas_cumprod[t].view(3, 1, 1, 1)
    expected = ac.sqrt() * latents + (1 - ac).sqrt() * noise
    assert torch.allclose(noisy_latents(sched, latents, noise, t), expected, atol=1e-6)
    assert sched.alphas_cumprod.device.type == "cpu"


def test_ip_noise_perturbs_input_only(sched):
    latents = torch.randn(2, 4, 4, 4, generator=gen(13))
    noise = torch.randn(2, 4, 4, 4, generator=gen(14))
    t = torch.tensor([100, 800])
    perturbation = torch.randn(2, 4, 4, 4, generator=gen(15))
    got = noisy_latents(sched, latents, noise, t, ip_noise_gamma=0.1, generator=gen(15))
    assert torch.allclose(got, sched.add_noise(latents, noise + 0.1 * perturbation, t), atol=1e-6)
    assert not torch.allclose(got, noisy_latents(sched, latents, noise, t), atol=1e-4)
    g = gen(15)
    u = torch.rand((), generator=g).item()
    perturbation = torch.randn(2, 4, 4, 4, generator=g)
    got = noisy_latents(sched, latents, noise, t, 0.1, True, gen(15))
    assert torch.allclose(got, sched.add_noise(latents, noise + 0.1 * u * perturbation, t), atol=1e-6)
    # the target never sees the perturbation
    settings = NoiseSettings(ip_noise_gamma=0.5)
    eps, noisy, tt = forward_process(sched, latents, settings, gen(16))
    plain_eps, plain_noisy, plain_t = forward_process(sched, latents, NoiseSettings(), gen(16))
    assert torch.equal(eps, plain_eps) and torch.equal(tt, plain_t)
    assert torch.equal(target(sched, latents, eps, tt, False), plain_eps)
    assert not torch.allclose(noisy, plain_noisy, atol=1e-3)


def test_targets(sched, ztsnr):
    latents = torch.randn(3, 4, 4, 4, generator=gen(17))
    noise = torch.randn(3, 4, 4, 4, generator=gen(18))
    t = torch.tensor([0, 400, 999])
    assert target(sched, latents, noise, t, False) is noise
    v = target(sched, latents, noise, t, True)
    assert torch.equal(v, sched.get_velocity(latents, noise, t))
    ac = sched.alphas_cumprod[t].view(3, 1, 1, 1)
    assert torch.allclose(v, ac.sqrt() * noise - (1 - ac).sqrt() * latents, atol=1e-6)
    # zero terminal SNR: at t=999 the input is pure noise and v = −z
    v = target(ztsnr, latents, noise, t, True)
    assert torch.allclose(v[2], -latents[2], atol=1e-6)
    assert torch.allclose(noisy_latents(ztsnr, latents, noise, t)[2], noise[2], atol=1e-6)


def test_forward_process_is_deterministic(sched):
    latents = torch.randn(2, 4, 8, 8, generator=gen(19))
    settings = NoiseSettings(noise_offset=0.05, multires_noise_iterations=4, ip_noise_gamma=0.1,
                             ip_noise_gamma_random_strength=True, min_timestep=100, max_timestep=200)
    a = forward_process(sched, latents, settings, gen(20))
    b = forward_process(sched, latents, settings, gen(20))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[2].min() >= 100 and a[2].max() < 200


# ---------------------------------------------------------------------------------------------
# element-wise losses and Huber thresholds


def test_elementwise_losses_hand_numbers():
    pred = torch.tensor([3.0, -1.0, 0.5]).view(3, 1, 1, 1)
    tgt = torch.zeros(3, 1, 1, 1)
    assert elementwise_loss(pred, tgt, "l2").flatten().tolist() == [9.0, 1.0, 0.25]
    assert elementwise_loss(pred, tgt, "l1").flatten().tolist() == [3.0, 1.0, 0.5]
    c = torch.tensor([0.5, 0.5, 2.0])
    # huber 2c(√(d²+c²)−c): 2·0.5·(√9.25−0.5), 2·0.5·(√1.25−0.5), 2·2·(√4.25−2)
    expected = [math.sqrt(9.25) - 0.5, math.sqrt(1.25) - 0.5, 4 * (math.sqrt(4.25) - 2)]
    assert elementwise_loss(pred, tgt, "huber", c).flatten().tolist() == pytest.approx(expected, rel=1e-6)
    expected = [2 * (math.sqrt(9.25) - 0.5), 2 * (math.sqrt(1.25) - 0.5), 2 * (math.sqrt(4.25) - 2)]
    assert elementwise_loss(pred, tgt, "smooth_l1", c).flatten().tolist() == pytest.approx(expected, rel=1e-6)
    assert elementwise_loss(pred.half(), tgt.half(), "l2").dtype == torch.float32


def test_huber_schedules(sched, ztsnr):
    t = torch.tensor([0, 500, 999])
    snr = snr_table(sched)
    assert huber_c(t, snr, "l2") is None and huber_c(t, snr, "l1") is None
    assert huber_c(t, snr, "huber", "constant", 0.1, 2.0).tolist() == pytest.approx([0.2] * 3)
    exp = huber_c(torch.tensor([0, 500, 1000]), snr, "smooth_l1", "exponential", 0.1, 2.0)
    assert exp.tolist() == pytest.approx([2.0, 2.0 * math.sqrt(0.1), 0.2], rel=1e-6)
    ac = sched.alphas_cumprod[t].double()
    sigma = ((1 - ac) / ac).sqrt()
    expected = (0.9 / (1 + sigma) ** 2 + 0.1).tolist()
    assert huber_c(t, snr, "huber", "snr", 0.1, 1.0).tolist() == pytest.approx(expected, rel=1e-5)
    # huber_scale applies to the snr schedule too (sd-scripts ignores it there)
    assert huber_c(t, snr, "huber", "snr", 0.1, 3.0).tolist() == pytest.approx([3 * e for e in expected], rel=1e-5)
    # SNR 0 (zero terminal SNR) gives c = hc·hs, not nan
    c = huber_c(t, snr_table(ztsnr), "huber", "snr", 0.1, 2.0)
    assert torch.isfinite(c).all() and c[2].item() == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------
# reduction, masks, weights


def test_reduce_loss_mask_and_weights():
    loss = torch.arange(1.0, 17.0).view(2, 2, 2, 2)  # sample 0: 1..8, sample 1: 9..16
    assert reduce_loss(loss).tolist() == [4.5, 12.5]
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])  # (B,h,w)
    # sample 0 keeps pixel (0,0) of both channels: (1 + 5) / 8 — divided by the full area
    assert reduce_loss(loss, mask).tolist() == [0.75, 12.5]
    assert reduce_loss(loss, mask, torch.tensor([1.0, 0.5])).tolist() == [0.75, 6.25]


def test_mask_resized_by_area_and_from_conditioning():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1.0
    mask[..., 0, 2] = 1.0
    small = latent_mask(mask, (2, 2))
    assert small.flatten().tolist() == [1.0, 0.25, 0.0, 0.0]
    images = torch.stack([torch.full((4, 4), -1.0), torch.ones(4, 4), torch.zeros(4, 4)]).unsqueeze(0)
    assert mask_from_conditioning_images(images).shape == (1, 1, 4, 4)
    assert mask_from_conditioning_images(images).unique().tolist() == [0.0]  # R channel only
    loss = torch.ones(1, 4, 2, 2)
    assert reduce_loss(loss, mask).item() == pytest.approx(1.25 / 4)


def test_prior_loss_weights():
    settings = LossSettings(prior_loss_weight=0.3)
    assert settings.loss_weights([False, True, False]).tolist() == pytest.approx([1.0, 0.3, 1.0])


# ---------------------------------------------------------------------------------------------
# SNR weights

SNR = torch.tensor([0.0, 0.5, 5.0, 20.0, 2000.0])
T = torch.arange(5)
ONES = torch.ones(5)


def weights(**flags):
    return apply_snr_weights(ONES, T, SNR, **flags).tolist()


def test_min_snr_eps_and_v():
    # ε: min(s,5)/s, with the s → 0 limit 1
    assert weights(min_snr_gamma=5) == pytest.approx([1.0, 1.0, 1.0, 0.25, 5 / 2000])
    # v: min(s,5)/(s+1), s not clamped
    assert weights(min_snr_gamma=5, v_parameterization=True) == pytest.approx(
        [0.0, 0.5 / 1.5, 5 / 6, 5 / 21, 5 / 2001])


def test_scale_v_pred_and_v_pred_like():
    assert weights(scale_v_pred_loss_like_noise_pred=True, v_parameterization=True) == pytest.approx(
        [0.0, 0.5 / 1.5, 5 / 6, 20 / 21, 1000 / 1001])
    assert weights(scale_v_pred_loss_like_noise_pred=True) == [1.0] * 5  # v-param only
    got = weights(v_pred_like_loss=0.2)
    expected = [1 + 0.2 * (SNR_FLOOR + 1) / SNR_FLOOR, 1 + 0.2 * 3, 1 + 0.2 * 1.2, 1 + 0.2 * 21 / 20,
                1 + 0.2 * 1001 / 1000]
    assert got == pytest.approx(expected, rel=1e-5)
    assert weights(v_pred_like_loss=0.2, v_parameterization=True) == [1.0] * 5  # ε only


def test_debiased_eps_and_v():
    assert weights(debiased_estimation=True) == pytest.approx(
        [1 / math.sqrt(SNR_FLOOR), 1 / math.sqrt(0.5), 1 / math.sqrt(5), 1 / math.sqrt(20), 1 / math.sqrt(1000)],
        rel=1e-5)
    assert weights(debiased_estimation=True, v_parameterization=True) == pytest.approx(
        [1.0, 1 / 1.5, 1 / 6, 1 / 21, 1 / 1001])


def test_weights_chain_in_spec_order():
    # min-SNR, then v-pred-like (which adds a multiple of the already weighted loss), then debiased
    got = weights(min_snr_gamma=5, v_pred_like_loss=0.5, debiased_estimation=True)
    s = SNR.double()
    sc = s.clamp(max=SNR_CLAMP)
    div = sc.clamp(min=SNR_FLOOR)
    w = 5 / s.clamp(min=5)
    w = w * (1 + 0.5 * (div + 1) / div)
    w = w / div.sqrt()
    assert got == pytest.approx(w.tolist(), rel=1e-5)


def test_zero_terminal_snr_weights_are_finite(ztsnr):
    snr = snr_table(ztsnr)
    t = torch.tensor([0, 998, 999])
    loss = torch.ones(3)
    combos = [
        (False, dict(min_snr_gamma=5)), (True, dict(min_snr_gamma=5)),
        (False, dict(debiased_estimation=True)), (True, dict(debiased_estimation=True)),
        (False, dict(min_snr_gamma=1, v_pred_like_loss=0.1, debiased_estimation=True)),
        (True, dict(min_snr_gamma=1, scale_v_pred_loss_like_noise_pred=True, debiased_estimation=True)),
    ]
    for v, flags in combos:
        w = apply_snr_weights(loss, t, snr, v_parameterization=v, **flags)
        assert torch.isfinite(w).all(), (v, flags, w)
    # ε + debiased never weights a step more than the standard schedule's last step
    w = apply_snr_weights(loss, t, snr, debiased_estimation=True)
    assert w.max().item() == pytest.approx(1 / math.sqrt(SNR_FLOOR), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# compute_loss and settings


def test_compute_loss_chain(sched):
    snr = snr_table(sched)
    pred = torch.randn(2, 4, 4, 4, generator=gen(21))
    tgt = torch.randn(2, 4, 4, 4, generator=gen(22))
    t = torch.tensor([10, 700])
    mask = torch.rand(2, 8, 8, generator=gen(23))
    settings = LossSettings(loss_type="huber", huber_schedule="snr", huber_c=0.2, huber_scale=1.5,
                            min_snr_gamma=5.0, debiased_estimation_loss=True, prior_loss_weight=0.5)
    w = settings.loss_weights([True, False])
    got = compute_loss(pred, tgt, t, snr, settings, mask, w)
    c = huber_c(t, snr, "huber", "snr", 0.2, 1.5).view(2, 1, 1, 1)
    manual = 2 * c * (((pred - tgt) ** 2 + c**2).sqrt() - c)
    manual = (manual * torch.nn.functional.interpolate(mask.unsqueeze(1), size=(4, 4), mode="area")).mean((1, 2, 3))
    manual = manual * torch.tensor([0.5, 1.0])
    s = snr[t]
    manual = manual * 5 / s.clamp(min=5) / s.clamp(max=1000).sqrt()
    assert got.ndim == 0 and got.item() == pytest.approx(manual.mean().item(), rel=1e-5)
    # plain l2 with defaults is the MSE
    assert compute_loss(pred, tgt, t, snr, LossSettings()).item() == pytest.approx(
        torch.nn.functional.mse_loss(pred, tgt).item(), rel=1e-6)


def parse(argv):
    parser = argparse.ArgumentParser()
    add_train_math_arguments(parser)
    return parser.parse_args(argv)


def test_arguments_defaults_and_settings():
    args = parse([])
    assert (args.noise_offset, args.multires_noise_discount, args.loss_type, args.huber_schedule, args.huber_c,
            args.huber_scale, args.min_timestep, args.max_timestep) == (None, 0.3, "l2", "snr", 0.1, 1.0, None, None)
    assert NoiseSettings.from_args(args) == NoiseSettings()
    assert LossSettings.from_args(args) == LossSettings()
    assert LossSettings.from_args(argparse.Namespace()) == LossSettings()  # any namespace works
    args = parse(["--loss_type", "smooth_l1", "--huber_schedule", "exponential", "--min_snr_gamma", "5",
                  "--v_pred_like_loss", "0.1", "--noise_offset", "0.05", "--adaptive_noise_scale", "0.01",
                  "--multires_noise_iterations", "6", "--ip_noise_gamma", "0.1", "--min_timestep", "10"])
    args.prior_loss_weight = 0.7
    loss = LossSettings.from_args(args)
    assert (loss.loss_type, loss.huber_schedule, loss.min_snr_gamma, loss.v_pred_like_loss, loss.prior_loss_weight) == (
        "smooth_l1", "exponential", 5.0, 0.1, 0.7)
    noise = NoiseSettings.from_args(args)
    assert (noise.noise_offset, noise.adaptive_noise_scale, noise.multires_noise_iterations, noise.ip_noise_gamma,
            noise.min_timestep) == (0.05, 0.01, 6, 0.1, 10)
    with pytest.raises(SystemExit):
        parse(["--loss_type", "l3"])
    # a trainer that detected a v-prediction model passes it in, and validation sees it
    assert LossSettings.from_args(parse([]), v_parameterization=True).v_parameterization
    with pytest.raises(UserError, match="--v_pred_like_loss"):
        LossSettings.from_args(parse(["--v_pred_like_loss", "0.1"]), v_parameterization=True)


@pytest.mark.parametrize("flags,message", [
    (dict(scale_v_pred_loss_like_noise_pred=True), "--scale_v_pred_loss_like_noise_pred"),
    (dict(v_pred_like_loss=0.1, v_parameterization=True), "--v_pred_like_loss"),
    (dict(loss_type="huber", huber_c=0.0), "--huber_c"),
    (dict(loss_type="mse"), "--loss_type"),
    (dict(huber_schedule="linear"), "--huber_schedule"),
    (dict(min_snr_gamma=-1.0), "--min_snr_gamma"),
])
def test_loss_settings_errors(flags, message):
    with pytest.raises(UserError, match=message):
        LossSettings.from_args(argparse.Namespace(**flags))


@pytest.mark.parametrize("flags,message", [
    (dict(adaptive_noise_scale=0.1), "--adaptive_noise_scale"),
    (dict(max_timestep=1200), "--max_timestep"),
    (dict(min_timestep=-3), "--min_timestep"),
])
def test_noise_settings_errors(flags, message):
    with pytest.raises(UserError, match=message):
        NoiseSettings.from_args(argparse.Namespace(**flags))


def test_train_math_import_is_light():
    code = "import sys, library.training.train_math; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.stdout.split() == ["False", "False"]

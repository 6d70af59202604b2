"""Sampler and schedule names (ours and A1111's), building samplers with a schedule or a timestep spacing, the
default sampler of each scheduler config, the step limit, and the schedule math checked against scipy / torch."""

import math

import mlx.core as mx
import numpy as np
import pytest
import scipy.stats
import torch

from helpers import SD15, SD21, SD21_BASE, SD_TURBO, SDXL, SDXL_TURBO, real_config
from mlx_sd.schedulers import (
    DISPLAY_NAMES,
    SAMPLERS,
    SCHEDULES,
    a1111_names,
    default_sampler,
    make_scheduler,
    max_steps,
    parse_sampler,
    parse_schedule,
    resolve_sampler,
    sampler_lines,
)
from mlx_sd.schedulers.schedules import beta_ppf, f32

SD15_CONFIG = real_config(SD15, "scheduler", "scheduler_config.json")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("Euler a", ("euler_a", None)),
        (" euler ", ("euler", None)),
        ("DDIM", ("ddim", None)),
        ("PLMS", ("pndm", None)),
        ("pndm", ("pndm", None)),
        ("dpm++ 2m", ("dpmpp_2m", None)),
        ("DPM++ 2M Karras", ("dpmpp_2m", "karras")),
        ("dpmpp_2m_karras", ("dpmpp_2m", "karras")),
        ("DPM++ 2M SDE Karras", ("dpmpp_2m_sde", "karras")),
        ("DPM++ 2M SDE  Exponential", ("dpmpp_2m_sde", "exponential")),
        ("dpmpp_3m_sde_beta", ("dpmpp_3m_sde", "beta")),
        ("DPM2 a Karras", ("dpm2_a", "karras")),
        ("Euler SGM Uniform", ("euler", "sgm_uniform")),
        ("ddim_sgm_uniform", ("ddim", "sgm_uniform")),
        ("UniPC", ("unipc", None)),
        ("LCM", ("lcm", None)),
        ("tcd", ("tcd", None)),
    ],
)
def test_parse_sampler(name, expected):
    assert parse_sampler(name) == expected
    sampler, schedule = expected
    assert resolve_sampler(name) == (sampler if schedule is None else f"{sampler}_{schedule}")
    assert parse_sampler(resolve_sampler(name)) == expected


def test_every_name_round_trips():
    for name, s in SAMPLERS.items():
        assert parse_sampler(name) == parse_sampler(s.display) == (name, None)
        for schedule in s.schedules:
            label = SCHEDULES[schedule].label
            assert parse_sampler(f"{s.display} {label}") == (name, schedule)
            assert DISPLAY_NAMES[resolve_sampler(f"{s.display} {label}")] == f"{s.display} {label}"
            assert a1111_names(name, schedule) == (s.display, label)


def test_unknown_sampler_lists_them_all():
    with pytest.raises(ValueError, match=r"^unknown sampler 'dpm_fast'; choose one of: euler \(Euler\), ") as err:
        parse_sampler("dpm_fast")
    assert all(f"{name} ({s.display})" in str(err.value) for name, s in SAMPLERS.items())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name,message",
    [
        ("Euler a Karras", r"^euler_a \(Euler a\) cannot use the Karras schedule; it takes: default, sgm_uniform$"),
        ("LCM Karras", r"^lcm \(LCM\) cannot use the Karras schedule; it takes: default$"),
        (
            "DPM++ 2S a SGM Uniform",
            r"cannot use the SGM Uniform schedule; it takes: default, karras, exponential, beta$",
        ),
    ],
)
def test_schedules_a_sampler_cannot_take(name, message):
    with pytest.raises(ValueError, match=message):
        parse_sampler(name)


def test_parse_schedule():
    assert [parse_schedule(x) for x in ("Karras", "exponential", "BETA", "SGM Uniform", "sgm_uniform")] == [
        "karras",
        "exponential",
        "beta",
        "sgm_uniform",
        "sgm_uniform",
    ]
    assert parse_schedule(None) is parse_schedule("default") is parse_schedule("Automatic") is None
    with pytest.raises(ValueError, match=r"^unknown schedule 'Align Your Steps'; choose one of: default, karras"):
        parse_schedule("Align Your Steps")


def test_a1111_names():
    assert a1111_names("dpmpp_2m", "karras") == a1111_names("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert a1111_names("pndm") == ("PLMS", None)
    assert a1111_names("euler", "SGM Uniform") == ("Euler", "SGM Uniform")
    assert a1111_names("dpmpp_2m_karras", "Karras") == ("DPM++ 2M", "Karras")
    with pytest.raises(ValueError, match="names the karras schedule but schedule 'exponential' was given"):
        a1111_names("dpmpp_2m_karras", "exponential")


def test_schedules_set_the_config():
    karras_config = {**SD15_CONFIG, "use_karras_sigmas": True}
    assert make_scheduler("dpmpp_2m", karras_config).config["use_karras_sigmas"]  # default: the config's
    exponential = make_scheduler("dpmpp_2m", karras_config, schedule="Exponential").config
    assert exponential["use_exponential_sigmas"] and not exponential["use_karras_sigmas"]
    trailing = make_scheduler("heun", karras_config, schedule="sgm_uniform").config
    assert trailing["timestep_spacing"] == "trailing" and not trailing["use_karras_sigmas"]
    assert make_scheduler("DPM++ 2M Karras", SD15_CONFIG).config["use_karras_sigmas"]
    assert make_scheduler("euler_a", SD15_CONFIG, schedule="sgm_uniform").config["timestep_spacing"] == "trailing"
    assert make_scheduler("tcd", SD15_CONFIG, eta=0.7).config["eta"] == 0.7


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_timestep_spacing_overrides_the_config(spacing):
    for sampler in ("euler", "ddim", "dpmpp_2m", "heun", "pndm", "unipc"):
        assert make_scheduler(sampler, SD15_CONFIG, timestep_spacing=spacing).config["timestep_spacing"] == spacing
    dpm = make_scheduler("dpmpp_2m", SD15_CONFIG, schedule="karras", timestep_spacing=spacing).config
    assert dpm["use_karras_sigmas"] and dpm["timestep_spacing"] == spacing


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(sampler="lcm", timestep_spacing="trailing"), r"^lcm \(LCM\) has its own timesteps; it takes no"),
        (dict(sampler="dpmpp_2s_a", timestep_spacing="leading"), "has its own timesteps"),
        (dict(sampler="euler", schedule="sgm_uniform", timestep_spacing="leading"), "is trailing spacing"),
        (dict(sampler="euler", timestep_spacing="uniform"), "timestep_spacing must be one of leading, linspace"),
        (dict(sampler="ddim", schedule="karras"), r"^ddim \(DDIM\) cannot use the Karras schedule"),
        (dict(sampler="euler", schedule="polyexponential"), "unknown schedule 'polyexponential'"),
        (dict(sampler="tcd", eta=1.5), "eta must be between 0 and 1"),
    ],
)
def test_combinations_a_sampler_cannot_take(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler(config=SD15_CONFIG, **kwargs)


def test_unsupported_options_raise():
    from mlx_sd.schedulers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        EulerDiscreteScheduler.from_config(SD15_CONFIG, rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="solver_type"):
        DPMSolverMultistepScheduler.from_config({"solver_type": "heun"})
    with pytest.raises(ValueError, match="thresholding"):
        DDIMScheduler.from_config({"thresholding": True})
    with pytest.raises(ValueError, match="prediction_type"):
        make_scheduler("euler_a", {"prediction_type": "sample"})
    with pytest.raises(ValueError, match="only one of use_karras_sigmas"):
        make_scheduler("euler", {"use_karras_sigmas": True, "use_beta_sigmas": True})
    with pytest.raises(TypeError, match="timestep_spacin"):
        make_scheduler("euler", SD15_CONFIG, timestep_spacin="trailing")


def test_default_sampler_follows_the_config():
    configs = {m: real_config(m, "scheduler", "scheduler_config.json") for m in (SD15, SD21_BASE, SD21, SDXL)}
    configs[SD_TURBO] = real_config(SD_TURBO, "scheduler", "scheduler_config.json")
    configs[SDXL_TURBO] = real_config(SDXL_TURBO, "scheduler", "scheduler_config.json")
    expected = {SD15: "pndm", SD21_BASE: "pndm", SD21: "ddim", SD_TURBO: "euler", SDXL: "euler", SDXL_TURBO: "euler_a"}
    assert {m: default_sampler(c) for m, c in configs.items()} == expected
    for name, s in SAMPLERS.items():
        if name not in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
            assert default_sampler({"_class_name": s.cls.__name__}) == name
    dpm = {"_class_name": "DPMSolverMultistepScheduler"}
    assert default_sampler({**dpm, "use_karras_sigmas": True}) == "dpmpp_2m_karras"
    assert default_sampler({**dpm, "algorithm_type": "sde-dpmsolver++"}) == "dpmpp_2m_sde"
    sde3 = {**dpm, "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_exponential_sigmas": True}
    assert default_sampler(sde3) == "dpmpp_3m_sde_exponential"
    assert default_sampler({"_class_name": "EulerAncestralDiscreteScheduler", "use_karras_sigmas": True}) == "euler_a"
    assert default_sampler({"_class_name": "DDPMScheduler"}) == "euler"  # not implemented here
    for config in configs.values():  # every default builds
        make_scheduler(default_sampler(config), config).set_timesteps(30)


def test_sampler_lines():
    lines = sampler_lines()
    assert len(lines) == 1 + len(SAMPLERS) + 2 + 1 + len(SCHEDULES)
    assert lines[1].split()[:2] == ["euler", "Euler"] and "karras, exponential, beta, sgm_uniform" in lines[1]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_step_limit(sampler):
    """Up to num_train_timesteps where the sampler is defined there (issue 10: 1001 steps crashed euler, euler_a
    and dpmpp_2m), less where the spacing would repeat a noise level; a one-line ValueError naming the limit."""
    for config in (SD15_CONFIG, {**SD15_CONFIG, "timestep_spacing": "trailing", "steps_offset": 0}):
        scheduler = make_scheduler(sampler, config)
        limit = max_steps(sampler, config)
        assert limit == scheduler.max_steps()
        scheduler.set_timesteps(limit)
        assert len(set(np.array(scheduler.timesteps).tolist())) >= limit  # a whole schedule, no crash
        for bad in (limit + 1, 1001, 0, -1, 2.5, True):
            with pytest.raises(ValueError, match=rf"^{sampler}: steps must be between 1 and {limit}\b[^\n]*, got"):
                scheduler.set_timesteps(bad)
    # trailing spacing, no offset (DPM++ 2S a has linspace timesteps over n + 1 points only)
    expected = {"lcm": 50, "tcd": 50, "dpmpp_2s_a": 999}.get(sampler, 1000)
    assert max_steps(sampler, {**SD15_CONFIG, "timestep_spacing": "trailing", "steps_offset": 0}) == expected


def test_step_limits_where_spacing_repeats_a_noise_level():
    assert max_steps("euler", SD15_CONFIG, timestep_spacing="leading") == 999  # steps_offset 1: 1000 is t = 1000
    assert max_steps("dpmpp_2m", SD15_CONFIG) == 999  # linspace over n + 1 points: t repeats from 1000 steps
    assert max_steps("dpmpp_2m", SD15_CONFIG, timestep_spacing="leading") == 998
    assert max_steps("dpmpp_2m", {**SD15_CONFIG, "lambda_min_clipped": -2.0}) < 900
    # from 667 trailing steps the last timestep is 0, whose sigma is the final sigma_min: the last step is empty
    # (diffusers divides by its zero log-SNR step and returns NaN there); ours leaves the sample as it is
    scheduler = make_scheduler("dpmpp_2m", {**SD15_CONFIG, "final_sigmas_type": "sigma_min"}, "sgm_uniform")
    scheduler.set_timesteps(700)
    assert scheduler.sigmas[-1].item() == scheduler.sigmas[-2].item()
    scheduler._step_index, scheduler._lower_order_nums = 699, 2
    scheduler._outputs = [mx.zeros((1, 2, 2, 4)), mx.ones((1, 2, 2, 4))]
    sample = mx.full((1, 2, 2, 4), 0.5)
    assert np.array_equal(np.array(scheduler.step(mx.ones((1, 2, 2, 4)), 0, sample)), np.array(sample))
    assert max_steps("lcm", {**SD15_CONFIG, "original_inference_steps": 8}) == 8
    with pytest.raises(ValueError, match=r"^lcm: steps must be between 1 and 50 \(the distillation schedule's"):
        make_scheduler("lcm", SD15_CONFIG).set_timesteps(51)


def test_beta_ppf_matches_scipy():
    """use_beta_sigmas' quantiles without scipy: within 1e-11 relative of scipy.stats.beta.ppf."""
    q = np.concatenate([np.linspace(0, 1, 1001), [1e-9, 1e-6, 0.5 - 1e-9, 1 - 1e-9]])
    for a, b in ((0.6, 0.6), (0.5, 2.0), (3.0, 0.7)):
        ours = np.array([beta_ppf(x, a, b) for x in q])
        np.testing.assert_allclose(ours, scipy.stats.beta.ppf(q, a, b), rtol=1e-11, atol=1e-14)


def test_lms_coefficients_match_diffusers():
    """LMS integrates the Lagrange basis exactly (diffusers: scipy.integrate.quad on float32 sigmas)."""
    import diffusers

    ours = make_scheduler("lms", SD15_CONFIG)
    ref = diffusers.LMSDiscreteScheduler.from_config(SD15_CONFIG)
    ours.set_timesteps(12)
    ref.set_timesteps(12)
    for i in range(11):
        order = min(i + 1, 4)
        for j in range(order):
            assert ours._coefficient(order, i, j) == pytest.approx(ref.get_lms_coefficient(order, i, j), rel=2e-6)


def test_tcd_intermediate_timestep_is_torch_float32():
    """TCD's s = floor((1 - eta) * t_prev) as torch computes a Python float times an integer tensor."""
    for eta in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        t = torch.arange(1000)
        expected = torch.floor((1 - eta) * t).to(torch.long).tolist()
        assert [math.floor(f32(f32(1 - eta) * x)) for x in range(1000)] == expected

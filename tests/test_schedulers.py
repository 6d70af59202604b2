"""Parity of mlx_sd.schedulers with diffusers' schedulers: schedules, whole sampling loops and add_noise.

diffusers runs on NCHW torch tensors, ours on their NHWC transposes; both get the same model outputs and, for
euler_a, the same noise (diffusers draws it inside `step` from its generator; we draw it from a twin generator).
"""

import diffusers
import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from helpers import SD15, SD21, SD21_BASE, SD_TURBO, SDXL, SDXL_TURBO, nchw_to_nhwc, real_config
from mlx_sd.schedulers import (
    SAMPLERS,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    default_sampler,
    make_scheduler,
    resolve_sampler,
)

# diffusers' schedulers pass torch tensors to np.array(copy=False)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

_DPMPP_2M = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint")
REFERENCE = {
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "ddim": (diffusers.DDIMScheduler, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {**_DPMPP_2M, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler, {**_DPMPP_2M, "use_karras_sigmas": True}),
}
SHAPE = (2, 4, 8, 8)  # NCHW for diffusers
SD15_CONFIG = real_config(SD15, "scheduler", "scheduler_config.json")
CONFIGS = {
    **{m: real_config(m, "scheduler", "scheduler_config.json") for m in (SD15, SD21_BASE, SD21, SD_TURBO, SDXL)},
    SDXL_TURBO: real_config(SDXL_TURBO, "scheduler", "scheduler_config.json"),
    "diffusers-defaults": {},
    "cosine": {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"},
    "dpm-sde-3-karras": {
        "_class_name": "DPMSolverMultistepScheduler",
        "algorithm_type": "sde-dpmsolver++",
        "solver_order": 3,
        "use_karras_sigmas": True,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
    },
}


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    """from_config warns about every key of another scheduler class that it ignores."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(level)


def reference(name, config, **overrides):
    cls, options = REFERENCE[name]
    return cls.from_config(config, **{**options, **overrides})


def assert_same_schedule(ours, ref):
    """Timesteps equal (same dtype kind), sigmas and init_noise_sigma within 1e-6 relative.

    1e-6 is a few float32 ulps: diffusers takes ((1 - a) / a) ** 0.5 with torch's float32 sqrt, which on x86 CPUs
    is not correctly rounded (1 ulp off for ~20% of the training sigmas); ours is. Euler with Karras sigmas keeps
    fractional timesteps interpolated on log(sigma), and numpy's float32 log (SIMD) is not correctly rounded
    either: those timesteps may differ in their last float32 bits (measured up to 6e-5), hence atol 1e-3 there."""
    euler_karras = isinstance(ours, EulerDiscreteScheduler) and ours.config.get("use_karras_sigmas")
    assert str(ours.timesteps.dtype).split(".")[-1] == str(ref.timesteps.dtype).split(".")[-1]
    timesteps, expected = np.array(ours.timesteps).astype(np.float64), ref.timesteps.numpy().astype(np.float64)
    np.testing.assert_allclose(timesteps, expected, rtol=0, atol=1e-3 if euler_karras else 0)
    assert hasattr(ours, "sigmas") == hasattr(ref, "sigmas")
    if hasattr(ref, "sigmas"):
        np.testing.assert_allclose(np.array(ours.sigmas), ref.sigmas.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(float(ours.init_noise_sigma), float(ref.init_noise_sigma), rtol=1e-6)
    assert ours.order == ref.order


def assert_close(ours, ref):
    """ours (NHWC) within 1e-5 of ref (NCHW), relative to the largest |ref|.

    diffusers computes the step coefficients (sqrt, log, exp of sigmas and alphas) in torch float32, we compute them
    in float64: they differ by ~1 float32 ulp, which moves a result by a few ulps of its largest operand (e.g.
    sigma * eps ~ 40 early on, where the result may be near 0). Measured worst over all tests: 1.6e-6."""
    ref = ref.permute(0, 2, 3, 1).numpy()
    ours = np.array(ours)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * scale)


def run_loop(ours, ref, seed=0):
    """Samples the whole schedule with both, on the same random model outputs, comparing every step."""
    if ref.timesteps[0] in ref.timesteps[1:]:
        return  # diffusers cannot: its step counter starts at the 2nd match and overruns (cosine-schedule Karras)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32)) * float(ref.init_noise_sigma)
    x_ref, x_ours = x, nchw_to_nhwc(x)
    generator_ref, generator_ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    assert len(ours.timesteps) == len(ref.timesteps)
    for t_ref, t_ours in zip(ref.timesteps, ours.timesteps):
        assert_close(ours.scale_model_input(x_ours, t_ours), ref.scale_model_input(x_ref, t_ref))
        model_output = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32))
        noise = torch.randn(SHAPE, generator=generator_ours)  # = diffusers' randn_tensor(shape, generator)
        x_ref = ref.step(model_output, t_ref, x_ref, generator=generator_ref).prev_sample
        x_ours = ours.step(nchw_to_nhwc(model_output), t_ours, x_ours, noise=nchw_to_nhwc(noise))
        assert_close(x_ours, x_ref)


@pytest.mark.parametrize("steps", [1, 4, 20, 50])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampling_loop(name, prediction_type, spacing, steps_offset, steps):
    config = {**SD15_CONFIG, "prediction_type": prediction_type, "timestep_spacing": spacing}
    config["steps_offset"] = steps_offset
    ours, ref = make_scheduler(name, config), reference(name, config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert_same_schedule(ours, ref)
    run_loop(ours, ref, seed=steps)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_schedules_for_many_step_counts(name, spacing):
    """Rounding edge cases of the spacings (np.arange with a float step, round half to even)."""
    config = {**SD15_CONFIG, "timestep_spacing": spacing}
    ours, ref = make_scheduler(name, config), reference(name, config)
    for steps in [*range(1, 41), 48, 80, 99, 100, 150, 333, 999, 1000]:
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        assert_same_schedule(ours, ref)


CLASSES = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_real_configs(name, config_name):
    """Each class built from each config as diffusers' `Cls.from_config(cfg)`; the same instances are reused for
    several step counts, so set_timesteps must reset the multistep state."""
    config = CONFIGS[config_name]
    if config_name == "dpm-sde-3-karras" and name.startswith("dpmpp"):  # only make_scheduler turns it into 2M
        ours, ref = make_scheduler(name, config), reference(name, config)
    elif name == "dpmpp_2m_karras":
        ours = DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)
        ref = diffusers.DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)
    else:
        ours, ref = CLASSES[name].from_config(config), REFERENCE[name][0].from_config(config)
    for steps in (1, 4, 25, 4):
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        assert_same_schedule(ours, ref)
        run_loop(ours, ref, seed=steps)


@pytest.mark.parametrize(
    "name, options",
    [
        ("euler", dict(final_sigmas_type="sigma_min")),
        ("euler", dict(prediction_type="sample")),
        ("euler", dict(use_karras_sigmas=True)),
        ("euler", dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0)),
        ("ddim", dict(clip_sample=True, set_alpha_to_one=True)),
        ("ddim", dict(clip_sample=True, clip_sample_range=2.0, prediction_type="sample")),
        ("dpmpp_2m", dict(final_sigmas_type="sigma_min")),  # first order at the end below 15 steps only
        ("dpmpp_2m", dict(final_sigmas_type="sigma_min", lower_order_final=False)),
        ("dpmpp_2m", dict(final_sigmas_type="sigma_min", euler_at_final=True)),
        ("dpmpp_2m", dict(lambda_min_clipped=-3.0)),
        ("dpmpp_2m", dict(prediction_type="sample")),
        ("dpmpp_2m_karras", dict(sigma_min=0.1, sigma_max=10.0)),
        ("dpmpp_2m_karras", dict(beta_schedule="squaredcos_cap_v2")),
    ],
)
def test_options(name, options):
    # in the config dict: diffusers' DPM drops sigma_min/sigma_max given as from_config kwargs, not as config keys
    ours, ref = make_scheduler(name, SD15_CONFIG, **options), reference(name, {**SD15_CONFIG, **options})
    for steps in (10, 20):
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        assert_same_schedule(ours, ref)
        run_loop(ours, ref, seed=steps)


@pytest.mark.parametrize("config_name", [SD15, SD21, SD_TURBO, SDXL_TURBO])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_add_noise(name, config_name):
    ours, ref = make_scheduler(name, CONFIGS[config_name]), reference(name, CONFIGS[config_name])
    ours.set_timesteps(50)  # dpmpp_2m_karras: timesteps[47] == timesteps[48] == 1, and t = 1 means index 48
    ref.set_timesteps(50)
    generator = torch.Generator().manual_seed(0)
    original, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    for index in ([0, 6], [47, 3], [47]):  # a (B,) batch of timesteps; [47] as a scalar timestep
        t_ref = ref.timesteps[index]
        t_ours = ours.timesteps[mx.array(index)] if len(index) > 1 else ours.timesteps[index[0]]
        expected = ref.add_noise(original, noise, t_ref)
        # one multiply-add with a coefficient that may differ by a float32 ulp (see assert_same_schedule)
        for t in (t_ours, t_ours.tolist()):  # also as Python numbers
            got = ours.add_noise(nchw_to_nhwc(original), nchw_to_nhwc(noise), t)
            np.testing.assert_allclose(np.array(got), expected.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)


def test_euler_ancestral_draws_normal_noise_by_default():
    ours = make_scheduler("euler_a", SD15_CONFIG)
    sample = mx.random.normal((1, 8, 8, 4), key=mx.random.key(1))
    model_output = mx.random.normal((1, 8, 8, 4), key=mx.random.key(2))

    def first_step(noise=None):
        ours.set_timesteps(4)
        mx.random.seed(3)
        return ours.step(model_output, ours.timesteps[0], sample, noise=noise)

    drawn = first_step()
    mx.random.seed(3)
    expected = first_step(mx.random.normal(sample.shape))
    np.testing.assert_array_equal(np.array(drawn), np.array(expected))
    assert not np.allclose(np.array(drawn), np.array(first_step(mx.zeros(sample.shape))), atol=1e-3)


def test_make_scheduler_unknown_name():
    names = (
        r"euler \(Euler\), euler_a \(Euler a\), ddim \(DDIM\), dpmpp_2m \(DPM\+\+ 2M\), "
        r"dpmpp_2m_karras \(DPM\+\+ 2M Karras\)"
    )
    with pytest.raises(ValueError, match=f"unknown sampler 'x'; choose one of: {names}$"):
        make_scheduler("x", SD15_CONFIG)


@pytest.mark.parametrize(
    "alias,name",
    [
        ("Euler a", "euler_a"),
        ("DPM++ 2M Karras", "dpmpp_2m_karras"),
        ("dpm++ 2m", "dpmpp_2m"),
        ("DDIM", "ddim"),
        (" euler ", "euler"),
    ],
)
def test_a1111_display_names_are_aliases(alias, name):
    assert resolve_sampler(alias) == name
    built, expected = make_scheduler(alias, SD15_CONFIG), make_scheduler(name, SD15_CONFIG)
    assert type(built) is type(expected) and built.config == expected.config


def test_unsupported_options_raise():
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        EulerDiscreteScheduler.from_config(SD15_CONFIG, rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="solver_order"):
        DPMSolverMultistepScheduler.from_config({"solver_order": 3})
    with pytest.raises(ValueError, match="thresholding"):
        DDIMScheduler.from_config({"thresholding": True})
    with pytest.raises(ValueError, match="prediction_type"):
        EulerAncestralDiscreteScheduler.from_config({"prediction_type": "sample"})
    with pytest.raises(TypeError, match="timestep_spacin"):
        make_scheduler("euler", SD15_CONFIG, timestep_spacin="trailing")


def test_default_sampler():
    assert default_sampler(CONFIGS[SD15]) == "euler"  # PNDM is not implemented
    assert default_sampler(CONFIGS[SD21_BASE]) == "euler"
    assert default_sampler(CONFIGS[SD21]) == "ddim"
    assert default_sampler(CONFIGS[SD_TURBO]) == "euler"
    assert default_sampler(CONFIGS[SDXL]) == "euler"
    assert default_sampler(CONFIGS[SDXL_TURBO]) == "euler_a"
    assert default_sampler({"_class_name": "DPMSolverMultistepScheduler"}) == "dpmpp_2m"
    karras = {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert default_sampler(karras) == "dpmpp_2m_karras"
    assert default_sampler({"_class_name": "LMSDiscreteScheduler"}) == "euler"

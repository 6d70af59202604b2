"""Parity of mlx_sd.schedulers with diffusers' schedulers: schedules, whole sampling loops and add_noise, per
sampler x schedule x prediction type x timestep spacing.

diffusers runs on NCHW torch tensors, ours on their NHWC transposes; both get the same model outputs and the same
per-step noise (injected into diffusers' `randn_tensor` and, for DPMSolverSDEScheduler, its Brownian-tree noise
sampler).
"""

import inspect
import sys

import diffusers
import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from helpers import SD15, SD21, SD21_BASE, SD_TURBO, SDXL, SDXL_TURBO, nchw_to_nhwc, real_config
from mlx_sd.schedulers import SAMPLERS, SCHEDULES, make_scheduler

# diffusers' schedulers pass torch tensors to numpy functions
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
]

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
NOISY = {"euler_a", "dpm2_a", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "lcm", "tcd"}
TCD_ETA = 0.3  # TCDScheduler.step's default, which mlx_sd's tcd uses


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    """from_config warns about every key of another scheduler class that it ignores."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(level)


def reference(sampler, config, schedule=None, spacing=None, **options):
    """diffusers' class of `sampler` built as make_scheduler builds ours (the same options in its config)."""
    s = SAMPLERS[sampler]
    cls = getattr(diffusers, s.cls.__name__)
    keys = inspect.signature(cls.__init__).parameters
    chosen = dict(s.options)
    if schedule is not None:
        chosen.update(SCHEDULES[schedule].options)
    if spacing is not None:
        chosen["timestep_spacing"] = spacing
    chosen.update(options)
    # in the config dict: diffusers reads sigma_min / sigma_max config keys of any class, but drops such kwargs
    return cls.from_config({**config, **{k: v for k, v in chosen.items() if k in keys or k.startswith("sigma_")}})


def assert_same_schedule(ours, ref):
    """Timesteps equal (integer kinds stay integer), sigmas and init_noise_sigma within 1e-6 relative.

    1e-6 is a few float32 ulps: diffusers takes ((1 - a) / a) ** 0.5 with torch's float32 sqrt, which on x86 CPUs
    is not correctly rounded (1 ulp off for ~20% of the training sigmas); ours is. Fractional timesteps (Karras and
    other sigma schedules, DPM2's midpoints) are interpolated on log(sigma), and numpy's and torch's float32 log
    and exp (SIMD) are not correctly rounded either, differently by CPU: measured up to 6e-5 on an AVX-512 x86, and
    on an AVX2 one 1.2e-3 (DPM2 ancestral's midpoint 499.5, linspace) and 0.0096 (its 1-step midpoint near t = 0,
    from float32 sigma_down = sqrt(sigma_next**2 - sigma_up**2)), hence atol 0.02 of a timestep; a wrong spacing
    or interpolation moves them by 0.5 or more."""
    integer = not torch.is_floating_point(ref.timesteps)
    assert (np.array(ours.timesteps).dtype.kind in "iu") == integer
    timesteps, expected = np.array(ours.timesteps).astype(np.float64), ref.timesteps.numpy().astype(np.float64)
    np.testing.assert_allclose(timesteps, expected, rtol=0, atol=0 if integer else 0.02)
    if hasattr(ref, "sigmas"):
        np.testing.assert_allclose(np.array(ours.sigmas), ref.sigmas.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(float(ours.init_noise_sigma), float(ref.init_noise_sigma), rtol=1e-6)
    assert ours.order == ref.order


def assert_close(ours, ref, where="", tolerance=1e-5):
    """ours (NHWC) within `tolerance` (1e-5) of ref (NCHW), relative to the largest |ref|.

    diffusers computes the step coefficients (sqrt, log, exp of sigmas and alphas) in torch float32, we compute them
    in float64: they differ by ~1 float32 ulp, which moves a result by a few ulps of its largest operand (e.g.
    sigma * eps ~ 40 early on, where the result may be near 0)."""
    ref = ref.permute(0, 2, 3, 1).numpy()
    ours = np.array(ours)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(ours, ref, rtol=tolerance, atol=tolerance * scale, err_msg=where)


def relative_difference(a, b):
    return float((a - b).abs().max() / b.abs().max())


# samplers whose every step coefficient derives from `sigmas`: diffusers runs them in float64 once those are cast
FLOAT64_REFERENCE = {"dpmpp_2s_a", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc", "deis"}


def run_loop(ours, ref, monkeypatch, seed=0, ref64=None):
    """Samples the whole schedule with both, on the same random model outputs and noise, comparing every step.

    ref64: the reference again, set up with float64 sigmas. The multistep solvers' higher-order coefficients
    (differences of lambda over short steps, DEIS' log-rho integrals, UniPC's linear systems) lose precision in
    diffusers' float32 arithmetic where steps are short (the beta schedule near sigma_max: diffusers' float32 result
    is up to 2e-4 from its own float64 one). There ours must be within 1e-5 of diffusers in float64, and within 1e-5
    of diffusers in float32 or, where that is further from its float64 run, no further than twice that."""
    if ref.timesteps[0] in ref.timesteps[1:] and not isinstance(ref, diffusers.PNDMScheduler):
        return  # diffusers cannot: its step counter starts at the 2nd match and overruns (cosine-schedule Karras)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32)) * float(ref.init_noise_sigma)
    x_ref, x_ref64, x_ours = x, x.double(), nchw_to_nhwc(x)
    current = {}
    monkeypatch.setattr(sys.modules[type(ref).__module__], "randn_tensor", lambda *a, **k: current["noise"], False)
    assert len(ours.timesteps) == len(ref.timesteps)
    for i, (t_ref, t_ours) in enumerate(zip(ref.timesteps, ours.timesteps)):
        where = f"step {i} of {len(ref.timesteps)}"
        same_input = torch.from_numpy(np.array(x_ours)).permute(0, 3, 1, 2)
        assert_close(ours.scale_model_input(x_ours, t_ours), ref.scale_model_input(same_input, t_ref), where)
        model_output = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32))
        current["noise"] = noise = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32))
        if isinstance(ref, diffusers.DPMSolverSDEScheduler):
            ref.noise_sampler = lambda sigma, sigma_next: current["noise"]
        kwargs = {"eta": ours.config["eta"]} if isinstance(ref, diffusers.TCDScheduler) else {}
        x_ref = ref.step(model_output, t_ref, x_ref, **kwargs).prev_sample
        x_ours = ours.step(nchw_to_nhwc(model_output), t_ours, x_ours, noise=nchw_to_nhwc(noise))
        if ref64 is None:
            assert_close(x_ours, x_ref, where)
            continue
        x_ref64 = ref64.step(model_output.double(), t_ref, x_ref64).prev_sample
        assert_close(x_ours, x_ref64, where)
        assert_close(x_ours, x_ref, where, max(1e-5, 2 * relative_difference(x_ref, x_ref64)))


def set_timesteps(ours, ref, steps, ref64=None):
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert_same_schedule(ours, ref)
    if ref64 is not None:
        ref64.set_timesteps(steps)
        ref64.sigmas = ref64.sigmas.double()


def trailing_quirk(config, n):
    """diffusers' trailing spacing makes np.arange(N, 0, -N / n), which for some n has n + 1 points (the last
    a timestep -1); mlx_sd keeps the first n."""
    num_train = config.get("num_train_timesteps", 1000)
    return config.get("timestep_spacing") == "trailing" and len(np.arange(num_train, 0, -num_train / n)) != n


def spacings(sampler):
    return ["leading", "linspace", "trailing"] if "sgm_uniform" in SAMPLERS[sampler].schedules else [None]


def loop_cases():
    """Every sampler x schedule: the default schedule with every spacing, the sigma schedules with one spacing each
    in turn (with euler, which also reads sigma_min / sigma_max, with every spacing), and sgm_uniform."""
    for sampler, s in SAMPLERS.items():
        for schedule in (None, *s.schedules):
            if schedule == "sgm_uniform":
                chosen = [None]
            elif schedule is None or sampler == "euler":
                chosen = spacings(sampler)
            else:
                chosen = [spacings(sampler)[list(SCHEDULES).index(schedule) % len(spacings(sampler))]]
            yield from ((sampler, schedule, spacing) for spacing in chosen)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler,schedule,spacing", list(loop_cases()))
def test_sampling_loop(monkeypatch, sampler, schedule, spacing, prediction_type):
    """Every sampler x schedule x spacing, SD 1.5's betas with steps_offset 1, for 1, 3 and 24 steps (the
    multistep solvers' full order; under 15 steps they end at first order) on the same instances."""
    config = {**SD15_CONFIG, "prediction_type": prediction_type}
    ours = make_scheduler(sampler, config, schedule=schedule, timestep_spacing=spacing)
    ref = reference(sampler, config, schedule, spacing)
    ref64 = reference(sampler, config, schedule, spacing) if sampler in FLOAT64_REFERENCE else None
    for steps in (1, 3, 24):
        set_timesteps(ours, ref, steps, ref64)
        run_loop(ours, ref, monkeypatch, steps, ref64)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if "sgm_uniform" in SAMPLERS[s].schedules])
def test_schedules_for_many_step_counts(sampler, spacing):
    """Rounding edge cases of the spacings (np.arange with a float step, round half to even), up to 1000 steps.
    Where diffusers' trailing spacing has one point too many (a timestep -1), ours has the n requested."""
    config = {**SD15_CONFIG, "timestep_spacing": spacing}
    ours, ref = make_scheduler(sampler, config), reference(sampler, config)
    counts = [*range(1, 41), 48, 80, 99, 100, 150, 333, 999]
    if sampler not in ("dpm2", "dpm2_a", "heun", "dpmpp_sde"):  # 1000 x 1000 float32 searches in diffusers: slow
        counts += [61, 769, 998, 1000]
    for steps in counts:
        if steps > ours.max_steps():
            continue
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        if trailing_quirk(config, steps):
            assert len(ref.timesteps) > len(ours.timesteps) and ours.num_inference_steps == steps
            continue
        assert_same_schedule(ours, ref)


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_real_configs(monkeypatch, sampler, config_name):
    """Each sampler built from each config as diffusers' `Cls.from_config(cfg, **sampler options)`; the same
    instances serve several step counts, so set_timesteps must reset the multistep state."""
    config = CONFIGS[config_name]
    ours, ref = make_scheduler(sampler, config), reference(sampler, config)
    ref64 = reference(sampler, config) if sampler in FLOAT64_REFERENCE else None
    for steps in (1, 4, 25, 4):
        if sampler == "dpm2_a" and config_name == "cosine" and steps == 4:
            # sigma_max / sigma_next > 4000: diffusers' float32 sigma_down is 0 and its first midpoint NaN
            ours.set_timesteps(steps)
            ref.set_timesteps(steps)
            assert torch.isnan(ref.timesteps).any() and np.isfinite(np.array(ours.timesteps)).all()
            continue
        set_timesteps(ours, ref, steps, ref64)
        run_loop(ours, ref, monkeypatch, steps, ref64)


OPTION_CASES = [
    ("euler", dict(final_sigmas_type="sigma_min")),
    ("euler", dict(prediction_type="sample")),
    ("euler", dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0)),
    ("euler", dict(use_beta_sigmas=True, sigma_min=0.1, sigma_max=10.0)),
    ("heun", dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.5)),
    ("heun", dict(use_exponential_sigmas=True, sigma_min=0.2)),
    ("lms", dict(prediction_type="sample")),
    ("ddim", dict(clip_sample=True, set_alpha_to_one=True)),
    ("ddim", dict(clip_sample=True, clip_sample_range=2.0, prediction_type="sample")),
    ("pndm", dict(set_alpha_to_one=True)),
    ("dpmpp_2m", dict(final_sigmas_type="sigma_min")),  # first order at the end below 15 steps only
    ("dpmpp_2m", dict(final_sigmas_type="sigma_min", lower_order_final=False)),
    ("dpmpp_2m", dict(final_sigmas_type="sigma_min", euler_at_final=True)),
    ("dpmpp_2m", dict(lambda_min_clipped=-3.0)),
    ("dpmpp_2m", dict(prediction_type="sample")),
    ("dpmpp_2m", dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0)),
    ("dpmpp_2m", dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2")),
    ("dpmpp_2m_sde", dict(final_sigmas_type="sigma_min", prediction_type="v_prediction")),
    ("dpmpp_3m_sde", dict(lower_order_final=False)),
    ("dpmpp_2s_a", dict(final_sigmas_type="sigma_min")),  # lower_order_final stays off for even step counts
    ("dpmpp_2s_a", dict(algorithm_type="sde-dpmsolver++")),
    ("dpmpp_2s_a", dict(solver_order=1, lambda_min_clipped=-4.0)),
    ("unipc", dict(solver_type="bh1", final_sigmas_type="sigma_min")),  # bh1 ending at sigma 0: NaN in diffusers
    ("unipc", dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min")),
    ("unipc", dict(predict_x0=False, prediction_type="v_prediction")),
    ("unipc", dict(disable_corrector=[0, 2], use_karras_sigmas=True, final_sigmas_type="sigma_min")),
    ("deis", dict(solver_order=3)),
    ("deis", dict(solver_order=1, prediction_type="sample")),
    ("lcm", dict(original_inference_steps=20, timestep_scaling=5.0)),
    ("lcm", dict(clip_sample=True, prediction_type="v_prediction", set_alpha_to_one=False)),
    ("tcd", dict(eta=0.0)),
    ("tcd", dict(eta=1.0, prediction_type="sample")),
    ("tcd", dict(eta=0.75, original_inference_steps=25)),
]


@pytest.mark.parametrize("sampler,options", OPTION_CASES)
def test_options(monkeypatch, sampler, options):
    """Options off the sampler's defaults (also those the sampler's name fixes), at 10, 20 and 11 steps."""
    ours = make_scheduler(sampler, SD15_CONFIG, **options)
    options = {k: v for k, v in options.items() if k != "eta"}  # a step argument in diffusers (run_loop passes it)
    ref = reference(sampler, SD15_CONFIG, **options)
    ref64 = reference(sampler, SD15_CONFIG, **options) if sampler in FLOAT64_REFERENCE else None
    for steps in (10, 20, 11):
        set_timesteps(ours, ref, steps, ref64)
        run_loop(ours, ref, monkeypatch, steps, ref64)


@pytest.mark.parametrize("config_name", [SD15, SD21, SD_TURBO, SDXL_TURBO])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_add_noise(sampler, config_name):
    """add_noise at a (B,) batch of timesteps and at a scalar timestep, as mx arrays and as Python numbers."""
    ours, ref = make_scheduler(sampler, CONFIGS[config_name]), reference(sampler, CONFIGS[config_name])
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    generator = torch.Generator().manual_seed(0)
    original, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    last = len(ref.timesteps) - 2
    for index in ([0, 6], [last, 3], [last]):
        t_ref = ref.timesteps[index]
        t_ours = ours.timesteps[mx.array(index)] if len(index) > 1 else ours.timesteps[index[0]]
        expected = ref.add_noise(original, noise, t_ref)
        # one multiply-add with a coefficient that may differ by a float32 ulp (see assert_same_schedule)
        for t in (t_ours, t_ours.tolist()):
            got = ours.add_noise(nchw_to_nhwc(original), nchw_to_nhwc(noise), t)
            np.testing.assert_allclose(np.array(got), expected.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", sorted(NOISY))
def test_noise_defaults_to_a_normal_draw(sampler):
    """Without `noise`, the samplers that need it draw standard normal noise from MLX's global generator."""
    ours = make_scheduler(sampler, SD15_CONFIG)
    sample = mx.random.normal((1, 8, 8, 4), key=mx.random.key(1))
    model_output = mx.random.normal((1, 8, 8, 4), key=mx.random.key(2))

    def steps(noise=None, count=3):
        ours.set_timesteps(4)
        mx.random.seed(3)
        x = sample
        for t in ours.timesteps.tolist()[:count]:
            x = ours.step(model_output, t, ours.scale_model_input(x, t), noise=noise)
        return np.array(x)

    drawn = steps()
    assert np.array_equal(drawn, steps())
    assert not np.allclose(drawn, steps(mx.zeros(sample.shape)), atol=1e-3)
    first = 2 if sampler == "dpm2_a" else 1  # DPM2 a adds noise in its second stage
    mx.random.seed(3)
    noise = mx.random.normal(sample.shape)
    assert np.array_equal(steps(count=first), steps(noise, count=first))

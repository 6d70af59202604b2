"""End to end with each family of sampler: the same tiny random pipeline run by diffusers (with the sampler's
scheduler class) and by mlx_sd, with the same initial latents and, for ancestral / SDE / consistency samplers, the
same per-step noise (mlx_sd's `step_noise`, injected into diffusers' scheduler: helpers.injected_step_noise).

Tolerance (float32): final 8-bit images within 0.5/255 mean and 2/255 max absolute difference.
"""

import mlx.core as mx
import numpy as np
import pytest

from helpers import DIFFUSERS_SCHEDULERS, assert_images_close, make_pipeline, run_both
from mlx_sd import StableDiffusion

# diffusers' schedulers pass torch tensors to numpy functions
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """family -> (diffusers pipeline, mlx_sd pipeline) on the same saved folder."""
    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            reference = make_pipeline(family, folder)
            cache[family] = (reference, StableDiffusion.from_pretrained(folder, dtype="float32"))
        return cache[family]

    return get


NOISY = ("dpm2_a_karras", "dpmpp_sde_karras", "dpmpp_2m_sde_exponential", "dpmpp_3m_sde", "lcm", "tcd", "euler_a")
CASES = [
    # family, sampler, width, height, steps, guidance
    ("sd1", "pndm", 64, 48, 5, 7.5),  # SD 1.5's own scheduler config
    ("sd1", "heun", 48, 48, 3, 7.5),
    ("sd1", "lms_karras", 48, 64, 6, 5.0),
    ("sd1", "dpm2", 48, 48, 3, 7.5),
    ("sd1", "dpm2_a_karras", 64, 48, 4, 7.5),
    ("sd1", "dpmpp_2s_a", 48, 48, 4, 7.5),
    ("sd1", "dpmpp_sde_karras", 48, 48, 3, 7.5),
    ("sd1", "dpmpp_2m_sde_exponential", 48, 64, 5, 5.0),
    ("sd1", "deis_beta", 48, 48, 5, 7.5),
    ("sd1", "lcm", 48, 48, 4, 1.0),
    ("sd1", "tcd", 48, 48, 4, 1.0),
    ("sd2v", "dpmpp_3m_sde", 48, 48, 6, 7.5),  # v-prediction
    ("sd2v", "unipc", 48, 64, 5, 7.5),
    ("sd2v", "heun", 48, 48, 2, 7.5),
    ("sdxl", "euler_sgm_uniform", 64, 64, 2, 0.0),  # SDXL-Lightning's recipe: Euler, trailing, no guidance
    ("sd1", "ddim_sgm_uniform", 48, 48, 2, 0.0),  # Hyper-SD's: DDIM, trailing
    ("sd1", "euler_a", 48, 48, 3, 7.5),
]


@pytest.mark.parametrize("family,sampler,width,height,steps,guidance", CASES)
def test_sampler_matches_diffusers(pipelines, family, sampler, width, height, steps, guidance):
    reference, ours = pipelines(family)
    num_images = 2 if sampler in ("dpmpp_sde_karras", "tcd") else 1  # per-image noise streams in a batch
    got, expected = run_both(reference, ours, sampler, width, height, steps, guidance, num_images)
    assert_images_close(got, expected)
    if sampler in NOISY:  # the step noise matters, so its injection is what made the images equal
        latents = mx.random.normal((1, height // 8, width // 8, 4), key=mx.random.key(5))
        settings = dict(width=width, height=height, steps=steps, guidance_scale=guidance, sampler=sampler)
        a, b = (ours.generate("a photo", seed=seed, latents=latents, **settings)[0] for seed in (0, 99))
        assert np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() > 1


def test_sd15_defaults_to_its_pndm_config(pipelines):
    """SD 1.5's scheduler_config.json names PNDMScheduler: mlx_sd's default sampler is PLMS, as diffusers'."""
    _, ours = pipelines("sd1")
    assert ours.defaults.sampler == "pndm"


@pytest.mark.parametrize(
    "ours,reference,reference_kwargs",
    [
        (
            dict(sampler="euler", timestep_spacing="trailing"),
            ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
            {},
        ),
        (dict(sampler="LMS", schedule="Karras"), ("LMSDiscreteScheduler", {"use_karras_sigmas": True}), {}),
        (dict(sampler="DPM++ 2M SDE", schedule="exponential"), DIFFUSERS_SCHEDULERS["dpmpp_2m_sde_exponential"], {}),
        (dict(sampler="tcd", eta=0.7), ("TCDScheduler", {}), {"eta": 0.7}),
    ],
)
def test_schedule_spacing_and_eta_settings_match_diffusers(pipelines, ours, reference, reference_kwargs):
    """The settings' separate schedule, timestep_spacing and eta fields, against the diffusers options they name."""
    reference_pipe, pipe = pipelines("sd1")
    sampler = ours.pop("sampler")
    guidance = 1.0 if sampler == "tcd" else 7.5
    got, expected = run_both(reference_pipe, pipe, sampler, 48, 48, 4, guidance, reference_scheduler=reference,
                             reference_kwargs=reference_kwargs, ours_kwargs=ours)  # fmt: skip
    assert_images_close(got, expected)

"""Few-step samplers of distilled models: LCM (Luo et al. 2023) and TCD (Zheng et al. 2024), diffusers
`LCMScheduler` and `TCDScheduler`. Both take their timesteps from the distillation schedule of
`original_inference_steps` points, so `timestep_spacing` does not apply to them."""

import math

import mlx.core as mx

from .base import draw_noise
from .ddim import AlphaScheduler
from .schedules import f32

_DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    original_inference_steps=50,
    clip_sample=False,
    clip_sample_range=1.0,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="epsilon",
    timestep_spacing="leading",  # unused, as in diffusers
    timestep_scaling=10.0,
)


class _Distilled(AlphaScheduler):
    """The skipping-step schedule shared by LCM and TCD."""

    defaults = _DEFAULTS
    unsupported = dict(thresholding=False, rescale_betas_zero_snr=False)

    def __init__(self, **config):
        super().__init__(**config)
        if not 1 <= self.config["original_inference_steps"] <= self.config["num_train_timesteps"]:
            raise ValueError(f"{self.label}: original_inference_steps must be between 1 and num_train_timesteps")

    def _upper_steps(self):
        return self.config["original_inference_steps"]

    def limit_note(self):
        return f" (the distillation schedule's original_inference_steps, {self.config['original_inference_steps']})"

    def _plan(self, n):
        """n of the original_inference_steps timesteps k - 1, 2k - 1, ..., taken at evenly spaced indices from the
        top (diffusers `set_timesteps` with strength 1)."""
        original = self.config["original_inference_steps"]
        if n > original:
            return None
        k = self.config["num_train_timesteps"] // original
        origin = [i * k - 1 for i in range(original, 0, -1)]
        return [origin[math.floor(i * (original / n))] for i in range(n)]

    def _apply(self, timesteps):
        self._set_timesteps_list(timesteps)

    def _epsilon_and_x0(self, model_output, sample, a_t):
        """(x0, eps) from the model output at alphas_cumprod a_t."""
        sqrt_a, sqrt_b = math.sqrt(a_t), math.sqrt(1 - a_t)
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return (sample - sqrt_b * model_output) / sqrt_a, model_output
        if kind == "v_prediction":
            return sqrt_a * sample - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * sample
        return model_output, (sample - sqrt_a * model_output) / sqrt_b


class LCMScheduler(_Distilled):
    """Latent consistency model multistep sampling (Luo et al. 2023, Algorithm 1): the consistency function's
    denoised sample c_skip x + c_out x0, noised again to the next timestep with `noise` (except at the end)."""

    def step(self, model_output, t, sample, noise=None):
        """`noise` defaults to mx.random.normal."""
        i = self._begin_step(t)
        t = self._timesteps[i]
        prev_t = self._timesteps[i + 1] if i + 1 < len(self._timesteps) else t
        a_t, a_prev = self.alphas_cumprod[t], self._alpha(prev_t)
        # boundary condition scalings (Song et al. 2023, consistency models; sigma_data = 0.5)
        scaled = t * self.config["timestep_scaling"]
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / math.sqrt(scaled**2 + 0.25)
        x0, _ = self._epsilon_and_x0(model_output, sample, a_t)
        if self.config["clip_sample"]:
            x0 = mx.clip(x0, -self.config["clip_sample_range"], self.config["clip_sample_range"])
        denoised = c_out * x0 + c_skip * sample
        self._step_index += 1
        if i == self.num_inference_steps - 1:
            return denoised
        return math.sqrt(a_prev) * denoised + math.sqrt(1 - a_prev) * draw_noise(noise, sample)


class TCDScheduler(_Distilled):
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024, Algorithm 4):
    from x0 and eps, jump to the intermediate timestep s = floor((1 - eta) t_prev), then noise forward to t_prev.
    `eta` (gamma in the paper, diffusers' step argument, default 0.3) sets the stochasticity: 0 is deterministic."""

    defaults = dict(**_DEFAULTS, eta=0.3)

    def __init__(self, **config):
        super().__init__(**config)
        if not 0 <= self.config["eta"] <= 1:
            raise ValueError(f"{self.label}: eta must be between 0 and 1, got {self.config['eta']}")

    def step(self, model_output, t, sample, noise=None):
        """`noise` defaults to mx.random.normal (used when eta > 0, except at the last step)."""
        i = self._begin_step(t)
        t = self._timesteps[i]
        prev_t = self._timesteps[i + 1] if i + 1 < len(self._timesteps) else 0
        eta = self.config["eta"]
        s = math.floor(f32(f32(1 - eta) * prev_t))  # torch: a Python float times an integer tensor, in float32
        a_t, a_prev, a_s = self.alphas_cumprod[t], self._alpha(prev_t), self.alphas_cumprod[s]
        x0, eps = self._epsilon_and_x0(model_output, sample, a_t)
        noised = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
        self._step_index += 1
        if eta == 0 or i == self.num_inference_steps - 1:
            return noised
        return math.sqrt(a_prev / a_s) * noised + math.sqrt(1 - a_prev / a_s) * draw_noise(noise, sample)

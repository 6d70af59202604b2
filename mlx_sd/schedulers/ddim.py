"""Samplers on integer timesteps of the training schedule: DDIM and PLMS (diffusers `DDIMScheduler`,
`PNDMScheduler` with skip_prk_steps), and their shared x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps bookkeeping."""

import math

import mlx.core as mx

from .base import Scheduler, as_list, descending, per_sample
from .schedules import f32, spaced_timesteps

_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)


class AlphaScheduler(Scheduler):
    """Timesteps index alphas_cumprod directly; the step before timestep 0 has `final_alpha_cumprod`."""

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self._set_timesteps_list(list(range(self.config["num_train_timesteps"] - 1, -1, -1)))

    def _set_timesteps_list(self, timesteps):
        self.timesteps = mx.array(timesteps, dtype=mx.int64)
        self._timesteps = list(timesteps)
        self._step_index = None

    def _in_range(self, timesteps):
        """Strictly descending timesteps inside the training range."""
        ok = descending(timesteps) and timesteps[-1] >= 0 and timesteps[0] < self.config["num_train_timesteps"]
        return timesteps if ok else None

    def _alpha(self, t):
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def add_noise(self, original, noise, t):
        """sqrt(a_t) original + sqrt(1 - a_t) noise."""
        a = [self.alphas_cumprod[int(s)] for s in as_list(t)]
        sqrt_a, sqrt_b = [math.sqrt(x) for x in a], [math.sqrt(f32(1 - x)) for x in a]
        return per_sample(sqrt_a, t, original) * original + per_sample(sqrt_b, t, original) * noise


class DDIMScheduler(AlphaScheduler):
    """Deterministic DDIM (eta = 0), Song et al. 2020 eq. 12, diffusers `DDIMScheduler`."""

    defaults = dict(
        **_BETAS,
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    unsupported = dict(thresholding=False, rescale_betas_zero_snr=False)

    def _plan(self, n):
        return self._in_range([round(t) for t in spaced_timesteps(self.config, n)])

    def _apply(self, timesteps):
        self._set_timesteps_list(timesteps)

    def step(self, model_output, t, sample, noise=None):
        """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps; `noise` is unused (eta = 0)."""
        t = int(t.item() if isinstance(t, mx.array) else t)
        a_t = self.alphas_cumprod[t]
        a_prev = self._alpha(t - self.config["num_train_timesteps"] // self.num_inference_steps)
        sqrt_a, sqrt_b = f32(math.sqrt(a_t)), f32(math.sqrt(f32(1 - a_t)))
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0, eps = (sample - sqrt_b * model_output) / sqrt_a, model_output
        elif kind == "v_prediction":
            x0, eps = sqrt_a * sample - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * sample
        else:
            x0, eps = model_output, (sample - sqrt_a * model_output) / sqrt_b
        if self.config["clip_sample"]:
            x0 = mx.clip(x0, -self.config["clip_sample_range"], self.config["clip_sample_range"])
        return f32(math.sqrt(a_prev)) * x0 + f32(math.sqrt(f32(1 - a_prev))) * eps


class PNDMScheduler(AlphaScheduler):
    """PLMS, the linear multistep part of PNDM (Liu et al. 2022, eq. 12 and the transfer eq. 9), diffusers
    `PNDMScheduler` with skip_prk_steps=True (A1111's PLMS; the Runge-Kutta warm-up is not implemented): the
    first step is redone with the mean of two model outputs (improved Euler), so n steps make n + 1 model calls."""

    defaults = dict(
        **_BETAS,
        set_alpha_to_one=False,
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=0,
    )
    unsupported = dict(skip_prk_steps=True)
    prediction_types = ("epsilon", "v_prediction")

    def _plan(self, n):
        return self._in_range([round(t) for t in spaced_timesteps(self.config, n)])

    def _apply(self, timesteps):
        ascending = timesteps[::-1]
        self._set_timesteps_list((ascending[:-1] + ascending[-2:-1] + ascending[-1:])[::-1])
        self._ets, self._counter, self._start = [], 0, None

    def step(self, model_output, t, sample, noise=None):
        """Adams-Bashforth combination of up to the last 4 model outputs, then the PNDM transfer from t to the
        previous timestep; `noise` is unused."""
        t = int(t.item() if isinstance(t, mx.array) else t)
        stride = self.config["num_train_timesteps"] // self.num_inference_steps
        prev_t = t - stride
        if self._counter == 1:  # the first step again, from its start
            prev_t, t = t, t + stride
        else:
            self._ets = self._ets[-3:] + [model_output]
        e = self._ets
        if len(e) == 1 and self._counter == 0:
            self._start = sample
        elif len(e) == 1:
            model_output, sample, self._start = (model_output + e[-1]) / 2, self._start, None
        elif len(e) == 2:
            model_output = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            model_output = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        self._counter += 1
        return self._transfer(sample, t, prev_t, model_output)

    def _transfer(self, sample, t, prev_t, model_output):
        """diffusers `_get_prev_sample`: PNDM eq. 9, x_prev from x_t and the (combined) noise prediction."""
        a_t, a_prev = self.alphas_cumprod[t], self._alpha(prev_t)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.config["prediction_type"] == "v_prediction":
            model_output = math.sqrt(a_t) * model_output + math.sqrt(b_t) * sample
        denominator = a_t * math.sqrt(b_prev) + math.sqrt(a_t * b_t * a_prev)
        return math.sqrt(a_prev / a_t) * sample - ((a_prev - a_t) / denominator) * model_output

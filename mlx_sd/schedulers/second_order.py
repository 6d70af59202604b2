"""Two model calls per step, in sigma space: Heun, DPM2, DPM2 ancestral and DPM++ SDE (diffusers
`HeunDiscreteScheduler`, `KDPM2DiscreteScheduler`, `KDPM2AncestralDiscreteScheduler`, `DPMSolverSDEScheduler`).

As in diffusers, `timesteps` lists every model call (2n - 1 for n steps: the last step is a plain Euler step to
sigma 0), so a denoising loop over `timesteps` with `scale_model_input` and `step` drives them unchanged. The
step alternates between a first stage (which keeps the sample it started from) and a second stage.
"""

import math

import mlx.core as mx

from .base import KarrasScheduler, draw_noise
from .euler import SIGMA_OPTIONS
from .schedules import f32, sigma_to_t, sigma_to_t_f32

_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear", trained_betas=None)
_SPACING = dict(timestep_spacing="linspace", steps_offset=0)


def _twice(values):
    """Each value repeated: diffusers' repeat_interleave(2)."""
    return [v for v in values for _ in (0, 1)]


def _ancestral_up(sigma, sigma_next):
    """sqrt(next^2 (sigma^2 - next^2) / sigma^2) in float32 (0 at sigma 0, where diffusers' is NaN and unused)."""
    if sigma == 0:
        return 0.0
    a, b = f32(sigma * sigma), f32(sigma_next * sigma_next)
    return f32(math.sqrt(f32(f32(b * f32(a - b)) / a)))


def _ancestral_down(sigma_next, up, sigma):
    """sqrt(next^2 - up^2) in float32; where that underflows to 0 before sigma 0 (a first sigma thousands of times
    the next, as with the cosine schedule), diffusers' midpoint is NaN: there the exact next^2 / sigma is kept."""
    down = f32(math.sqrt(f32(f32(sigma_next * sigma_next) - f32(up * up))))
    return down if down > 0 or sigma_next == 0 else sigma_next * sigma_next / sigma


def _log_midpoint(a, b):
    """exp(lerp(log a, log b, 0.5)) in float32, as torch computes it (lerp at 0.5: end - (end - start) / 2)."""
    if a == 0 or b == 0:
        return 0.0
    start, end = f32(math.log(a)), f32(math.log(b))
    return f32(math.exp(f32(end - f32(f32(end - start) * 0.5))))


class _TwoStage(KarrasScheduler):
    """The first-stage / second-stage bookkeeping of diffusers' order-2 samplers."""

    order = 2

    def __init__(self, **config):
        super().__init__(**config)
        self._set_schedule([], [0.0])
        self._saved = None

    def _first_stage(self):
        return self._saved is None


class HeunDiscreteScheduler(_TwoStage):
    """Heun's method (Karras et al. 2022, Algorithm 1 without churn), diffusers `HeunDiscreteScheduler`: an Euler
    step to sigma_next, then the step redone with the mean of the two slopes."""

    defaults = dict(
        **_BETAS, **SIGMA_OPTIONS, **_SPACING, prediction_type="epsilon", clip_sample=False, clip_sample_range=1.0
    )

    def _plan(self, n):
        return self._spaced_plan(n)

    def _apply(self, plan):
        timesteps, sigmas = plan
        self._set_schedule(timesteps[:1] + _twice(timesteps[1:]), sigmas[:1] + _twice(sigmas[1:]) + [0.0])
        self._saved = None

    def scale_model_input(self, sample, t):
        sigma = self._sigmas[self._begin_step(t)]
        return sample / math.sqrt(sigma**2 + 1)

    def step(self, model_output, t, sample, noise=None):
        """Stage 1: x + d(x, sigma) dt; stage 2: x_start + (d_1 + d(x, sigma_next)) / 2 dt. `noise` is unused."""
        i, s = self._begin_step(t), self._sigmas
        sample = sample.astype(mx.float32)
        if self._first_stage():
            sigma, sigma_next = s[i], s[i + 1]
            x0 = self._pred_original(model_output, sample, sigma)
        else:
            sigma, sigma_next = s[i - 1], s[i]
            x0 = self._pred_original(model_output, sample, sigma_next)
        if self.config["clip_sample"]:
            x0 = mx.clip(x0, -self.config["clip_sample_range"], self.config["clip_sample_range"])
        if self._first_stage():
            derivative, dt = (sample - x0) / sigma, f32(sigma_next - sigma)
            self._saved = (derivative, sample)
        else:
            first_derivative, start = self._saved
            derivative, dt = (first_derivative + (sample - x0) / sigma_next) / 2, f32(sigma_next - sigma)
            sample, self._saved = start, None
        self._step_index += 1
        return (sample + derivative * dt).astype(model_output.dtype)


class KDPM2DiscreteScheduler(_TwoStage):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1) as k-diffusion's `sample_dpm_2`, diffusers
    `KDPM2DiscreteScheduler`: an Euler step to the log-midpoint sigma, then the full step with its slope."""

    defaults = dict(**_BETAS, **SIGMA_OPTIONS, **_SPACING, prediction_type="epsilon")
    prediction_types = ("epsilon", "v_prediction")

    def _plan(self, n):
        return self._spaced_plan(n, round_karras=True)

    def _apply(self, plan):
        timesteps, sigmas = plan
        sigmas = [f32(s) for s in sigmas] + [0.0]  # diffusers derives the midpoints from float32 sigmas
        # the geometric mean of each sigma and the one before; 0 next to sigma 0
        mid = [0.0] + [_log_midpoint(a, b) for a, b in zip(sigmas[1:], sigmas)]
        mid_timesteps = [sigma_to_t_f32(m, self.log_sigmas) for m in mid[1:-1]]
        steps = timesteps[:1] + [t for pair in zip(mid_timesteps, timesteps[1:]) for t in pair]
        self._set_schedule(steps, sigmas[:1] + _twice(sigmas[1:]) + [0.0])
        self._mid = mid[:1] + _twice(mid[1:]) + mid[-1:]
        self._saved = None

    def scale_model_input(self, sample, t):
        i = self._begin_step(t)
        sigma = self._sigmas[i] if self._first_stage() else self._mid[i]
        return sample / math.sqrt(sigma**2 + 1)

    def step(self, model_output, t, sample, noise=None):
        """Stage 1: Euler step to the midpoint; stage 2: from the start with the midpoint's slope. `noise` is unused."""
        i, s = self._begin_step(t), self._sigmas
        sample = sample.astype(mx.float32)
        if self._first_stage():
            sigma, mid = s[i], self._mid[i + 1]
            derivative = (sample - self._pred_original(model_output, sample, sigma)) / sigma
            dt, self._saved = f32(mid - sigma), sample
        else:
            sigma, mid, sigma_next = s[i - 1], self._mid[i], s[i]
            derivative = (sample - self._pred_original(model_output, sample, mid)) / mid
            dt, sample, self._saved = f32(sigma_next - sigma), self._saved, None
        self._step_index += 1
        return (sample + derivative * dt).astype(model_output.dtype)


class KDPM2AncestralDiscreteScheduler(_TwoStage):
    """DPM-Solver-2 with ancestral noise, k-diffusion `sample_dpm_2_ancestral`, diffusers
    `KDPM2AncestralDiscreteScheduler`: the DPM2 step aims at sigma_down, then noise of std sigma_up is added."""

    defaults = KDPM2DiscreteScheduler.defaults
    prediction_types = ("epsilon", "v_prediction")

    def _plan(self, n):
        return self._spaced_plan(n, round_karras=True)

    def _apply(self, plan):
        timesteps, sigmas = plan
        sigmas = [f32(s) for s in sigmas]  # diffusers derives the rest from float32 sigmas
        sigmas, following = sigmas + [0.0], sigmas[1:] + [0.0, 0.0]
        # k-diffusion `get_ancestral_step` (eta = 1) and the log-midpoints, in float32 as diffusers computes them:
        # sigma_down = sqrt(next^2 - up^2) cancels, so float64 would differ from diffusers by up to 1e-3 relative
        up = [_ancestral_up(a, b) for a, b in zip(sigmas, following)]
        down = [_ancestral_down(b, u, a) for a, b, u in zip(sigmas, following, up)][:-1] + [0.0]
        mid = [_log_midpoint(a, d) for a, d in zip(sigmas, down)][:-2] + [0.0, 0.0]
        mid_timesteps = [sigma_to_t_f32(m, self.log_sigmas) for m in mid[:-2]]
        steps = timesteps[:1] + [t for pair in zip(mid_timesteps, timesteps[1:]) for t in pair]
        self._set_schedule(steps, sigmas[:1] + _twice(sigmas[1:]) + [0.0])
        self._mid, self._up, self._down = (v[:1] + _twice(v[1:]) + v[-1:] for v in (mid, up, down))
        self._saved = None

    def scale_model_input(self, sample, t):
        i = self._begin_step(t)
        sigma = self._sigmas[i] if self._first_stage() else self._mid[i - 1]
        return sample / math.sqrt(sigma**2 + 1)

    def step(self, model_output, t, sample, noise=None):
        """Stage 1: Euler step to the midpoint of sigma and sigma_down; stage 2: from the start to sigma_down with
        the midpoint's slope, plus `noise` (default mx.random.normal) times sigma_up."""
        i, s = self._begin_step(t), self._sigmas
        sample = sample.astype(mx.float32)
        self._step_index += 1
        if self._first_stage():
            sigma, mid = s[i], self._mid[i]
            derivative = (sample - self._pred_original(model_output, sample, sigma)) / sigma
            self._saved = sample
            return (sample + derivative * f32(mid - sigma)).astype(model_output.dtype)
        sigma, mid, up, down = s[i - 1], self._mid[i - 1], self._up[i - 1], self._down[i - 1]
        derivative = (sample - self._pred_original(model_output, sample, mid)) / mid
        prev_sample = self._saved + derivative * f32(down - sigma)
        self._saved = None
        return (prev_sample + draw_noise(noise, sample) * f32(up)).astype(model_output.dtype)


class DPMSolverSDEScheduler(_TwoStage):
    """DPM-Solver++(2S) SDE (k-diffusion `sample_dpmpp_sde`, A1111's "DPM++ SDE"), diffusers
    `DPMSolverSDEScheduler`: two ancestral DPM-Solver++ stages per step, through the midpoint in log sigma.

    Noise: diffusers draws it from a torchsde Brownian tree (`BrownianTreeNoiseSampler`, the increment over each
    stage scaled to unit variance); mlx_sd uses the `noise` given to each stage (the pipeline draws plain
    per-step standard normal noise from the image's seed), so the deterministic part is equal to diffusers'
    and the noise is a different draw of the same distribution.
    """

    defaults = dict(**_BETAS, **SIGMA_OPTIONS, **_SPACING, prediction_type="epsilon", noise_sampler_seed=None)
    prediction_types = ("epsilon", "v_prediction")

    def _plan(self, n):
        return self._spaced_plan(n, f32_timesteps=False)

    def _apply(self, plan):
        timesteps, sigmas = plan
        # the midpoint of each step in t = -log(sigma), in float64 as diffusers' `_second_order_timesteps`
        mids = [math.exp(-(-math.log(a) + (-math.log(b) + math.log(a)) * 0.5)) for a, b in zip(sigmas, sigmas[1:])]
        mid_timesteps = [sigma_to_t(m, self.log_sigmas) for m in mids]
        steps = timesteps[:1] + [t for pair in zip(mid_timesteps, timesteps[1:]) for t in pair]
        self._set_schedule(steps, sigmas[:1] + _twice(sigmas[1:]) + [0.0])
        self._saved, self._mid_sigma = None, None

    def scale_model_input(self, sample, t):
        i = self._begin_step(t)
        sigma = self._sigmas[i] if self._first_stage() else self._mid_sigma
        return sample / math.sqrt(sigma**2 + 1)

    def step(self, model_output, t, sample, noise=None):
        """Stage 1: ancestral DPM-Solver++ step to the midpoint; stage 2: from the start to sigma_next with the
        midpoint's x0; each adds `noise` (default mx.random.normal) times its sigma_up. The last step is Euler."""
        i, s = self._begin_step(t), self._sigmas
        first = self._first_stage()
        sigma, sigma_next = (s[i], s[i + 1]) if first else (s[i - 1], s[i])
        t_now, t_next = -math.log(sigma), (-math.log(sigma_next) if sigma_next > 0 else math.inf)
        t_mid = t_now + (t_next - t_now) * 0.5
        sample = sample.astype(mx.float32)
        x0 = self._pred_original(model_output, sample, sigma if first else math.exp(-t_mid))
        self._step_index += 1
        if sigma_next == 0:
            return (sample + (sample - x0) / sigma * f32(sigma_next - sigma)).astype(model_output.dtype)
        if first:
            t_next = t_mid
        else:
            sample = self._saved
        sigma_from, sigma_to = math.exp(-t_now), math.exp(-t_next)
        sigma_up = min(sigma_to, math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
        t_down = -math.log(math.sqrt(sigma_to**2 - sigma_up**2))
        prev_sample = (math.exp(-t_down) / sigma_from) * sample - math.expm1(t_now - t_down) * x0
        self._saved, self._mid_sigma = (sample, sigma_to) if first else (None, None)
        return (prev_sample + draw_noise(noise, sample) * sigma_up).astype(model_output.dtype)

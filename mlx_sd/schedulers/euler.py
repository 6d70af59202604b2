"""First-order and linear multistep samplers in sigma space: Euler, Euler ancestral, LMS (diffusers
`EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `LMSDiscreteScheduler`)."""

import math

import mlx.core as mx
from numpy.polynomial import polynomial

from .base import KarrasScheduler, draw_noise
from .schedules import f32

_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)
SIGMA_OPTIONS = dict(
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    sigma_min=None,  # diffusers reads these config keys in `_convert_to_*` whatever the class
    sigma_max=None,
)


class EulerDiscreteScheduler(KarrasScheduler):
    """Euler method of Karras et al. 2022 (Algorithm 2 without churn), diffusers `EulerDiscreteScheduler`."""

    defaults = dict(
        **_BETAS,
        **SIGMA_OPTIONS,
        prediction_type="epsilon",
        timestep_spacing="linspace",
        steps_offset=0,
        final_sigmas_type="zero",
    )
    unsupported = dict(interpolation_type="linear", timestep_type="discrete", rescale_betas_zero_snr=False)

    def __init__(self, **config):
        super().__init__(**config)
        if self.config.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
            raise ValueError(f"{self.label}: final_sigmas_type must be 'zero' or 'sigma_min'")
        n = self.config["num_train_timesteps"]
        self._set_schedule(list(range(n - 1, -1, -1)), self.train_sigmas[::-1] + [0.0])

    def _plan(self, n):
        return self._spaced_plan(n)

    def _apply(self, plan):
        timesteps, sigmas = plan
        final = self.train_sigmas[0] if self.config.get("final_sigmas_type") == "sigma_min" else 0.0
        self._set_schedule(timesteps, sigmas + [final])

    def scale_model_input(self, sample, t):
        """sample / sqrt(sigma^2 + 1): the model sees unit-variance inputs (Karras et al. 2022, Table 1)."""
        sigma = self._sigmas[self._begin_step(t)]
        return sample / math.sqrt(sigma**2 + 1)

    def step(self, model_output, t, sample, noise=None):
        """x_next = x + (x - x0) / sigma * (sigma_next - sigma); `noise` is unused."""
        i = self._begin_step(t)
        sigma, sigma_next = self._sigmas[i], self._sigmas[i + 1]
        sample = sample.astype(mx.float32)
        derivative = (sample - self._pred_original(model_output, sample, sigma)) / sigma
        self._step_index += 1
        return (sample + derivative * f32(sigma_next - sigma)).astype(model_output.dtype)


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Euler ancestral sampling (k-diffusion `sample_euler_ancestral`), diffusers `EulerAncestralDiscreteScheduler`."""

    defaults = dict(**_BETAS, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0)
    unsupported = dict(rescale_betas_zero_snr=False)
    prediction_types = ("epsilon", "v_prediction")

    def step(self, model_output, t, sample, noise=None):
        """Deterministic Euler step down to sigma_down, then fresh noise of std sigma_up (k-diffusion
        `get_ancestral_step`, eta = 1). `noise` defaults to mx.random.normal."""
        i = self._begin_step(t)
        sigma, sigma_to = self._sigmas[i], self._sigmas[i + 1]
        sigma_up = math.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
        sigma_down = math.sqrt(sigma_to**2 - sigma_up**2)
        sample = sample.astype(mx.float32)
        derivative = (sample - self._pred_original(model_output, sample, sigma)) / sigma
        prev_sample = sample + derivative * f32(sigma_down - sigma)
        self._step_index += 1
        return (prev_sample + draw_noise(noise, sample) * sigma_up).astype(model_output.dtype)


class LMSDiscreteScheduler(KarrasScheduler):
    """Linear multistep (Adams-Bashforth up to 4th order) in sigma, k-diffusion `sample_lms`, diffusers
    `LMSDiscreteScheduler`: x_next = x + sum_j c_j d_{i-j}, c_j the integral of the Lagrange basis over the step."""

    defaults = dict(**_BETAS, **SIGMA_OPTIONS, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0)
    lms_order = 4

    def __init__(self, **config):
        super().__init__(**config)
        self._set_schedule([], [0.0])

    def _plan(self, n):
        return self._spaced_plan(n)

    def _apply(self, plan):
        timesteps, sigmas = plan
        self._set_schedule(timesteps, sigmas + [0.0])
        self._derivatives = []

    def scale_model_input(self, sample, t):
        sigma = self._sigmas[self._begin_step(t)]
        return sample / math.sqrt(sigma**2 + 1)

    def _coefficient(self, order, i, j):
        """The integral from sigma_i to sigma_{i+1} of the Lagrange basis polynomial of sigma_{i-j} on the nodes
        sigma_i .. sigma_{i-order+1} (diffusers integrates it numerically with scipy.integrate.quad)."""
        s = self._sigmas
        others = [s[i - k] for k in range(order) if k != j]
        scale = math.prod(s[i - j] - x for x in others)
        antiderivative = polynomial.polyint(polynomial.polyfromroots(others) / scale)
        return float(polynomial.polyval(s[i + 1], antiderivative) - polynomial.polyval(s[i], antiderivative))

    def step(self, model_output, t, sample, noise=None):
        """One LMS step with the derivatives (x - x0) / sigma of up to the last 4 steps; `noise` is unused."""
        i = self._begin_step(t)
        sigma = self._sigmas[i]
        sample = sample.astype(mx.float32)
        derivative = (sample - self._pred_original(model_output, sample, sigma)) / sigma
        self._derivatives = [derivative, *self._derivatives][: self.lms_order]  # newest first
        order = min(i + 1, self.lms_order)
        coefficients = [self._coefficient(order, i, j) for j in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coefficients, self._derivatives))
        self._step_index += 1
        return prev_sample.astype(model_output.dtype)

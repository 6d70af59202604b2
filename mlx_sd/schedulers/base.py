"""What every sampler shares: diffusers' config handling, the step limit, and the step counter of the samplers
that walk a list of sigmas. Samples may have any layout (NHWC here): every update is elementwise."""

import math
from numbers import Integral

import mlx.core as mx

from .schedules import (
    SPACINGS,
    alphas_cumprod,
    convert_sigmas,
    f32,
    interp,
    karras_sigmas,
    sigma_schedule,
    sigma_to_t,
    spaced_timesteps,
)


def as_list(t):
    """A scalar timestep or (B,) timesteps -> a list of Python numbers."""
    t = t.tolist() if isinstance(t, mx.array) else t
    return list(t) if isinstance(t, (list, tuple)) else [t]


def per_sample(values, t, like):
    """Coefficients for the timesteps t: a scalar for a scalar t, else (B, 1, 1, 1) to broadcast against `like`."""
    a = mx.array(values, dtype=mx.float32).astype(like.dtype)
    batched = isinstance(t, (list, tuple)) or getattr(t, "ndim", 0) > 0
    return a.reshape((-1,) + (1,) * (like.ndim - 1)) if batched else a[0]


def descending(values):
    return all(a > b for a, b in zip(values, values[1:]))


def draw_noise(noise, like):
    """The step's noise: the given array, or a standard normal draw shaped like `like`."""
    return mx.random.normal(like.shape, dtype=mx.float32) if noise is None else noise.astype(mx.float32)


class Scheduler:
    """Config handling shared by all samplers: diffusers' defaults, `from_config`, and set_timesteps' bound."""

    defaults: dict = {}
    unsupported: dict = {}  # options implemented only at this (diffusers default) value
    prediction_types = ("epsilon", "v_prediction", "sample")
    order = 1
    init_noise_sigma = 1.0
    name = None  # the sampler's name, for messages (make_scheduler sets it)

    def __init__(self, **config):
        label = type(self).__name__
        unknown = config.keys() - self.defaults.keys() - self.unsupported.keys()
        if unknown:
            raise TypeError(f"{label}: unknown options {sorted(unknown)}")
        for key, supported in self.unsupported.items():
            if config.get(key, supported) != supported:
                raise ValueError(f"{label}: {key}={config[key]!r} is not supported (only {supported!r})")
        self.config = {**self.defaults, **{k: v for k, v in config.items() if k in self.defaults}}
        if self.config["prediction_type"] not in self.prediction_types:
            raise ValueError(f"{label}: prediction_type must be one of {self.prediction_types}")
        if self.config.get("timestep_spacing", "leading") not in SPACINGS:
            raise ValueError(f"{label}: timestep_spacing must be one of {SPACINGS}")
        sigma_schedule(self.config)  # at most one use_*_sigmas
        self.alphas_cumprod = alphas_cumprod(self.config)
        # ((1 - a) / a) ** 0.5 in float32, ascending with t
        self.train_sigmas = [f32(math.sqrt(f32(f32(1 - a) / a))) for a in self.alphas_cumprod]
        self.log_sigmas = [f32(math.log(s)) for s in self.train_sigmas]
        self.num_inference_steps = None

    @classmethod
    def from_config(cls, config, **overrides):
        """Builds from a scheduler_config.json dict of any scheduler class; keys this class lacks are ignored."""
        use_default = set(config.get("_use_default_values", []))
        known = cls.defaults.keys() | cls.unsupported.keys()
        kept = {k: v for k, v in config.items() if k in known and k not in use_default}
        return cls(**{**kept, **overrides})

    @property
    def label(self):
        return self.name or type(self).__name__

    def set_timesteps(self, num_inference_steps):
        """diffusers `set_timesteps`; ValueError naming the limit for step counts where the sampler is undefined
        (repeated sigmas or timesteps outside the training range, see `max_steps`)."""
        n = num_inference_steps
        bounded = isinstance(n, Integral) and not isinstance(n, bool) and 1 <= n <= self._upper_steps()
        plan = self._plan(n) if bounded else None
        if plan is None:
            raise ValueError(
                f"{self.label}: steps must be between 1 and {self.max_steps()}{self.limit_note()}, got {n!r}"
            )
        self.num_inference_steps = n
        self._apply(plan)

    def max_steps(self):
        """The largest step count with a well-defined schedule: at most num_train_timesteps, less where the spacing
        would repeat a sigma or leave the training range (e.g. leading spacing with steps_offset 1)."""
        return next((n for n in range(self._upper_steps(), 0, -1) if self._plan(n) is not None), 0)

    def limit_note(self):
        return f" with this model's scheduler config (num_train_timesteps {self.config['num_train_timesteps']})"

    def _upper_steps(self):
        return self.config["num_train_timesteps"]

    def _plan(self, n):
        """The schedule for n steps, or None where it is undefined."""
        raise NotImplementedError

    def _apply(self, plan):
        raise NotImplementedError

    def scale_model_input(self, sample, t):
        return sample

    def _index_for_timestep(self, t):
        """diffusers `index_for_timestep`: the second match if t repeats, so that img2img skips no sigma."""
        matches = [i for i, s in enumerate(self._timesteps) if s == t]
        if not matches:
            raise ValueError(f"timestep {t} is not in the schedule")
        return matches[1] if len(matches) > 1 else matches[0]

    def _begin_step(self, t):
        if self._step_index is None:
            self._step_index = self._index_for_timestep(t.item() if isinstance(t, mx.array) else t)
        return self._step_index


class SigmaScheduler(Scheduler):
    """A sampler stepping along `self.sigmas` (Karras et al. 2022's sigma space), with diffusers' step counter
    found from the first timestep."""

    def _set_schedule(self, timesteps, sigmas, dtype=mx.float32):
        self.timesteps = mx.array(timesteps, dtype=dtype)
        self.sigmas = mx.array(sigmas, dtype=mx.float32)
        self._sigmas = [f32(s) for s in sigmas]
        self._timesteps = self.timesteps.tolist()
        self._step_index = None

    def _sigmas_at(self, t):
        return [self._sigmas[self._index_for_timestep(s)] for s in as_list(t)]

    def _interpolated(self, timesteps):
        return [interp(t, self.train_sigmas) for t in timesteps]


class KarrasScheduler(SigmaScheduler):
    """Samplers of the k-diffusion family (Euler, Heun, LMS, DPM2, DPM++ SDE): x = x0 + sigma * eps, the model
    input scaled by 1 / sqrt(sigma^2 + 1)."""

    @property
    def init_noise_sigma(self):
        sigma = max(self._sigmas)
        return sigma if self.config["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(sigma**2 + 1)

    def _spaced_plan(self, n, f32_timesteps=True, round_karras=False):
        """Spaced timesteps and their sigmas interpolated on the training sigmas, or the config's sigma schedule
        (Karras, exponential, beta) with the fractional timesteps of its sigmas; None if a sigma repeats."""
        cfg = self.config
        timesteps = spaced_timesteps(cfg, n)
        timesteps = [f32(t) for t in timesteps] if f32_timesteps else timesteps
        sigmas = self._interpolated(timesteps)
        convert = sigma_schedule(cfg)
        if convert is not None:
            sigmas = convert_sigmas(cfg, convert, sigmas, n)
            timesteps = [sigma_to_t(s, self.log_sigmas) for s in sigmas]
            if round_karras and convert is karras_sigmas:
                timesteps = [float(round(t)) for t in timesteps]
        return (timesteps, sigmas) if descending(sigmas) else None

    def _pred_original(self, model_output, sample, sigma):
        """x0 from the model output at noise level sigma (Karras et al. 2022, Table 1; v: Salimans & Ho 2022)."""
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return sample - sigma * model_output
        if kind == "v_prediction":
            return model_output * (-sigma / math.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
        return model_output

    def add_noise(self, original, noise, t):
        """original + sigma(t) * noise."""
        return original + noise * per_sample(self._sigmas_at(t), t, original)

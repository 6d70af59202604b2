"""Samplers equal to diffusers' Euler, Euler ancestral, DDIM and DPM-Solver++(2M) schedulers.

Schedules are computed with Python floats, rounded to float32 wherever diffusers computes in torch float32, so
`timesteps` equal diffusers' and `sigmas` agree to about one float32 ulp (torch's float32 sqrt on x86 is not
correctly rounded). Samples may have any layout (NHWC here): every update is elementwise. Needs mlx.core only.
"""

import bisect
import math
import struct

import mlx.core as mx


def _f32(x):
    """Rounds a Python float to float32 (one torch float32 operation on scalars)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _torch_linspace_f32(start, end, n):
    """torch.linspace(start, end, n, dtype=torch.float32): each half is counted from its own end."""
    start, end = _f32(start), _f32(end)
    if n == 1:
        return [start]
    step = _f32(_f32(end - start) / (n - 1))
    return [_f32(start + step * i) if i < n // 2 else _f32(end - step * (n - 1 - i)) for i in range(n)]


def _np_linspace(start, stop, n):
    """np.linspace(start, stop, n) in float64."""
    if n == 1:
        return [float(start)]
    step = (stop - start) / (n - 1)
    return [start + i * step for i in range(n - 1)] + [float(stop)]


def _np_arange(start, stop, step):
    """np.arange(start, stop, step) with a float step: element i >= 2 is start + i * (x[1] - x[0])."""
    n = max(math.ceil((stop - start) / step), 0)
    second = start + step
    delta = second - start
    return [float(start), second][:n] + [start + i * delta for i in range(2, n)]


def _interp(t, fp):
    """np.interp(t, arange(len(fp)), fp)."""
    if t <= 0:
        return fp[0]
    if t >= len(fp) - 1:
        return fp[-1]
    j = math.floor(t)
    return fp[j] if j == t else (fp[j + 1] - fp[j]) * (t - j) + fp[j]


def _alphas_cumprod(cfg):
    """diffusers' betas -> alphas_cumprod in float32 (torch.cumprod on CPU accumulates in double)."""
    n, schedule = cfg["num_train_timesteps"], cfg["beta_schedule"]
    if cfg["trained_betas"] is not None:
        betas = [_f32(b) for b in cfg["trained_betas"]]
    elif schedule == "linear":
        betas = _torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    elif schedule == "scaled_linear":
        betas = [_f32(b * b) for b in _torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n)]
    elif schedule == "squaredcos_cap_v2":  # `betas_for_alpha_bar`, Nichol & Dhariwal 2021 eq. 17
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = [_f32(min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999)) for i in range(n)]
    else:
        raise ValueError(f"unknown beta_schedule {schedule!r}")
    cumprod, acc = [], 1.0
    for beta in betas:
        acc *= _f32(1.0 - beta)
        cumprod.append(_f32(acc))
    return cumprod


def _karras_sigmas(sigma_min, sigma_max, n, rho=7.0):
    """Karras et al. 2022 eq. 5 (diffusers `_convert_to_karras`), descending, float64."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in _np_linspace(0, 1, n)]


def _sigma_to_t(sigma, log_sigmas):
    """diffusers `_sigma_to_t`: the fractional training timestep of sigma, interpolated in log space."""
    log_sigma = math.log(max(sigma, 1e-10))
    low = min(max(bisect.bisect_right(log_sigmas, log_sigma) - 1, 0), len(log_sigmas) - 2)
    w = (log_sigmas[low] - log_sigma) / _f32(log_sigmas[low] - log_sigmas[low + 1])
    w = min(max(w, 0.0), 1.0)
    return (1 - w) * low + w * (low + 1)


def _spaced_timesteps(cfg, n):
    """Euler/DDIM `timestep_spacing` (Lin et al. 2023, Table 2), descending float64 timesteps."""
    num_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        return _np_linspace(0, num_train - 1, n)[::-1]
    if spacing == "leading":
        return [float(i * (num_train // n) + cfg["steps_offset"]) for i in reversed(range(n))]
    if spacing == "trailing":
        return [round(t) - 1.0 for t in _np_arange(num_train, 0, -num_train / n)]
    raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")


def _final_sigma(cfg, train_sigmas):
    """The sigma after the last step: `final_sigmas_type` "zero" or "sigma_min"."""
    kind = cfg.get("final_sigmas_type", "zero")
    if kind not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {kind!r}")
    return train_sigmas[0] if kind == "sigma_min" else 0.0


def _as_list(t):
    """A scalar timestep or (B,) timesteps -> a list of Python numbers."""
    t = t.tolist() if isinstance(t, mx.array) else t
    return list(t) if isinstance(t, (list, tuple)) else [t]


def _per_sample(values, t, like):
    """Coefficients for the timesteps t: a scalar for a scalar t, else (B, 1, 1, 1) to broadcast against `like`."""
    a = mx.array(values, dtype=mx.float32).astype(like.dtype)
    batched = isinstance(t, (list, tuple)) or getattr(t, "ndim", 0) > 0
    return a.reshape((-1,) + (1,) * (like.ndim - 1)) if batched else a[0]


class _Scheduler:
    """Config handling shared by all samplers: diffusers' defaults and `from_config`."""

    defaults: dict = {}
    unsupported: dict = {}  # options implemented only at this (diffusers default) value
    prediction_types = ("epsilon", "v_prediction", "sample")
    order = 1
    init_noise_sigma = 1.0

    def __init__(self, **config):
        name = type(self).__name__
        unknown = config.keys() - self.defaults.keys() - self.unsupported.keys()
        if unknown:
            raise TypeError(f"{name}: unknown options {sorted(unknown)}")
        for key, supported in self.unsupported.items():
            if config.get(key, supported) != supported:
                raise ValueError(f"{name}: {key}={config[key]!r} is not supported (only {supported!r})")
        self.config = {**self.defaults, **{k: v for k, v in config.items() if k in self.defaults}}
        if self.config["prediction_type"] not in self.prediction_types:
            raise ValueError(f"{name}: prediction_type must be one of {self.prediction_types}")
        self.alphas_cumprod = _alphas_cumprod(self.config)
        # ((1 - a) / a) ** 0.5 in float32, ascending with t
        self.train_sigmas = [_f32(math.sqrt(_f32(_f32(1 - a) / a))) for a in self.alphas_cumprod]
        self.num_inference_steps = None

    @classmethod
    def from_config(cls, config, **overrides):
        """Builds from a scheduler_config.json dict of any scheduler class; keys this class lacks are ignored."""
        use_default = set(config.get("_use_default_values", []))
        known = cls.defaults.keys() | cls.unsupported.keys()
        kept = {k: v for k, v in config.items() if k in known and k not in use_default}
        return cls(**{**kept, **overrides})

    def scale_model_input(self, sample, t):
        return sample


class _SigmaScheduler(_Scheduler):
    """A sampler stepping along `self.sigmas`, with diffusers' step counter found from the first timestep."""

    def _set_schedule(self, timesteps, sigmas, dtype):
        self.timesteps = mx.array(timesteps, dtype=dtype)
        self.sigmas = mx.array(sigmas, dtype=mx.float32)
        self._sigmas = [_f32(s) for s in sigmas]
        self._step_index = None

    def _index_for_timestep(self, t):
        """diffusers `index_for_timestep`: the second match if t repeats, so that img2img skips no sigma."""
        matches = [i for i, s in enumerate(self.timesteps.tolist()) if s == t]
        if not matches:
            raise ValueError(f"timestep {t} is not in the schedule")
        return matches[1] if len(matches) > 1 else matches[0]

    def _begin_step(self, t):
        if self._step_index is None:
            self._step_index = self._index_for_timestep(t.item() if isinstance(t, mx.array) else t)
        return self._step_index

    def _sigmas_at(self, t):
        return [self._sigmas[self._index_for_timestep(s)] for s in _as_list(t)]


class EulerDiscreteScheduler(_SigmaScheduler):
    """Euler method of Karras et al. 2022 (Algorithm 2 without churn), diffusers `EulerDiscreteScheduler`."""

    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        prediction_type="epsilon",
        use_karras_sigmas=False,
        sigma_min=None,
        sigma_max=None,
        timestep_spacing="linspace",
        steps_offset=0,
        final_sigmas_type="zero",
    )
    unsupported = dict(
        interpolation_type="linear",
        timestep_type="discrete",
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        rescale_betas_zero_snr=False,
    )

    def __init__(self, **config):
        super().__init__(**config)
        n = self.config["num_train_timesteps"]
        self._set_schedule(list(range(n - 1, -1, -1)), self.train_sigmas[::-1] + [0.0], mx.float32)

    @property
    def init_noise_sigma(self):
        sigma = max(self._sigmas)
        return sigma if self.config["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(sigma**2 + 1)

    def set_timesteps(self, num_inference_steps):
        """diffusers `set_timesteps`: spaced float timesteps, sigmas interpolated on the training sigmas."""
        cfg, n = self.config, num_inference_steps
        self.num_inference_steps = n
        timesteps = [_f32(t) for t in _spaced_timesteps(cfg, n)]
        sigmas = [_interp(t, self.train_sigmas) for t in timesteps]
        if cfg.get("use_karras_sigmas"):
            sigma_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else sigmas[-1]
            sigma_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else sigmas[0]
            sigmas = _karras_sigmas(sigma_min, sigma_max, n)
            log_sigmas = [_f32(math.log(s)) for s in self.train_sigmas]
            timesteps = [_sigma_to_t(s, log_sigmas) for s in sigmas]
        self._set_schedule(timesteps, sigmas + [_final_sigma(cfg, self.train_sigmas)], mx.float32)

    def scale_model_input(self, sample, t):
        """sample / sqrt(sigma^2 + 1): the model sees unit-variance inputs (Karras et al. 2022, Table 1)."""
        sigma = self._sigmas[self._begin_step(t)]
        return sample / math.sqrt(sigma**2 + 1)

    def _pred_original(self, model_output, sample, sigma):
        if self.config["prediction_type"] == "epsilon":
            return sample - sigma * model_output
        if self.config["prediction_type"] == "v_prediction":  # Salimans & Ho 2022, in sigma form
            return model_output * (-sigma / math.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
        return model_output

    def step(self, model_output, t, sample, noise=None):
        """x_next = x + (x - x0) / sigma * (sigma_next - sigma); `noise` is unused."""
        i = self._begin_step(t)
        sigma, sigma_next = self._sigmas[i], self._sigmas[i + 1]
        sample = sample.astype(mx.float32)
        derivative = (sample - self._pred_original(model_output, sample, sigma)) / sigma
        self._step_index += 1
        return (sample + derivative * _f32(sigma_next - sigma)).astype(model_output.dtype)

    def add_noise(self, original, noise, t):
        """original + sigma(t) * noise."""
        return original + noise * _per_sample(self._sigmas_at(t), t, original)


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Euler ancestral sampling (k-diffusion `sample_euler_ancestral`), diffusers `EulerAncestralDiscreteScheduler`."""

    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        prediction_type="epsilon",
        timestep_spacing="linspace",
        steps_offset=0,
    )
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
        prev_sample = sample + derivative * _f32(sigma_down - sigma)
        if noise is None:
            noise = mx.random.normal(model_output.shape, dtype=model_output.dtype)
        self._step_index += 1
        return (prev_sample + noise * sigma_up).astype(model_output.dtype)


class DDIMScheduler(_Scheduler):
    """Deterministic DDIM (eta = 0), Song et al. 2020 eq. 12, diffusers `DDIMScheduler`."""

    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    unsupported = dict(thresholding=False, rescale_betas_zero_snr=False)

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.timesteps = mx.arange(self.config["num_train_timesteps"] - 1, -1, -1, dtype=mx.int64)

    def set_timesteps(self, num_inference_steps):
        num_train = self.config["num_train_timesteps"]
        if num_inference_steps > num_train:
            raise ValueError(f"num_inference_steps ({num_inference_steps}) exceeds num_train_timesteps ({num_train})")
        self.num_inference_steps = num_inference_steps
        timesteps = _spaced_timesteps(self.config, num_inference_steps)
        self.timesteps = mx.array([round(t) for t in timesteps], dtype=mx.int64)

    def step(self, model_output, t, sample, noise=None):
        """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps; `noise` is unused (eta = 0)."""
        t = int(t.item() if isinstance(t, mx.array) else t)
        prev_t = t - self.config["num_train_timesteps"] // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        sqrt_a, sqrt_b = _f32(math.sqrt(a_t)), _f32(math.sqrt(_f32(1 - a_t)))
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0, eps = (sample - sqrt_b * model_output) / sqrt_a, model_output
        elif kind == "v_prediction":
            x0, eps = sqrt_a * sample - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * sample
        else:
            x0, eps = model_output, (sample - sqrt_a * model_output) / sqrt_b
        if self.config["clip_sample"]:
            x0 = mx.clip(x0, -self.config["clip_sample_range"], self.config["clip_sample_range"])
        return _f32(math.sqrt(a_prev)) * x0 + _f32(math.sqrt(_f32(1 - a_prev))) * eps

    def add_noise(self, original, noise, t):
        """sqrt(a_t) original + sqrt(1 - a_t) noise."""
        a = [self.alphas_cumprod[int(s)] for s in _as_list(t)]
        sqrt_a, sqrt_b = [math.sqrt(x) for x in a], [math.sqrt(_f32(1 - x)) for x in a]
        return _per_sample(sqrt_a, t, original) * original + _per_sample(sqrt_b, t, original) * noise


def _alpha_sigma_lambda(sigma):
    """diffusers `_sigma_to_alpha_sigma_t` and lambda = log(alpha_t / sigma_t), the half log-SNR."""
    alpha = 1.0 / math.sqrt(sigma**2 + 1)
    sigma_t = sigma * alpha
    return alpha, sigma_t, (math.log(alpha) - math.log(sigma_t) if sigma_t > 0 else math.inf)


class DPMSolverMultistepScheduler(_SigmaScheduler):
    """DPM-Solver++(2M) with the midpoint update (Lu et al. 2022, Algorithm 2), diffusers
    `DPMSolverMultistepScheduler` with algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint"."""

    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        prediction_type="epsilon",
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=False,
        sigma_min=None,
        sigma_max=None,
        final_sigmas_type="zero",
        lambda_min_clipped=-math.inf,
        timestep_spacing="linspace",
        steps_offset=0,
    )
    unsupported = dict(
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        thresholding=False,
        variance_type=None,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_lu_lambdas=False,
        use_flow_sigmas=False,
        rescale_betas_zero_snr=False,
    )

    def __init__(self, **config):
        # diffusers maps DEIS' and UniPC's names onto DPM-Solver++ midpoint
        if config.get("algorithm_type") == "deis":
            config["algorithm_type"] = "dpmsolver++"
        if config.get("solver_type") in ("logrho", "bh1", "bh2"):
            config["solver_type"] = "midpoint"
        super().__init__(**config)
        self.timesteps = mx.arange(self.config["num_train_timesteps"] - 1, -1, -1, dtype=mx.float32)

    def set_timesteps(self, num_inference_steps):
        """diffusers `set_timesteps`: integer timesteps; sigmas interpolated or Karras'."""
        cfg, n = self.config, num_inference_steps
        num_train = cfg["num_train_timesteps"]
        # timesteps whose lambda is below lambda_min_clipped are cut off (torch.searchsorted on the flipped lambdas)
        lambdas = [0.5 * math.log(a / (1 - a)) for a in self.alphas_cumprod]
        last = num_train - sum(lam < cfg["lambda_min_clipped"] for lam in lambdas)
        spacing = cfg["timestep_spacing"]
        if spacing == "linspace":
            timesteps = [round(t) for t in _np_linspace(0, last - 1, n + 1)][::-1][:-1]
        elif spacing == "leading":
            timesteps = [i * (last // (n + 1)) + cfg["steps_offset"] for i in range(n, 0, -1)]
        elif spacing == "trailing":
            timesteps = [round(t) - 1 for t in _np_arange(last, 0, -num_train / n)]
        else:
            raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")
        if cfg["use_karras_sigmas"]:
            sigma_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else self.train_sigmas[0]
            sigma_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else self.train_sigmas[-1]
            sigmas = _karras_sigmas(sigma_min, sigma_max, n)
            log_sigmas = [_f32(math.log(s)) for s in self.train_sigmas]
            timesteps = [_sigma_to_t(s, log_sigmas) for s in sigmas]
            # rounded except for the cosine schedule, where torch's int64 cast truncates
            timesteps = [int(t) if cfg["beta_schedule"] == "squaredcos_cap_v2" else round(t) for t in timesteps]
        else:
            sigmas = [_interp(t, self.train_sigmas) for t in timesteps]
        self._set_schedule(timesteps, sigmas + [_final_sigma(cfg, self.train_sigmas)], mx.int64)
        self.num_inference_steps = len(timesteps)
        self._lower_order_nums = 0
        self._previous_x0 = None

    def _pred_original(self, model_output, sample, sigma):
        """diffusers `convert_model_output` for dpmsolver++: the data prediction x0."""
        alpha_t, sigma_t, _ = _alpha_sigma_lambda(sigma)
        if self.config["prediction_type"] == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        if self.config["prediction_type"] == "v_prediction":
            return alpha_t * sample - sigma_t * model_output
        return model_output

    def step(self, model_output, t, sample, noise=None):
        """First-order (DDIM) update at the first and final steps, else the 2M midpoint update; `noise` is unused."""
        i = self._begin_step(t)
        cfg, n = self.config, len(self._sigmas) - 1
        lower_order_final = i == n - 1 and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero"
        )
        x0 = self._pred_original(model_output, sample, self._sigmas[i])
        sample = sample.astype(mx.float32)
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(self._sigmas[i + 1])
        _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(self._sigmas[i])
        h = lambda_t - lambda_s0
        # dpm_solver_first_order_update: x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) x0
        prev_sample = (sigma_t / sigma_s0) * sample - (alpha_t * (math.exp(-h) - 1.0)) * x0
        if self._lower_order_nums >= 1 and not lower_order_final:
            # multistep_dpm_solver_second_order_update (midpoint): D1 = (x0 - x0_prev) / r0
            _, _, lambda_s1 = _alpha_sigma_lambda(self._sigmas[i - 1])
            d1 = (1.0 / ((lambda_s0 - lambda_s1) / h)) * (x0 - self._previous_x0)
            prev_sample = prev_sample - 0.5 * (alpha_t * (math.exp(-h) - 1.0)) * d1
        self._previous_x0 = x0
        self._lower_order_nums = min(self._lower_order_nums + 1, 2)
        self._step_index += 1
        return prev_sample.astype(model_output.dtype)

    def add_noise(self, original, noise, t):
        """alpha_t original + sigma_t noise, with alpha_t = 1 / sqrt(sigma^2 + 1) and sigma_t = sigma alpha_t."""
        alphas, sigmas, _ = zip(*(_alpha_sigma_lambda(s) for s in self._sigmas_at(t)))
        return _per_sample(alphas, t, original) * original + _per_sample(sigmas, t, original) * noise


_DPMPP_2M = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint")

# sampler name -> (class, options that define the sampler)
SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {**_DPMPP_2M, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {**_DPMPP_2M, "use_karras_sigmas": True}),
}


# A1111's display names (written to PNG metadata, accepted as aliases) and a line on each sampler.
DISPLAY_NAMES = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "ddim": "DDIM",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
}
DESCRIPTIONS = {
    "euler": "Euler (Karras et al. 2022, Algorithm 2 without churn); deterministic, good at 20-30 steps",
    "euler_a": "Euler ancestral: adds fresh noise every step; varied results, the SDXL-Turbo default",
    "ddim": "DDIM (Song et al. 2020), eta 0; deterministic, the SD 2.x default",
    "dpmpp_2m": "DPM-Solver++ 2M (Lu et al. 2022), second-order multistep; sharp at 15-25 steps",
    "dpmpp_2m_karras": "DPM-Solver++ 2M with Karras sigmas; A1111's favourite at 20 steps",
}


def resolve_sampler(name):
    """Our sampler name for `name` or an A1111 display name ("Euler a", "DPM++ 2M Karras"), any case."""
    key = str(name).strip().lower()
    for ours, display in DISPLAY_NAMES.items():
        if key in (ours, display.lower()):
            return ours
    choices = ", ".join(f"{ours} ({display})" for ours, display in DISPLAY_NAMES.items())
    raise ValueError(f"unknown sampler {name!r}; choose one of: {choices}")


def make_scheduler(name, config, **overrides):
    """The sampler `name` (or its A1111 display name) built from a scheduler_config.json dict and overrides."""
    cls, options = SAMPLERS[resolve_sampler(name)]
    return cls.from_config(config, **{**options, **overrides})


def default_sampler(config):
    """The sampler a scheduler_config.json asks for; "euler" for classes not implemented here (PNDM, LMS, ...)."""
    name = config.get("_class_name")
    if name == "DPMSolverMultistepScheduler":
        return "dpmpp_2m_karras" if config.get("use_karras_sigmas") else "dpmpp_2m"
    known = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a", "DDIMScheduler": "ddim"}
    return known.get(name, "euler")


def max_steps(sampler, config):
    """The most steps `sampler` supports with a scheduler config: its number of training timesteps."""
    resolve_sampler(sampler)
    return int(config.get("num_train_timesteps", 1000))

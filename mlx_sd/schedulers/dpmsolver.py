"""DPM-Solver++ (Lu et al. 2022): multistep 2M / 3M and their SDE variants, and singlestep 2S (diffusers
`DPMSolverMultistepScheduler`, `DPMSolverSinglestepScheduler`), plus what the exponential integrators share
with UniPC and DEIS: integer timesteps, x_t = alpha_t x0 + sigma_t eps, and lambda = log(alpha_t / sigma_t)."""

import math

import mlx.core as mx

from .base import SigmaScheduler, descending, draw_noise, per_sample
from .euler import SIGMA_OPTIONS
from .schedules import convert_sigmas, karras_sigmas, sigma_schedule, sigma_to_t, spaced_timesteps_multistep

_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)


def alpha_sigma_lambda(sigma):
    """diffusers `_sigma_to_alpha_sigma_t` and lambda = log(alpha_t / sigma_t), the half log-SNR."""
    alpha = 1.0 / math.sqrt(sigma**2 + 1)
    sigma_t = sigma * alpha
    return alpha, sigma_t, (math.log(alpha) - math.log(sigma_t) if sigma_t > 0 else math.inf)


class ExponentialIntegrator(SigmaScheduler):
    """Multistep samplers on integer timesteps (DPM-Solver, UniPC, DEIS): the schedule and add_noise."""

    round_cosine_karras = True  # DPM-Solver multistep leaves Karras timesteps unrounded for the cosine schedule

    def __init__(self, **config):
        super().__init__(**config)
        self._set_schedule(list(range(self.config["num_train_timesteps"] - 1, -1, -1)), [0.0], mx.int64)

    def _last_timestep(self):
        return self.config["num_train_timesteps"]

    def _spacing(self):
        """The config keys of the timestep spacing."""
        return self.config

    def _final_sigma(self, sigmas, converted):
        """The sigma after the last step: `final_sigmas_type` "zero" or "sigma_min" (the smallest training sigma)."""
        return self.train_sigmas[0] if self.config.get("final_sigmas_type") == "sigma_min" else 0.0

    def _converted_timestep(self, t, convert):
        """Karras timesteps are rounded, the others truncated (diffusers' int64 cast)."""
        if convert is karras_sigmas and (
            self.round_cosine_karras or self.config["beta_schedule"] != "squaredcos_cap_v2"
        ):
            return round(t)
        return int(t)

    def _plan(self, n):
        """Spaced integer timesteps with interpolated sigmas, or the config's sigma schedule over the whole training
        range; None if a sigma repeats."""
        cfg = self.config
        timesteps = spaced_timesteps_multistep(self._spacing(), n, self._last_timestep())
        convert = sigma_schedule(cfg)
        if convert is None:
            sigmas = self._interpolated(timesteps)
        else:
            sigmas = convert_sigmas(cfg, convert, self.train_sigmas[::-1], n)
            timesteps = [self._converted_timestep(sigma_to_t(s, self.log_sigmas), convert) for s in sigmas]
        sigmas = sigmas + [self._final_sigma(sigmas, convert is not None)]
        return (timesteps, sigmas) if descending(sigmas[:-1]) and sigmas[-1] <= sigmas[-2] else None

    def _apply(self, plan):
        self._set_schedule(*plan, mx.int64)
        self._outputs = [None] * self.config["solver_order"]
        self._lower_order_nums = 0

    def _push_output(self, x):
        self._outputs = self._outputs[1:] + [x]

    def _data_prediction(self, model_output, sample, sigma):
        """diffusers `convert_model_output` (DPM-Solver++): the data prediction x0."""
        alpha_t, sigma_t, _ = alpha_sigma_lambda(sigma)
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        if kind == "v_prediction":
            return alpha_t * sample - sigma_t * model_output
        return model_output

    def add_noise(self, original, noise, t):
        """alpha_t original + sigma_t noise, with alpha_t = 1 / sqrt(sigma^2 + 1) and sigma_t = sigma alpha_t."""
        alphas, sigmas, _ = zip(*(alpha_sigma_lambda(s) for s in self._sigmas_at(t)))
        return per_sample(alphas, t, original) * original + per_sample(sigmas, t, original) * noise


class DPMSolverMultistepScheduler(ExponentialIntegrator):
    """DPM-Solver++ multistep (Lu et al. 2022, Algorithm 2) of order 1-3, deterministic or SDE
    (algorithm_type "sde-dpmsolver++", Lu et al. 2022 eq. 8-9), diffusers `DPMSolverMultistepScheduler`."""

    defaults = dict(
        **_BETAS,
        **SIGMA_OPTIONS,
        solver_order=2,
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        lower_order_final=True,
        euler_at_final=False,
        final_sigmas_type="zero",
        lambda_min_clipped=-math.inf,
        timestep_spacing="linspace",
        steps_offset=0,
    )
    unsupported = dict(
        solver_type="midpoint",
        thresholding=False,
        variance_type=None,
        use_lu_lambdas=False,
        use_flow_sigmas=False,
        rescale_betas_zero_snr=False,
        use_dynamic_shifting=False,
    )
    round_cosine_karras = False

    def __init__(self, **config):
        # diffusers maps DEIS' and UniPC's names onto DPM-Solver++ midpoint
        if config.get("algorithm_type") == "deis":
            config["algorithm_type"] = "dpmsolver++"
        if config.get("solver_type") in ("logrho", "bh1", "bh2"):
            config["solver_type"] = "midpoint"
        super().__init__(**config)
        if self.config["algorithm_type"] not in ("dpmsolver++", "sde-dpmsolver++"):
            raise ValueError(f"{self.label}: algorithm_type must be 'dpmsolver++' or 'sde-dpmsolver++'")
        if self.config["solver_order"] not in (1, 2, 3):
            raise ValueError(f"{self.label}: solver_order must be 1, 2 or 3")

    def _last_timestep(self):
        """num_train_timesteps less the timesteps whose lambda is below lambda_min_clipped."""
        lambdas = [0.5 * math.log(a / (1 - a)) for a in self.alphas_cumprod]
        return self.config["num_train_timesteps"] - sum(lam < self.config["lambda_min_clipped"] for lam in lambdas)

    def step(self, model_output, t, sample, noise=None):
        """The first-order update at the first and final steps, else the multistep update of the solver's order;
        the SDE variant adds `noise` (default mx.random.normal). Lu et al. 2022 (DPM-Solver++), Algorithm 2."""
        i = self._begin_step(t)
        cfg, n = self.config, len(self._sigmas) - 1
        final = i == n - 1 and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero"
        )
        second_last = i == n - 2 and cfg["lower_order_final"] and n < 15
        self._push_output(self._data_prediction(model_output, sample, self._sigmas[i]))
        sample = sample.astype(mx.float32)
        noise = draw_noise(noise, sample) if cfg["algorithm_type"] == "sde-dpmsolver++" else None
        if cfg["solver_order"] == 1 or self._lower_order_nums < 1 or final:
            order = 1
        elif cfg["solver_order"] == 2 or self._lower_order_nums < 2 or second_last:
            order = 2
        else:
            order = 3
        prev_sample = self._update(i, order, sample, noise)
        self._lower_order_nums = min(self._lower_order_nums + 1, cfg["solver_order"])
        self._step_index += 1
        return prev_sample.astype(model_output.dtype)

    def _update(self, i, order, sample, noise):
        """diffusers `dpm_solver_first_order_update` and the multistep second / third order updates."""
        s, m = self._sigmas, self._outputs
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(s[i + 1])
        _, sigma_s0, lambda_s0 = alpha_sigma_lambda(s[i])
        h = lambda_t - lambda_s0
        if h == 0:  # a final sigma equal to the last one (diffusers divides by zero there)
            return sample
        d = [m[-1]]
        if order >= 2:
            r0 = (lambda_s0 - alpha_sigma_lambda(s[i - 1])[2]) / h
            d1_0 = (1.0 / r0) * (m[-1] - m[-2])
            d.append(d1_0)
        if order == 3:
            r1 = (alpha_sigma_lambda(s[i - 1])[2] - alpha_sigma_lambda(s[i - 2])[2]) / h
            d1_1 = (1.0 / r1) * (m[-2] - m[-3])
            d = [m[-1], d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1), (1.0 / (r0 + r1)) * (d1_0 - d1_1)]
        if noise is None:
            coefficients = self._ode_coefficients(order, h, alpha_t)
            x = (sigma_t / sigma_s0) * sample
        else:
            coefficients = self._sde_coefficients(order, h, alpha_t)
            x = (sigma_t / sigma_s0 * math.exp(-h)) * sample + (sigma_t * math.sqrt(-math.expm1(-2.0 * h))) * noise
        return x + sum(c * di for c, di in zip(coefficients, d))

    @staticmethod
    def _ode_coefficients(order, h, alpha_t):
        """The coefficients of D0, D1, D2 in DPM-Solver++ (midpoint for order 2)."""
        e = math.exp(-h) - 1.0
        if order == 2:
            return [-alpha_t * e, -0.5 * alpha_t * e]
        return [-alpha_t * e, alpha_t * (e / h + 1.0), -alpha_t * ((e + h) / h**2 - 0.5)][:order]

    @staticmethod
    def _sde_coefficients(order, h, alpha_t):
        """The coefficients of D0, D1, D2 in SDE-DPM-Solver++ (midpoint for order 2)."""
        e = 1.0 - math.exp(-2.0 * h)
        if order == 2:
            return [alpha_t * e, 0.5 * alpha_t * e]
        return [alpha_t * e, alpha_t * (e / (-2.0 * h) + 1.0), alpha_t * ((e - 2.0 * h) / (2.0 * h) ** 2 - 0.5)][:order]


class DPMSolverSinglestepScheduler(DPMSolverMultistepScheduler):
    """DPM-Solver++(2S) singlestep (Lu et al. 2022, Algorithm 1), diffusers `DPMSolverSinglestepScheduler`: steps
    alternate between a first-order step to the next timestep and a second-order step from the timestep before,
    using both model outputs (orders 1, 2, 1, 2, ...). Linspace timesteps only (no `timestep_spacing`)."""

    defaults = dict(
        **_BETAS,
        **SIGMA_OPTIONS,
        solver_order=2,
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        lower_order_final=False,
        final_sigmas_type="zero",
        lambda_min_clipped=-math.inf,
    )
    unsupported = dict(
        solver_type="midpoint",
        thresholding=False,
        variance_type=None,
        use_flow_sigmas=False,
        use_dynamic_shifting=False,
    )
    round_cosine_karras = True

    def __init__(self, **config):
        super().__init__(**config)
        if self.config["solver_order"] not in (1, 2):
            raise ValueError(f"{self.label}: solver_order must be 1 or 2")

    def _spacing(self):
        return {**self.config, "timestep_spacing": "linspace", "steps_offset": 0}

    def _apply(self, plan):
        super()._apply(plan)
        n, order, cfg = len(plan[0]), self.config["solver_order"], self.config
        if not cfg["lower_order_final"] and (n % order or cfg["final_sigmas_type"] == "zero"):
            cfg["lower_order_final"] = True  # as diffusers' set_timesteps, for good
        if cfg["lower_order_final"] and order == 2:
            orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
        else:
            orders = [1, 2] * (n // 2) if order == 2 else [1] * n
        if cfg["final_sigmas_type"] == "zero":
            orders[-1] = 1
        self._orders, self._start = orders, None

    def step(self, model_output, t, sample, noise=None):
        """Order 1 keeps the sample it starts from; order 2 goes from there to the next timestep with both model
        outputs. The SDE variant adds `noise` (default mx.random.normal)."""
        i = self._begin_step(t)
        self._push_output(self._data_prediction(model_output, sample, self._sigmas[i]))
        noise = draw_noise(noise, sample) if self.config["algorithm_type"] == "sde-dpmsolver++" else None
        order = self._orders[i]
        while self._outputs[-order] is None:
            order -= 1
        if order == 1:
            self._start = sample.astype(mx.float32)
        prev_sample = self._update(i, order, self._start, noise)
        self._step_index += 1
        return prev_sample.astype(model_output.dtype)

    def _update(self, i, order, sample, noise):
        """diffusers' first-order update, or `singlestep_dpm_solver_second_order_update` (midpoint) from s_{i-1}."""
        if order == 1:
            return super()._update(i, 1, sample, noise)
        s, m = self._sigmas, self._outputs
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(s[i + 1])
        _, _, lambda_s0 = alpha_sigma_lambda(s[i])
        _, sigma_s1, lambda_s1 = alpha_sigma_lambda(s[i - 1])
        h = lambda_t - lambda_s1
        d = [m[-2], (1.0 / ((lambda_s0 - lambda_s1) / h)) * (m[-1] - m[-2])]
        if noise is None:
            x = (sigma_t / sigma_s1) * sample
            coefficients = self._ode_coefficients(2, h, alpha_t)
        else:
            x = (sigma_t / sigma_s1 * math.exp(-h)) * sample + (sigma_t * math.sqrt(-math.expm1(-2.0 * h))) * noise
            coefficients = self._sde_coefficients(2, h, alpha_t)
        return x + sum(c * di for c, di in zip(coefficients, d))

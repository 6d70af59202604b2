"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) and corrector (UniC), diffusers `UniPCMultistepScheduler`;
and DEIS (Zhang & Chen 2022) with the log-rho multistep update, diffusers `DEISMultistepScheduler`."""

import math

import mlx.core as mx
import numpy as np

from .dpmsolver import ExponentialIntegrator, alpha_sigma_lambda
from .euler import SIGMA_OPTIONS

_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)


def _unipc_system(rks, hh, order, bh1):
    """The matrix R (rows rks^(k-1)), right-hand side b and B(h) of UniPC's order conditions (Zhao et al. 2023,
    Algorithm 2 with B(h) = h for bh1 or e^h - 1 for bh2), as diffusers builds them."""
    h_phi_1 = math.expm1(hh)
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    b_h = hh if bh1 else math.expm1(hh)
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return np.array(rows), np.array(b), h_phi_1, b_h


class UniPCMultistepScheduler(ExponentialIntegrator):
    """UniPC: after each model call, UniC corrects the previous prediction with the new model output, then UniP
    predicts the next sample; bh1 / bh2 variants, data (predict_x0) or noise prediction."""

    defaults = dict(
        **_BETAS,
        **SIGMA_OPTIONS,
        solver_order=2,
        prediction_type="epsilon",
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
        disable_corrector=[],
        timestep_spacing="linspace",
        steps_offset=0,
        final_sigmas_type="zero",
    )
    unsupported = dict(
        thresholding=False,
        solver_p=None,
        use_flow_sigmas=False,
        rescale_betas_zero_snr=False,
        use_dynamic_shifting=False,
        shift_terminal=None,
    )

    def __init__(self, **config):
        if config.get("solver_type") in ("midpoint", "heun", "logrho"):  # as diffusers
            config["solver_type"] = "bh2"
        super().__init__(**config)
        if self.config["solver_type"] not in ("bh1", "bh2"):
            raise ValueError(f"{self.label}: solver_type must be 'bh1' or 'bh2'")
        if not 1 <= self.config["solver_order"] <= 3:
            raise ValueError(f"{self.label}: solver_order must be 1, 2 or 3")

    def _final_sigma(self, sigmas, converted):
        """With a sigma schedule, "sigma_min" ends at the schedule's last sigma, else at the smallest training one."""
        if self.config["final_sigmas_type"] == "sigma_min" and converted:
            return sigmas[-1]
        return super()._final_sigma(sigmas, converted)

    def _apply(self, plan):
        super()._apply(plan)
        self._last_sample, self._this_order = None, 1

    def _convert(self, model_output, sample, sigma):
        """x0 (predict_x0) or eps from the model output."""
        if self.config["predict_x0"]:
            return self._data_prediction(model_output, sample, sigma)
        alpha_t, sigma_t, _ = alpha_sigma_lambda(sigma)
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return model_output
        if kind == "v_prediction":
            return alpha_t * model_output + sigma_t * sample
        return (sample - alpha_t * model_output) / sigma_t

    def step(self, model_output, t, sample, noise=None):
        """UniC on the previous step (unless disabled there), then UniP; `noise` is unused."""
        i = self._begin_step(t)
        cfg = self.config
        converted = self._convert(model_output, sample, self._sigmas[i])
        sample = sample.astype(mx.float32)
        if i > 0 and i - 1 not in cfg["disable_corrector"] and self._last_sample is not None:
            sample = self._correct(i, converted, sample)
        self._push_output(converted)
        order = min(cfg["solver_order"], len(self._sigmas) - 1 - i) if cfg["lower_order_final"] else cfg["solver_order"]
        self._this_order = min(order, self._lower_order_nums + 1)
        if self._sigmas[i + 1] == 0:  # higher orders divide by h = infinity there (NaN or a singular system)
            self._this_order = 1
        self._last_sample = sample
        prev_sample = self._predict(i, sample, self._this_order)
        self._lower_order_nums = min(self._lower_order_nums + 1, cfg["solver_order"])
        self._step_index += 1
        return prev_sample.astype(model_output.dtype)

    def _terms(self, t_index, s0_index, others):
        """alpha_t, sigma_t, sigma_s0, h and the rks of the earlier sigma indices `others`."""
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(self._sigmas[t_index])
        alpha_s0, sigma_s0, lambda_s0 = alpha_sigma_lambda(self._sigmas[s0_index])
        h = lambda_t - lambda_s0
        rks = [(alpha_sigma_lambda(self._sigmas[j])[2] - lambda_s0) / h for j in others]
        return alpha_t, sigma_t, alpha_s0, sigma_s0, h, rks

    def _first_order(self, x, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1):
        if self.config["predict_x0"]:
            return sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0, alpha_t
        return alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0, sigma_t

    def _predict(self, i, x, order):
        """diffusers `multistep_uni_p_bh_update`: UniP from sigma_i to sigma_{i+1}."""
        alpha_t, sigma_t, alpha_s0, sigma_s0, h, rks = self._terms(i + 1, i, [i - k for k in range(1, order)])
        if h == 0:  # a final sigma equal to the last one
            return x
        m = self._outputs
        hh = -h if self.config["predict_x0"] else h
        r, b, h_phi_1, b_h = _unipc_system(rks + [1.0], hh, order, self.config["solver_type"] == "bh1")
        x_t, scale = self._first_order(x, m[-1], alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1)
        if order == 1:
            return x_t
        rhos = [0.5] if order == 2 else np.linalg.solve(r[:-1, :-1], b[:-1]).tolist()
        d1s = [(m[-(k + 1)] - m[-1]) / rk for k, rk in enumerate(rks, 1)]
        return x_t - (scale * b_h) * sum(rho * d for rho, d in zip(rhos, d1s))

    def _correct(self, i, model_t, this_sample):
        """diffusers `multistep_uni_c_bh_update`: UniC redoes the step from sigma_{i-1} to sigma_i with the new
        model output `model_t`."""
        order = self._this_order
        alpha_t, sigma_t, alpha_s0, sigma_s0, h, rks = self._terms(i, i - 1, [i - k - 1 for k in range(1, order)])
        m = self._outputs
        hh = -h if self.config["predict_x0"] else h
        r, b, h_phi_1, b_h = _unipc_system(rks + [1.0], hh, order, self.config["solver_type"] == "bh1")
        x_t, scale = self._first_order(self._last_sample, m[-1], alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1)
        rhos = [0.5] if order == 1 else np.linalg.solve(r, b).tolist()
        d1s = [(m[-(k + 1)] - m[-1]) / rk for k, rk in enumerate(rks, 1)]
        correction = sum(rho * d for rho, d in zip(rhos[:-1], d1s)) + rhos[-1] * (model_t - m[-1])
        return x_t - (scale * b_h) * correction


class DEISMultistepScheduler(ExponentialIntegrator):
    """DEIS with the log-rho multistep update of order 1-3 (Zhang & Chen 2022, eq. 15; rho = sigma / alpha): the
    noise predictions of the last steps extrapolated by Lagrange polynomials in log rho."""

    defaults = dict(
        **_BETAS,
        **SIGMA_OPTIONS,
        solver_order=2,
        prediction_type="epsilon",
        algorithm_type="deis",
        solver_type="logrho",
        lower_order_final=True,
        timestep_spacing="linspace",
        steps_offset=0,
    )
    unsupported = dict(thresholding=False, use_flow_sigmas=False, use_dynamic_shifting=False)

    def __init__(self, **config):
        if config.get("algorithm_type") in ("dpmsolver", "dpmsolver++"):  # as diffusers
            config["algorithm_type"] = "deis"
        if config.get("solver_type") in ("midpoint", "heun", "bh1", "bh2"):
            config["solver_type"] = "logrho"
        super().__init__(**config)
        if (self.config["algorithm_type"], self.config["solver_type"]) != ("deis", "logrho"):
            raise ValueError(f"{self.label}: only algorithm_type 'deis' with solver_type 'logrho' is supported")
        if not 1 <= self.config["solver_order"] <= 3:
            raise ValueError(f"{self.label}: solver_order must be 1, 2 or 3")

    def _final_sigma(self, sigmas, converted):
        """The last sigma again with a sigma schedule (the last step then keeps the sample), else the smallest
        training sigma: diffusers' DEIS never ends at sigma 0."""
        return sigmas[-1] if converted else self.train_sigmas[0]

    def step(self, model_output, t, sample, noise=None):
        """The first-order update at the first (and, under 15 steps, final) step, else the log-rho update of the
        solver's order; `noise` is unused."""
        i = self._begin_step(t)
        cfg, n = self.config, len(self._sigmas) - 1
        final = i == n - 1 and cfg["lower_order_final"] and n < 15
        second_last = i == n - 2 and cfg["lower_order_final"] and n < 15
        alpha, sigma, _ = alpha_sigma_lambda(self._sigmas[i])
        x0 = self._data_prediction(model_output, sample, self._sigmas[i])
        self._push_output((sample - alpha * x0) / sigma)
        if cfg["solver_order"] == 1 or self._lower_order_nums < 1 or final:
            order = 1
        elif cfg["solver_order"] == 2 or self._lower_order_nums < 2 or second_last:
            order = 2
        else:
            order = 3
        prev_sample = self._update(i, order, sample.astype(mx.float32))
        self._lower_order_nums = min(self._lower_order_nums + 1, cfg["solver_order"])
        self._step_index += 1
        return prev_sample.astype(model_output.dtype)

    def _update(self, i, order, x):
        """diffusers `deis_first_order_update` and the multistep DEIS second / third order updates."""
        s, m = self._sigmas, self._outputs
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(s[i + 1])
        alpha_s0, sigma_s0, lambda_s0 = alpha_sigma_lambda(s[i])
        if order == 1:
            return (alpha_t / alpha_s0) * x - (sigma_t * math.expm1(lambda_t - lambda_s0)) * m[-1]
        rhos = [sigma_t / alpha_t] + [
            sig / alp for alp, sig, _ in map(alpha_sigma_lambda, s[i - order + 1 : i + 1][::-1])
        ]
        coefficients = _log_rho_coefficients(rhos)
        return alpha_t * (x / alpha_s0 + sum(c * m[-1 - j] for j, c in enumerate(coefficients)))


def _ind(t, b, c):
    """diffusers' second-order `ind_fn`: the antiderivative at rho = t of the basis polynomial of node b."""
    return t * (-math.log(c) + math.log(t) - 1) / (math.log(b) - math.log(c))


def _ind3(t, b, c, d):
    """diffusers' third-order `ind_fn`."""
    lt, lb, lc, ld = math.log(t), math.log(b), math.log(c), math.log(d)
    return t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2) / ((lb - lc) * (lb - ld))


def _log_rho_coefficients(rhos):
    """The integrals from rho_s0 to rho_t of the Lagrange basis polynomials in log rho over the nodes rho_s0,
    rho_s1 (, rho_s2), one per node; rhos = [rho_t, rho_s0, rho_s1, ...]."""
    rho_t, nodes = rhos[0], rhos[1:]
    if len(nodes) == 2:
        pairs = [(nodes[0], nodes[1]), (nodes[1], nodes[0])]
        return [_ind(rho_t, *pair) - _ind(nodes[0], *pair) for pair in pairs]
    triples = [(nodes[0], nodes[1], nodes[2]), (nodes[1], nodes[2], nodes[0]), (nodes[2], nodes[0], nodes[1])]
    return [_ind3(rho_t, *triple) - _ind3(nodes[0], *triple) for triple in triples]

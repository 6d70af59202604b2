"""Schedule math shared by the samplers: training noise levels, timestep spacings and sigma schedules.

Computed with Python floats, rounded to float32 wherever diffusers computes in torch float32, so that
timesteps equal diffusers' and sigmas agree to about one float32 ulp (torch's float32 sqrt on x86 is not
correctly rounded). Pure Python: no array library.
"""

import bisect
import math
import struct

SPACINGS = ("leading", "linspace", "trailing")


def f32(x):
    """Rounds a Python float to float32 (one torch float32 operation on scalars)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def torch_linspace_f32(start, end, n):
    """torch.linspace(start, end, n, dtype=torch.float32): each half is counted from its own end."""
    start, end = f32(start), f32(end)
    if n == 1:
        return [start]
    step = f32(f32(end - start) / (n - 1))
    return [f32(start + step * i) if i < n // 2 else f32(end - step * (n - 1 - i)) for i in range(n)]


def np_linspace(start, stop, n):
    """np.linspace(start, stop, n) in float64."""
    if n == 1:
        return [float(start)]
    step = (stop - start) / (n - 1)
    return [start + i * step for i in range(n - 1)] + [float(stop)]


def np_arange(start, stop, step):
    """np.arange(start, stop, step) with a float step: element i >= 2 is start + i * (x[1] - x[0])."""
    n = max(math.ceil((stop - start) / step), 0)
    second = start + step
    delta = second - start
    return [float(start), second][:n] + [start + i * delta for i in range(2, n)]


def interp(t, fp):
    """np.interp(t, arange(len(fp)), fp)."""
    if t <= 0:
        return fp[0]
    if t >= len(fp) - 1:
        return fp[-1]
    j = math.floor(t)
    return fp[j] if j == t else (fp[j + 1] - fp[j]) * (t - j) + fp[j]


def alphas_cumprod(cfg):
    """diffusers' betas -> alphas_cumprod in float32 (torch.cumprod on CPU accumulates in double)."""
    n, schedule = cfg["num_train_timesteps"], cfg["beta_schedule"]
    if cfg["trained_betas"] is not None:
        betas = [f32(b) for b in cfg["trained_betas"]]
    elif schedule == "linear":
        betas = torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    elif schedule == "scaled_linear":
        betas = [f32(b * b) for b in torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n)]
    elif schedule == "squaredcos_cap_v2":  # `betas_for_alpha_bar`, Nichol & Dhariwal 2021 eq. 17
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [f32(min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999)) for i in range(n)]
    else:
        raise ValueError(f"unknown beta_schedule {schedule!r}")
    cumprod, acc = [], 1.0
    for beta in betas:
        acc *= f32(1.0 - beta)
        cumprod.append(f32(acc))
    return cumprod


def spaced_timesteps(cfg, n):
    """n descending float64 timesteps, diffusers' `timestep_spacing` (Lin et al. 2023, Table 2) as in Euler.

    "trailing" keeps the first n of np.arange's points: for 62 values of n (61 to 998) np.arange's
    float step yields one point more, which diffusers keeps as a last timestep -1 (a repeated sigma)."""
    num_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        return np_linspace(0, num_train - 1, n)[::-1]
    if spacing == "leading":
        return [float(i * (num_train // n) + cfg["steps_offset"]) for i in reversed(range(n))]
    return [round(t) - 1.0 for t in np_arange(num_train, 0, -num_train / n)[:n]]


def spaced_timesteps_multistep(cfg, n, last):
    """n descending integer timesteps of the multistep solvers (DPM-Solver, UniPC, DEIS): n + 1 points of which
    the last is dropped; `last` is num_train_timesteps less the steps clipped by lambda_min_clipped."""
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        return [round(t) for t in np_linspace(0, last - 1, n + 1)][::-1][:-1]
    if spacing == "leading":
        return [i * (last // (n + 1)) + cfg["steps_offset"] for i in range(n, 0, -1)]
    return [round(t) - 1 for t in np_arange(last, 0, -cfg["num_train_timesteps"] / n)[:n]]


def karras_sigmas(sigma_min, sigma_max, n, rho=7.0):
    """Karras et al. 2022 eq. 5 (diffusers `_convert_to_karras`), descending, float64."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in np_linspace(0, 1, n)]


def exponential_sigmas(sigma_min, sigma_max, n):
    """Evenly spaced in log sigma (diffusers `_convert_to_exponential`), descending."""
    return [math.exp(x) for x in np_linspace(math.log(sigma_max), math.log(sigma_min), n)]


def beta_sigmas(sigma_min, sigma_max, n, alpha=0.6, beta=0.6):
    """Beta-distribution quantiles of 1 - linspace(0, 1, n) (Lee et al. 2024, diffusers `_convert_to_beta`)."""
    return [sigma_min + beta_ppf(1 - q, alpha, beta) * (sigma_max - sigma_min) for q in np_linspace(0, 1, n)]


SIGMA_SCHEDULES = {
    "use_karras_sigmas": karras_sigmas,
    "use_exponential_sigmas": exponential_sigmas,
    "use_beta_sigmas": beta_sigmas,
}


def sigma_schedule(cfg):
    """The `use_*_sigmas` function the config turns on, or None."""
    chosen = [fn for key, fn in SIGMA_SCHEDULES.items() if cfg.get(key)]
    if len(chosen) > 1:
        raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas can be set")
    return chosen[0] if chosen else None


def convert_sigmas(cfg, convert, in_sigmas, n):
    """diffusers `_convert_to_*`: `convert` from sigma_min to sigma_max, which default to the ends of in_sigmas."""
    sigma_min = cfg.get("sigma_min") if cfg.get("sigma_min") is not None else in_sigmas[-1]
    sigma_max = cfg.get("sigma_max") if cfg.get("sigma_max") is not None else in_sigmas[0]
    return convert(sigma_min, sigma_max, n)


def sigma_to_t(sigma, log_sigmas):
    """diffusers `_sigma_to_t`: the fractional training timestep of sigma, interpolated in log space."""
    log_sigma = math.log(max(sigma, 1e-10))
    low = min(max(bisect.bisect_right(log_sigmas, log_sigma) - 1, 0), len(log_sigmas) - 2)
    w = (log_sigmas[low] - log_sigma) / f32(log_sigmas[low] - log_sigmas[low + 1])
    w = min(max(w, 0.0), 1.0)
    return (1 - w) * low + w * (low + 1)


def sigma_to_t_f32(sigma, log_sigmas):
    """sigma_to_t with every operation in float32, as diffusers' DPM2 computes its midpoint timesteps (on float32
    tensors); float64 would differ from them by up to 3e-3."""
    log_sigma = f32(math.log(max(sigma, f32(1e-10))))
    low = min(max(bisect.bisect_right(log_sigmas, log_sigma) - 1, 0), len(log_sigmas) - 2)
    w = f32(f32(log_sigmas[low] - log_sigma) / f32(log_sigmas[low] - log_sigmas[low + 1]))
    w = min(max(w, 0.0), 1.0)
    return f32(1 - w) * low + w * (low + 1)


def _beta_continued_fraction(a, b, x):
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes eq. 6.4.5)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for aa in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def _beta_cdf(x, a, b, log_beta):
    """The regularized incomplete beta function I_x(a, b)."""
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - log_beta)
    if x < (a + 1) / (a + b + 2):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def beta_ppf(q, a, b):
    """The Beta(a, b) quantile function (scipy.stats.beta.ppf): safeguarded Newton on I_x(a, b) = q."""
    if q <= 0:
        return 0.0
    if q >= 1:
        return 1.0
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    lo, hi, x = 0.0, 1.0, 0.5
    for _ in range(200):
        f = _beta_cdf(x, a, b, log_beta) - q
        lo, hi = (lo, x) if f > 0 else (x, hi)
        density = math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - log_beta)
        new = x - f / density
        if not lo < new < hi:
            new = 0.5 * (lo + hi)
        if abs(new - x) <= 4e-16 * x:
            return new
        x = new
    return x

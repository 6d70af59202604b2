"""exp, SiLU and GELU for MLX's CPU backend, built from operations that it vectorizes.

MLX's CPU backend evaluates exp (and erf and sigmoid, which use it) one element at a time: ~35 ns per float32
on the x86 development machine, 20x numpy's exp, so that softmax, GELU and SiLU took a third of a UNet step.
Here e**x = 2**n * e**r (Cephes expf: Cody-Waite reduction, degree-7 polynomial) is computed by short
single-output kernels of multiply-adds, which mx.compile turns into loops that the C++ compiler vectorizes,
with 2**n written as float32 exponent bits: 3-8x faster than MLX's functions there, and more accurate (max
relative error 1e-7; mx.exp's is 3e-6 at x = -30).

Two things keep the kernels fast on the CPU backend, whose fusion (mlx 0.32) ends a kernel at depth 11, at an
array with two consumers in different outputs, and at a `view`: every compiled function has one output and few
levels, and `_barrier` (a no-copy view) separates them, so that an enclosing mx.compile does not merge them
into kernels that take strided inputs, which are not vectorized.

`silu`, `gelu`, `quick_gelu` and `exp_nonpositive` take these paths for float32 on the CPU and are MLX's own
functions elsewhere (Metal's and CUDA's exp are fast): call them instead of nn.silu / nn.gelu /
nn.gelu_fast_approx.
"""

import math

import mlx.core as mx
import mlx.nn as nn

LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693145751953125, 1.428606765330187e-06  # ln 2 = LN2_HI + LN2_LO, LN2_HI exact in 16 bits
ROUND = 12582912.0  # 1.5 * 2**23: (y + ROUND) - ROUND rounds y to the nearest integer for |y| < 2**22
# Cephes expf: e**r = 1 + r + r**2 * P(r) for |r| <= ln(2) / 2
EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
# Abramowitz & Stegun 7.1.26, as MLX's and PyTorch's vectorized erf: |error| <= 1.5e-7
ERF_P, ERF_A = 0.3275911, (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


def compute_dtype(dtype):
    """The dtype that activations run in for weights kept in `dtype`: float32 on MLX's CPU backend, whose float16
    and bfloat16 matrix products run ~50x slower than float32 ones there (x86: 3 vs 200 GFLOP/s); the weights stay
    in `dtype` at rest and each layer's are promoted as it runs. Elsewhere `dtype` itself."""
    if dtype in (mx.float16, mx.bfloat16) and mx.default_device() == mx.cpu:
        return mx.float32
    return dtype


def fast_path(x):
    """Whether x takes this module's paths: float32 on the CPU backend."""
    return x.dtype == mx.float32 and mx.default_device() == mx.cpu


def _barrier(x):
    """x itself, as a no-copy view that mx.compile does not fuse across."""
    return x.view(mx.int32).view(mx.float32)


def _round(y):
    return (y * LOG2E + ROUND) - ROUND  # n = round(y / ln 2)


def _exp_kernels(argument):
    """exp(argument(*xs)) for argument(*xs) <= 88 as three compiled kernels: 2**n as float32 bits (0 where
    argument(*xs) < -87.7, below float32's normal range), the reduced r = argument(*xs) - n ln 2, and 2**n * e**r."""

    def bits(*xs):
        n = _round(argument(*xs)).astype(mx.int32)
        return mx.left_shift(mx.maximum(n, -127) + 127, 23)

    def reduced(*xs):
        y = argument(*xs)
        n = _round(y)
        return (y - n * LN2_HI) - n * LN2_LO

    bits, reduced = mx.compile(bits), mx.compile(reduced)

    def exp(*xs):
        xs = [mx.contiguous(x) for x in xs]
        return _scaled_exp(_barrier(reduced(*xs)), bits(*xs).view(mx.float32))

    return exp


@mx.compile
def _scaled_exp(r, scale):
    r2 = r * r
    p = ((EXP_P[0] * r + EXP_P[1]) * (r2 * r2) + (EXP_P[2] * r + EXP_P[3]) * r2) + (EXP_P[4] * r + EXP_P[5])
    return ((p * r2 + r) + 1.0) * scale


_exp = _exp_kernels(lambda x: x)
_exp_shifted = _exp_kernels(lambda x, shift: x - shift)  # the subtraction inside both kernels: one pass less
_exp_minus_abs = _exp_kernels(lambda x: -mx.abs(x))
_exp_minus_half_square = _exp_kernels(lambda x: -0.5 * x * x)
# quick_gelu's e**(-1.702 |x|), the scaled argument as transformers' quick_gelu rounds it (1.702 * x in float32)
QUICK_GELU_SCALE = 1.702
_exp_minus_scaled_abs = _exp_kernels(lambda x: -mx.abs(x * QUICK_GELU_SCALE))


def exp_nonpositive(x, shift=None):
    """e**(x - shift) for finite x <= shift (softmax numerators: shift, e.g. the row maximum, broadcasts against
    x; default 0); 0 where x - shift < -87.7."""
    if not fast_path(x):
        return mx.exp(x if shift is None else x - shift)
    return _barrier(_exp(x) if shift is None else _exp_shifted(x, shift))


@mx.compile
def _silu(x, e):
    # x * sigmoid(k x) = max(x, 0) - |x| e / (1 + e) with e = e**-|k x| (k > 0): no branch, no overflow
    a = mx.abs(x)
    return (x + a) * 0.5 - a * e / (1.0 + e)


def silu(x):
    """x * sigmoid(x)."""
    if not fast_path(x):
        return nn.silu(x)
    x = mx.contiguous(x)
    return _barrier(_silu(x, _barrier(_exp_minus_abs(x))))


def quick_gelu(x):
    """x * sigmoid(1.702 x), as nn.gelu_fast_approx and transformers' quick_gelu (CLIP ViT-L's activation): on
    the CPU its text encoder took 0.47 s for 2 x 77 tokens with MLX's, 0.30 s so (x86 AVX-512, 2 cores)."""
    if not fast_path(x):
        return nn.gelu_fast_approx(x)
    x = mx.contiguous(x)
    return _barrier(_silu(x, _barrier(_exp_minus_scaled_abs(x))))


@mx.compile
def _erf_t(x):
    return 1.0 / (1.0 + (ERF_P / math.sqrt(2)) * mx.abs(x))


@mx.compile
def _gelu(x, t, e):
    # x (1 + erf(x / sqrt 2)) / 2 = (x + |x| (1 - y)) / 2 with y = t A(t) e**(-x**2 / 2) = 1 - erf(|x| / sqrt 2)
    a = mx.abs(x)
    y = ((((ERF_A[0] * t + ERF_A[1]) * t + ERF_A[2]) * t + ERF_A[3]) * t + ERF_A[4]) * t * e
    return (x + a - a * y) * 0.5


def gelu(x):
    """The exact (erf) GELU, x * (1 + erf(x / sqrt(2))) / 2, as nn.gelu."""
    if not fast_path(x):
        return nn.gelu(x)
    x = mx.contiguous(x)
    return _barrier(_gelu(x, _barrier(_erf_t(x)), _barrier(_exp_minus_half_square(x))))

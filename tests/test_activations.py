"""mlx_sd.activations and mlx_sd.attention against float64 references and MLX's own functions."""

import math
from contextlib import nullcontext

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sd.activations import exp_nonpositive, fast_path, gelu, quick_gelu, silu
from mlx_sd.attention import attention, row_max
from mlx_sd.convolution import whole_images


def inputs(shape=(3, 517, 129), scale=4.0, seed=0):
    """Normal values times `scale` plus the edges: 0, +-tiny, large, and beyond float32's exp range."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    edges = [0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 30.0, -30.0, 87.0, -87.0, 88.5, -88.5, 200.0, -200.0, 1e4, -1e4]
    x.reshape(-1)[: len(edges)] = edges
    return x


def test_fast_path_is_float32_on_the_cpu_only():
    on_cpu = mx.default_device() == mx.cpu
    assert fast_path(mx.zeros(2)) == on_cpu
    assert not fast_path(mx.zeros(2, dtype=mx.float16))


def test_exp_nonpositive_matches_float64():
    """Relative error <= 2e-7 (float32 rounding is 6e-8; mx.exp's own error reaches 3e-6), 0 below -87.7."""
    x = -np.abs(inputs())
    got = np.array(exp_nonpositive(mx.array(x))).astype(np.float64)
    expected = np.exp(x.astype(np.float64))
    normal = expected > 2.0**-126
    np.testing.assert_allclose(got[normal], expected[normal], rtol=2e-7, atol=0)
    assert np.all(got[x < -87.7] == 0) and np.all(got >= 0)


def test_exp_nonpositive_with_a_shift_is_exp_of_the_difference():
    """e**(x - shift), the shift (a row maximum) broadcast and subtracted inside the kernels: the same values as
    exp_nonpositive(x - shift)."""
    x = mx.array(inputs())
    shift = x.max(axis=-1, keepdims=True)
    np.testing.assert_array_equal(np.array(exp_nonpositive(x, shift)), np.array(exp_nonpositive(x - shift)))


@pytest.mark.parametrize(
    "ours, reference",
    [
        (silu, lambda x: x / (1 + np.exp(-x))),
        (gelu, lambda x: x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))) / 2),
        (quick_gelu, lambda x: x * (1 + np.tanh(0.851 * x)) / 2),  # x sigmoid(1.702 x), no overflow
    ],
    ids=["silu", "gelu", "quick_gelu"],
)
def test_activations_match_float64(ours, reference):
    """Max abs error <= 1e-6 + 2e-7 |f(x)| (erf's approximation error is 1.5e-7, as MLX's and torch's)."""
    x = inputs()
    got = np.array(ours(mx.array(x))).astype(np.float64)
    expected = reference(x.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=2e-7, atol=1e-6)


@pytest.mark.parametrize(
    "ours, theirs",
    [(silu, nn.silu), (gelu, nn.gelu), (quick_gelu, nn.gelu_fast_approx)],
    ids=["silu", "gelu", "quick_gelu"],
)
def test_activations_under_compile_strided_and_float16(ours, theirs):
    """The same values inside mx.compile, on a strided view, and (MLX's own path) in float16."""
    x = mx.array(inputs((4, 64, 96)))
    eager = ours(x)
    np.testing.assert_array_equal(np.array(mx.compile(ours)(x)), np.array(eager))
    view = x[:, ::2, 32:]
    np.testing.assert_array_equal(np.array(ours(view)), np.array(eager[:, ::2, 32:]))
    half = x.astype(mx.float16)
    np.testing.assert_array_equal(np.array(ours(half)), np.array(theirs(half)))


@pytest.mark.parametrize("traced", [False, True, "pieces"], ids=["numpy", "mlx", "numpy-pieces"])
@pytest.mark.parametrize(
    "lq, lk, block", [(300, 300, 2**24), (300, 77, 2**24), (300, 300, 1000), (5, 9, 1), (40, 1088, 30000)]
)
def test_attention_matches_float64(lq, lk, block, traced, monkeypatch):
    """float32, one or many query blocks, eagerly (numpy's blocks; "pieces": its softmax 7 rows at a time, the
    last piece shorter) and as mx.compile traces it (MLX's), against float64: max abs error <= 3e-6 x max
    |output| (MLX's fused kernel and torch measured 1.0-1.2e-6 x, ours 1.0-1.4e-6 x)."""
    monkeypatch.setattr("mlx_sd.attention.ATTENTION_BLOCK", block)
    if traced == "pieces":
        monkeypatch.setattr("mlx_sd.attention.SOFTMAX_PIECE", 7 * lk)
        traced = False
    rng = np.random.default_rng(lq + lk)
    q = rng.standard_normal((2, 3, lq, 40)).astype(np.float32) * 2
    k, v = (rng.standard_normal((2, 3, lk, 40)).astype(np.float32) * 2 for _ in range(2))
    scores = q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2) / math.sqrt(40)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = (weights / weights.sum(-1, keepdims=True)) @ v.astype(np.float64)
    with whole_images() if traced else nullcontext():
        got = attention(mx.array(q), mx.array(k), mx.array(v), 40**-0.5)
    assert got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), expected, atol=3e-6 * np.abs(expected).max(), rtol=0)


def test_row_max_is_the_maximum():
    """row_max's pieces-first maximum (rows of 1024+ elements, multiples of 64) equals the maximum exactly."""
    for n in (77, 1024, 4096, 1000):
        x = mx.random.normal((2, 3, 5, n), key=mx.random.key(n))
        np.testing.assert_array_equal(np.array(row_max(x)), np.array(x.max(axis=-1, keepdims=True)))


def test_attention_float16_matches_mlx():
    """Other dtypes keep MLX's softmax (float32 accumulation): equal to its fused attention within float16."""
    rng = np.random.default_rng(1)
    q, k, v = (mx.array(rng.standard_normal((1, 2, 64, 32)), mx.float16) for _ in range(3))
    got = attention(q, k, v, 32**-0.5)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=32**-0.5)
    assert got.dtype == mx.float16
    np.testing.assert_allclose(np.array(got, np.float32), np.array(expected, np.float32), atol=2e-3)

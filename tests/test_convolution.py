"""mlx_sd.convolution: row-blocked 3x3 convolutions give the one-call result, with less memory."""

import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sd.activations import silu
from mlx_sd.convolution import (
    conv3x3,
    pointwise,
    shifted_conv3x3,
    shifted_products,
    shifted_sums_conv3x3,
    upsample2x,
)
from mlx_sd.norms import GroupNorm, norm_act
from mlx_sd.quantize import QuantizedConv2d


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("rows", [7, 10, 64])
def test_row_blocks_equal_one_call(rows, quantized, monkeypatch):
    """Identical values: each output is the same dot product over the same unfolded row (the blocks keep the
    matrix products large, past BLAS's small-matrix kernels); 7 rows leave a short last block."""
    B, H, W, C = 1, 64, 96, 64
    monkeypatch.setattr("mlx_sd.convolution.CONV_BLOCK", 9 * B * W * C * rows)
    conv = nn.Conv2d(C, 48, 3, padding=1)
    if quantized:
        conv = QuantizedConv2d(conv, 64, 8)
    x = mx.random.normal((B, H, W, C), key=mx.random.key(rows))
    np.testing.assert_array_equal(np.array(conv3x3(conv, x)), np.array(conv(x)))


@pytest.mark.parametrize("upsample", [False, True])
def test_row_blocks_with_prologue_upsampling_and_residual(upsample, monkeypatch):
    """conv(prologue(upsample2x(x))) + residual in blocks of 10 rows (odd halos of the upsampled rows
    included) equals the same computed on the whole image."""
    B, H, W, C = 1, 33, 48, 64
    monkeypatch.setattr("mlx_sd.convolution.CONV_BLOCK", 9 * B * 2 * W * C * 10)
    conv = nn.Conv2d(C, 32, 3, padding=1)
    x = mx.random.normal((B, H, W, C), key=mx.random.key(3))
    extra = mx.random.normal((B, 2 * H if upsample else H, 2 * W if upsample else W, 32), key=mx.random.key(4))
    expected = conv(silu(2 * (upsample2x(x) if upsample else x))) + extra
    got = conv3x3(conv, x, lambda rows: silu(2 * rows), upsample, residual=lambda a, b: extra[:, a:b])
    np.testing.assert_array_equal(np.array(got), np.array(expected))


def test_row_blocks_bound_the_unfolded_input():
    """A 512 x 512 x 128 convolution: MLX's CPU convolution unfolds 9 x 128 MiB; in blocks the peak above the
    input stays under 2x the output (measured 1409 -> 160 MiB)."""
    if mx.default_device() != mx.cpu:
        pytest.skip("the blocks apply to MLX's CPU backend")
    conv = nn.Conv2d(128, 128, 3, padding=1)
    x = mx.random.normal((1, 512, 512, 128))
    mx.eval(conv.parameters(), x)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(conv3x3(conv, x))
    assert mx.get_peak_memory() - base < 2 * x.nbytes


@pytest.mark.parametrize("outputs", [80, 3])
@pytest.mark.parametrize("batch, height, width, bias", [(2, 64, 64, True), (1, 5, 7, False), (3, 9, 4, True)])
def test_shifted_products_match_the_convolution(batch, height, width, bias, outputs):
    """shifted_conv3x3 (nine shifted matrix products on the padded, flattened images) and shifted_sums_conv3x3
    (one product, nine shifted sums of its outputs) against MLX's convolution: within float32 rounding, image
    borders and several images included."""
    conv = nn.Conv2d(64, outputs, 3, padding=1, bias=bias)
    x = mx.random.normal((batch, height, width, 64), key=mx.random.key(height))
    for products in (shifted_conv3x3, shifted_sums_conv3x3):
        got = products(x, conv.weight, conv.bias if bias else None)
        np.testing.assert_allclose(np.array(got), np.array(conv(x)), rtol=1e-5, atol=1e-5)


def test_few_output_channels_take_the_shifted_sums(monkeypatch):
    """The VAE's conv_out (128 -> 3) at 64x64 and more takes shifted_sums_conv3x3; 32 outputs keep MLX's
    convolution, 64 the nine products; in row blocks, the same values as MLX's convolution."""
    x = mx.random.normal((1, 96, 96, 128), key=mx.random.key(7))
    kinds = {o: shifted_products(nn.Conv2d(128, o, 3, padding=1), x) for o in (3, 8, 16, 32, 64)}
    assert kinds == {3: "outputs", 8: "outputs", 16: "outputs", 32: None, 64: "inputs"}
    assert shifted_products(nn.Conv2d(128, 3, 3, padding=1), x[:, :64, :64]) is None  # 4096 pixels: too few
    conv = nn.Conv2d(128, 3, 3, padding=1)
    monkeypatch.setattr("mlx_sd.convolution.CONV_BLOCK", 3 * 96 * 128 * 10)  # blocks of 10 rows
    np.testing.assert_allclose(np.array(conv3x3(conv, x, silu)), np.array(conv(silu(x))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("upsample", [False, True])
def test_shifted_row_blocks_equal_shifted_whole_image(upsample, monkeypatch):
    """A convolution large enough for the shifted products, in row blocks and in one call, and MLX's convolution:
    within float32 rounding (BLAS may sum a product's terms in another order for another number of rows)."""
    B, H, W, C = 2, 64, 64, 64
    conv = nn.Conv2d(C, 64, 3, padding=1)
    x = mx.random.normal((B, H, W, C), key=mx.random.key(5))
    assert shifted_products(conv, x, 2 if upsample else 1)
    whole = np.array(conv3x3(conv, x, silu, upsample))
    monkeypatch.setattr("mlx_sd.convolution.CONV_BLOCK", 3 * B * 2 * W * C * 7)
    np.testing.assert_allclose(np.array(conv3x3(conv, x, silu, upsample)), whole, rtol=1e-5, atol=1e-6)
    expected = conv(silu(upsample2x(x) if upsample else x))
    np.testing.assert_allclose(whole, np.array(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["float16", "quantized"])
def test_shifted_products_take_float16_and_quantized_kernels(kind):
    """On float32 activations, float16 and quantized kernels are promoted to float32 for the shifted products
    (activations.compute_dtype): MLX's convolution of the same promoted kernel, within float32 rounding."""
    if mx.default_device() != mx.cpu:
        pytest.skip("the shifted products are a CPU path")
    conv = nn.Conv2d(64, 64, 3, padding=1)
    if kind == "float16":
        conv.set_dtype(mx.float16)
        kernel = conv.weight.astype(mx.float32)
    else:
        conv = QuantizedConv2d(conv, 64, 4)
        kernel = conv.kernel(mx.float32)
    x = mx.random.normal((2, 64, 64, 64), key=mx.random.key(6))
    assert shifted_products(conv, x)
    got = conv3x3(conv, x)
    assert got.dtype == mx.float32
    expected = mx.conv2d(x, kernel, padding=1) + conv.bias.astype(mx.float32)
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "upsample, normalize, H, W, out, counts",
    [
        (False, True, 64, 64, 72, (11, 0, 0, 0, 0)),  # Winograd's F(2x2, 3x3) on every block (6 rows; the last 4)
        (True, False, 32, 40, 72, (0, 0, 0, 0, 8)),  # upsampled: F(2x2, 2x2) on four 2x2 convolutions of the input
        (True, True, 33, 40, 72, (0, 0, 1, 0, 8)),  # a last block of 2 rows (one input row): four 2x2 convolutions
        (True, True, 33, 41, 72, (0, 0, 9, 0, 0)),  # an odd width: four 2x2 convolutions throughout
        (False, True, 65, 64, 72, (10, 1, 0, 0, 0)),  # a last block of 5 rows: three products
        (False, False, 64, 65, 72, (0, 11, 0, 0, 0)),  # an odd width: three products throughout
        (False, True, 65, 64, 3, (0, 0, 0, 11, 0)),  # 3 outputs (the VAE's conv_out): one product, shifted sums
    ],
)
def test_numpy_path_matches_the_convolution(upsample, normalize, H, W, out, counts, monkeypatch):
    """conv3x3's numpy path (eagerly on the CPU: GroupNorm + SiLU or no prologue, optional 2x upsampling, a
    residual, 2 images, blocks of 6 rows, 8 when upsampling) against MLX's convolution of the same input, within
    float32 rounding; its blocks of even rows and width by Winograd's F(2x2, 3x3), upsampled ones of an even number
    of input rows and width by Winograd's F(2x2, 2x2) on the four 2x2 convolutions of the input, other upsampled
    ones as those four convolutions, the rest by three products, and with 16 outputs or fewer by one product whose
    outputs are shifted and summed."""
    if mx.default_device() != mx.cpu:
        pytest.skip("the numpy path is a CPU path")
    B, C = 2, 64
    x = mx.random.normal((B, H, W, C), key=mx.random.key(8)) * 2 + 1
    conv = nn.Conv2d(C, out, 3, padding=1)
    norm = GroupNorm(32, C, eps=1e-6, pytorch_compatible=True)
    norm.weight, norm.bias = (mx.random.normal((C,), key=mx.random.key(i)) for i in (9, 10))
    scale = 2 if upsample else 1
    residual = mx.random.normal((B, scale * H, scale * W, out), key=mx.random.key(11))
    calls = {"block": [], "winograd": 0, "products": 0, "upsampled": 0, "sums": 0, "upsampled_winograd": 0}
    spy(monkeypatch, calls)
    rows = 8 if upsample else 6
    monkeypatch.setattr("mlx_sd.convolution.NUMPY_CONV_BLOCK", 4 * (scale * W + 2) * C * rows)
    monkeypatch.setattr("mlx_sd.convolution.UPSAMPLED_BLOCKS", 1)
    prologue = norm_act(norm, x, silu) if normalize else None
    got = conv3x3(conv, x, prologue, upsample, residual=lambda a, b: residual[:, a:b])
    assert sorted(set(calls["block"])) == list(range(0, scale * H, rows))  # row blocks of each image
    kinds = ("winograd", "products", "upsampled", "sums", "upsampled_winograd")
    assert tuple(calls[kind] for kind in kinds) == tuple(B * n for n in counts)
    y = nn.silu(nn.GroupNorm.__call__(norm, x)) if normalize else x
    expected = conv(upsample2x(y) if upsample else y) + residual
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=2e-5)


def test_upsampling_winograd_is_as_accurate_as_the_convolution(monkeypatch):
    """Winograd's F(2x2, 2x2) in the upsampling numpy path (its transforms are differences and sums): its error
    against float64 within 2x that of MLX's convolution of the upsampled input (measured 0.9x at 64 channels,
    1.2x at 128, 2.4x at 256)."""
    if mx.default_device() != mx.cpu:
        pytest.skip("the numpy path is a CPU path")
    calls = {"block": []}
    spy(monkeypatch, calls)
    B, H, W, C = 2, 16, 24, 64
    x = mx.random.normal((B, H, W, C), key=mx.random.key(16)) * 2 + 1
    conv = nn.Conv2d(C, C, 3, padding=1)
    got, ours = np.array(conv3x3(conv, x, upsample=True)), np.array(conv(upsample2x(x)))
    assert calls["upsampled_winograd"] > 0
    padded = np.pad(np.array(upsample2x(x)).astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    weight = np.array(conv.weight).astype(np.float64)
    taps = [padded[:, dy : dy + 2 * H, dx : dx + 2 * W] @ weight[:, dy, dx].T for dy in range(3) for dx in range(3)]
    exact = sum(taps) + np.array(conv.bias)
    assert np.abs(got - exact).max() <= 2 * np.abs(ours - exact).max()


def spy(monkeypatch, calls):
    """Counts the numpy path's blocks (their first rows in calls["block"]) and how each was convolved."""
    from mlx_sd import convolution

    lock = threading.Lock()  # the blocks run on worker threads
    for name, key in (
        ("_numpy_block", "block"),
        ("_winograd", "winograd"),
        ("_products", "products"),
        ("_upsampled", "upsampled"),
        ("_shifted_sums", "sums"),
        ("_upsampled_winograd", "upsampled_winograd"),
    ):
        real = getattr(convolution, name)

        def counted(*args, real=real, key=key):
            with lock:
                if key == "block":
                    calls[key].append(args[1])
                else:
                    calls[key] = calls.get(key, 0) + 1
            return real(*args)

        monkeypatch.setattr(convolution, name, counted)


@pytest.mark.parametrize("rows", [2, 6, 64])
def test_numpy_path_can_write_over_its_input(rows, monkeypatch):
    """overwrite=True (GroupNorm + SiLU prologue, a residual, 2 images, blocks of 2, 6 or all 64 rows): the
    same values as into a new array, in x's own buffer (each block is written once the next block has read
    the rows above it; one block too early would change the next block's input), so that no second array of
    x's size is allocated."""
    if mx.default_device() != mx.cpu:
        pytest.skip("the numpy path is a CPU path")
    B, H, W, C = 2, 64, 64, 64
    monkeypatch.setattr("mlx_sd.convolution.NUMPY_CONV_BLOCK", 4 * (W + 2) * C * rows)
    monkeypatch.setattr("mlx_sd.norms.NORM_BLOCK", B * 4 * W * C)  # GroupNorm's squares, 4 rows at a time
    calls = {"block": [], "winograd": 0, "products": 0, "upsampled": 0, "sums": 0}
    spy(monkeypatch, calls)
    conv = nn.Conv2d(C, C, 3, padding=1)
    norm = GroupNorm(32, C, eps=1e-6, pytorch_compatible=True)
    residual = mx.random.normal((B, H, W, C), key=mx.random.key(12))
    x = mx.random.normal((B, H, W, C), key=mx.random.key(13))
    mx.eval(conv.parameters(), norm.parameters(), residual, x)
    expected = np.array(conv3x3(conv, x, norm_act(norm, x, silu), residual=lambda a, b: residual[:, a:b]))
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    got = conv3x3(conv, x, norm_act(norm, x, silu), residual=lambda a, b: residual[:, a:b], overwrite=True)
    peak = mx.get_peak_memory() - base
    np.testing.assert_array_equal(np.array(got), expected)
    assert sorted(set(calls["block"])) == list(range(0, H, rows))  # the numpy path ran, in these blocks
    np.testing.assert_array_equal(np.array(x), expected)  # x's buffer holds the output
    assert peak < x.nbytes / 2


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_matches_the_convolution(bias):
    conv = nn.Conv2d(64, 24, 1, bias=bias)
    x = mx.random.normal((2, 5, 7, 64), key=mx.random.key(14))
    got = pointwise(conv, x)
    assert got.shape == (2, 5, 7, 24)
    np.testing.assert_allclose(np.array(got), np.array(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, numpy_path", [((1, 64, 32, 64), True), ((2, 16, 16, 64), False)])
def test_numpy_path_from_2048_pixels(shape, numpy_path, monkeypatch):
    """The numpy path from NUMPY_MIN_PIXELS output pixels (2048: it took 0.5x MLX's time at 1 x 64 x 64 x 512),
    MLX's convolution below (transforming the kernel would cost more than it saves)."""
    if mx.default_device() != mx.cpu:
        pytest.skip("the numpy path is a CPU path")
    calls = {"block": [], "winograd": 0, "products": 0, "upsampled": 0, "sums": 0}
    spy(monkeypatch, calls)
    C = shape[-1]
    conv, norm = nn.Conv2d(C, C, 3, padding=1), GroupNorm(32, C, eps=1e-6, pytorch_compatible=True)
    x = mx.random.normal(shape, key=mx.random.key(15))
    got = conv3x3(conv, x, norm_act(norm, x, silu))
    assert (calls["winograd"] > 0) == numpy_path
    expected = conv(nn.silu(nn.GroupNorm.__call__(norm, x)))
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=2e-5)

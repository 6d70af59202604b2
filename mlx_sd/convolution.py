"""3x3 convolutions in blocks of rows on MLX's CPU backend, to bound their memory.

MLX's CPU convolution unfolds its input (im2col) into a (B * H * W, 9 * C) matrix and multiplies it by the
kernel: 9x the input's memory, 1.2 GB for the last decoder block of the SD VAE at 512x512 in float32.
`conv3x3` runs the convolution on blocks of output rows, each from its rows of the input and their one-row
halo, so that the unfolded block stays under CONV_BLOCK elements; what comes before the convolution (a nearest
2x upsampling, an elementwise prologue such as GroupNorm's normalization and an activation) is applied per
block too, so that its full-size results never exist. Each output value is the same dot product over the
same values as in one call: the result is identical. Large float32 convolutions on the CPU are computed as
nine shifted matrix products instead (shifted_conv3x3: no unfolded input, 1.4-2.4x faster from 64x64 pixels;
within float32 rounding of MLX's convolution), or with few output channels as one product whose outputs are
shifted and summed (shifted_sums_conv3x3: 7x faster for the VAE's conv_out), chosen once per image; their
blocks agree with one call within float32 rounding. Where those products would be used and the prologue is
GroupNorm + SiLU (norms.NormAct) or none, the blocks are computed eagerly in numpy instead (_numpy_conv3x3:
vectorized elementwise work, three products with K = 3 C; 0.73-0.89x the time). Elsewhere (Metal, CUDA:
implicit-GEMM convolutions), when one block covers the image, and inside `whole_images()` (what mx.compile
traces: the blocks are evaluated as they go), it is one call.
"""

from contextlib import contextmanager
from contextvars import ContextVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .quantize import QuantizedConv2d

_WHOLE_IMAGES = ContextVar("whole_images", default=False)

# unfolded-input elements per block (8M: 32 MiB in float32; products of at least 1,800 x 4,608 x C)
CONV_BLOCK = 2**23
# output pixels (all images) from which a float32 CPU convolution is nine shifted products rather than MLX's
# unfolding convolution: 1.4-2.4x faster from 2 x 64 x 64 pixels, slower on 2 x 16 x 16 (x86, OpenBLAS)
SHIFTED_MIN_PIXELS = 8192
# unfolded elements (3 taps side by side) per block of the numpy path (4M: 16 MiB; smaller blocks stay in caches)
NUMPY_CONV_BLOCK = 2**22
# output channels up to which the shifted form sums shifted outputs of one product (see shifted_sums_conv3x3)
SHIFTED_SUMS_MAX = 16


def upsample2x(x):
    """Nearest-neighbour 2x upsampling of NHWC x, as F.interpolate(scale_factor=2.0, mode="nearest")."""
    B, H, W, C = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
    return x.reshape(B, 2 * H, 2 * W, C)  # (B, 2H, 2W, C)


def conv3x3(conv, x, prologue=None, upsample=False, residual=None, overwrite=False):
    """conv(prologue(upsample2x(x))) + residual() for a 3x3, stride-1, padding-1 convolution layer (nn.Conv2d or
    a quantized one) on NHWC x. Optional: `prologue` (elementwise: it sees blocks of rows), the upsampling, and
    `residual(start, stop)`, the rows start..stop of a term added to the output. overwrite=True lets the numpy
    path write the output over x where the shapes agree (each block once the rows it reads are read): for an x
    that nothing reads afterwards, so that the two never exist at once."""
    B, H, W, C = x.shape
    scale = 2 if upsample else 1
    copies = 9  # the unfolded input of MLX's convolution; the shifted products' padded copy and prologue: ~3
    kind = shifted_products(conv, x, scale)
    if kind == "inputs" and evaluate_blocks():
        affine = None if prologue is None else getattr(prologue, "affine", lambda: None)()
        if prologue is None or affine is not None:
            return _numpy_conv3x3(conv, x, affine, upsample, residual, overwrite)
    if kind:
        conv, copies = _shifted(conv, kind), 3
    rows = max(1, CONV_BLOCK // (copies * B * scale * W * C))
    if rows >= scale * H or not evaluate_blocks():
        out = conv(_input(x, prologue, upsample))
        return out if residual is None else residual(0, scale * H) + out
    out = None
    for start in range(0, scale * H, rows):
        stop = min(start + rows, scale * H)
        top, bottom = max(start - 1, 0), min(stop + 1, scale * H)  # the halo rows; the layer zero-pads the edges
        first = top // scale  # rows top..bottom of the upsampled input come from rows first..last of x
        block = _input(x[:, first : (bottom - 1) // scale + 1], prologue, upsample)[:, top - scale * first :]
        block = conv(block[:, : bottom - top])[:, start - top : stop - top]
        if residual is not None:
            block = residual(start, stop) + block
        if out is None:
            out = mx.zeros((B, scale * H, block.shape[2], block.shape[3]), block.dtype)
        out[:, start:stop] = block
        mx.eval(out)  # in place; the CPU backend frees the block's unfolded input once evaluated
    return out


def pointwise(conv, x):
    """A 1x1 convolution layer on NHWC x; an nn.Conv2d as one matrix product (MLX's CPU convolution took 26 MiB
    of temporaries for a 5.5 MiB output: 21 rows of 512 x 512 x 256 -> 128), other layers (LoRA, quantized)
    as themselves."""
    if type(conv) is not nn.Conv2d:
        return conv(x)
    weight = conv.weight.reshape(conv.weight.shape[0], -1).T  # (O, 1, 1, I) -> (I, O)
    rows = x.reshape(-1, x.shape[-1])
    out = mx.addmm(conv.bias, rows, weight) if "bias" in conv else rows @ weight
    return out.reshape(*x.shape[:-1], -1)


def _numpy_conv3x3(conv, x, affine, upsample, residual, overwrite=False):
    """conv3x3 on the CPU backend, evaluated now, with numpy on views of MLX's evaluated arrays: per block of
    output rows and image, the prologue (GroupNorm's per-channel `affine` (scale, shift) and SiLU, if given)
    is written into a zero-padded block flattened to rows of (W + 2) pixels, the three dx taps of it side by
    side (3 C columns), and the output is three products, one per dy, of its slices shifted by dy * (W + 2)
    rows. numpy's elementwise work is vectorized (MLX's CPU kernels are not here) and products with K = 3 C use
    the BLAS better than nine with K = C: a 512x512 GroupNorm + SiLU + 128 -> 128 convolution took 0.65x the
    time of the nine shifted products in MLX, within float32 rounding (1.4e-6 against float64 where those
    give 1.05e-6). Each block is written into the output's buffer one block late, when the next block has read
    its input rows: with `overwrite` (and no upsampling, as many outputs as inputs) that buffer is x's own."""
    B, H, W, C = x.shape
    scale = 2 if upsample else 1
    weight = _float32_kernel(conv)
    arrays = [mx.contiguous(x), weight.transpose(1, 2, 3, 0).reshape(3, 3 * C, -1)]  # per dy: (dx, C) x O
    arrays += [conv.bias.astype(mx.float32)] if "bias" in conv else []
    arrays += list(affine or ())
    mx.eval(*arrays)
    images, kernels, *rest = (np.asarray(a) for a in arrays)  # no copies: `arrays` stays alive until the end
    bias = rest.pop(0) if "bias" in conv else None
    if overwrite and scale == 1 and kernels.shape[-1] == C:
        out = arrays[0]
    else:
        out = _evaluated(mx.zeros((B, scale * H, scale * W, kernels.shape[-1]), mx.float32))
    target = np.asarray(out)  # a view: writing it writes `out`
    rows = max(1, NUMPY_CONV_BLOCK // (3 * (scale * W + 2) * C))
    pending = []
    for start in range(0, scale * H, rows):
        stop = min(start + rows, scale * H)
        blocks = [_numpy_block(images[b], start, stop, scale, [a[b] for a in rest], kernels, bias) for b in range(B)]
        if residual is not None:
            extra = np.asarray(_evaluated(mx.contiguous(residual(start, stop))))
            for b, block in enumerate(blocks):
                block += extra[b]
        for b, (a, z, block) in enumerate(pending):  # the block before: its input rows are all read now
            target[b, a:z] = block
        pending = [(start, stop, block) for block in blocks]
    for b, (a, z, block) in enumerate(pending):
        target[b, a:z] = block
    return out


def _numpy_block(image, start, stop, scale, affine, kernels, bias):
    """Output rows start..stop of _numpy_conv3x3 for one image (H, W, C) as numpy (rows, scale * W, O)."""
    H, W, C = image.shape
    Wp = scale * W + 2
    padded = np.zeros((stop - start + 3, Wp, C), np.float32)  # input rows start - 1 .. stop, and one spare
    top, bottom = max(start - 1, 0), min(stop + 1, scale * H)  # the rows inside the (upsampled) image
    rows = image[top // scale : (bottom - 1) // scale + 1]
    if scale == 2:
        rows = np.repeat(np.repeat(rows, 2, axis=0), 2, axis=1)[top % 2 :]
    inside = padded[top - start + 1 : bottom - start + 1, 1:-1]
    if affine:
        np.multiply(rows[: bottom - top], affine[0], out=inside)
        inside += affine[1]
        denominator = np.exp(np.negative(inside))  # SiLU: x / (1 + e**-x)
        denominator += 1
        np.divide(inside, denominator, out=inside)
    else:
        inside[...] = rows[: bottom - top]
    flat = padded.reshape(-1, C)
    n = len(flat) - 2
    taps = np.concatenate([flat[0:n], flat[1 : n + 1], flat[2 : n + 2]], axis=1)  # (n, 3 C): dx = 0, 1, 2
    m = (stop - start) * Wp
    out = taps[:m] @ kernels[0]
    for dy in (1, 2):
        out += taps[dy * Wp : dy * Wp + m] @ kernels[dy]
    if bias is not None:
        out += bias
    return out.reshape(stop - start, Wp, -1)[:, : scale * W]


def _evaluated(a):
    mx.eval(a)
    return a


def shifted_products(conv, x, scale=1):
    """How conv3x3 computes `conv` on x: "inputs", nine products of shifted inputs (shifted_conv3x3); "outputs",
    one product whose outputs are shifted and summed (few output channels: shifted_sums_conv3x3); or None,
    MLX's convolution. The shifted forms take an nn.Conv2d or QuantizedConv2d on float32 x on the CPU backend
    (its weights in any dtype, promoted to float32 for the call) with at least SHIFTED_MIN_PIXELS output pixels
    and 64 input channels: "inputs" for 64 output channels or more, "outputs" for SHIFTED_SUMS_MAX or fewer."""
    B, H, W, C = x.shape
    if (
        type(conv) not in (nn.Conv2d, QuantizedConv2d)
        or x.dtype != mx.float32
        or mx.default_device() != mx.cpu
        or B * H * W * scale * scale < SHIFTED_MIN_PIXELS
        or C < 64
    ):
        return None
    outputs = _kernel_shape(conv)[0]
    return "inputs" if outputs >= 64 else "outputs" if outputs <= SHIFTED_SUMS_MAX else None


def _kernel_shape(conv):
    return conv.kernel_shape if isinstance(conv, QuantizedConv2d) else conv.weight.shape


def _shifted(conv, kind):
    products = shifted_conv3x3 if kind == "inputs" else shifted_sums_conv3x3

    def run(x):
        return products(x, _float32_kernel(conv), conv.bias if "bias" in conv else None)

    return run


def _float32_kernel(conv):
    """The layer's OHWI kernel in float32 (promoted from float16, or dequantized)."""
    return conv.kernel(mx.float32) if isinstance(conv, QuantizedConv2d) else conv.weight.astype(mx.float32)


def shifted_conv3x3(x, weight, bias=None):
    """A 3x3, stride-1, padding-1 convolution of NHWC x with an OHWI weight as nine matrix products.

    On the zero-padded input flattened to rows of (W + 2) pixels, the input of tap (dy, dx) for every output
    pixel is one contiguous slice, shifted by dy * (W + 2) + dx rows: each tap is one product of that slice with
    the tap's (C, O) kernel, accumulated by addmm. No unfolded copy of the input exists, and the products are
    large; the outputs of the two padding columns and the rows between images are computed and cropped."""
    flat, n, Wp = _flat_padded(x)
    out = None
    for dy in range(3):
        for dx in range(3):
            taps, kernel = flat[dy * Wp + dx : dy * Wp + dx + n], weight[:, dy, dx, :].T  # (n, C), (C, O)
            out = taps @ kernel if out is None else mx.addmm(out, taps, kernel)
    return _cropped(out, x.shape, bias)


def shifted_sums_conv3x3(x, weight, bias=None):
    """shifted_conv3x3 for few output channels (O): one product of the flattened padded input with all nine
    taps' kernels side by side, (C, 9 O), then the sum of each tap's O columns shifted by its offset. Products
    with O = 3 columns ran at a fraction of the BLAS's speed: SD's conv_out at 512x512 (128 -> 3) took 0.19 s
    so, 1.29 s as MLX's convolution (x86, 2 cores)."""
    flat, n, Wp = _flat_padded(x)
    o = weight.shape[0]
    products = flat @ weight.transpose(3, 1, 2, 0).reshape(x.shape[-1], 9 * o)  # (rows, [dy, dx, o])
    out = None
    for dy in range(3):
        for dx in range(3):
            tap = products[dy * Wp + dx : dy * Wp + dx + n, (3 * dy + dx) * o : (3 * dy + dx + 1) * o]
            out = tap if out is None else out + tap
    return _cropped(out, x.shape, bias)


def _flat_padded(x):
    """x zero-padded (one row above, two below, one column each side) as (B * (H + 3) * (W + 2), C) rows, the
    number of rows up to the last image's last output row, and W + 2."""
    B, H, W, C = x.shape
    Wp = W + 2
    flat = mx.pad(x, [(0, 0), (1, 2), (1, 1), (0, 0)]).reshape(B * (H + 3) * Wp, C)
    return flat, (B * (H + 3) - 3) * Wp, Wp


def _cropped(out, shape, bias):
    """The (B, H, W, O) outputs of the rows of _flat_padded, plus bias."""
    B, H, W, _ = shape
    out = mx.pad(out, [(0, 3 * (W + 2)), (0, 0)]).reshape(B, H + 3, W + 2, -1)[:, :H, :W]
    return out if bias is None else out + bias


def evaluate_blocks():
    """Whether blocked computations evaluate block by block: on the CPU backend, outside `whole_images()`."""
    return mx.default_device() == mx.cpu and not _WHOLE_IMAGES.get()


@contextmanager
def whole_images():
    """Within it, conv3x3 makes one call per image and attention.attention evaluates nothing: for code that
    mx.compile traces."""
    token = _WHOLE_IMAGES.set(True)
    try:
        yield
    finally:
        _WHOLE_IMAGES.reset(token)


def _input(x, prologue, upsample):
    x = upsample2x(x) if upsample else x
    return prologue(x) if prologue is not None else x

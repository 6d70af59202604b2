"""3x3 convolutions in blocks of rows on MLX's CPU backend, to bound their memory.

MLX's CPU convolution unfolds its input (im2col) into a (B * H * W, 9 * C) matrix and multiplies it by the
kernel: 9x the input's memory, 1.2 GB for the last decoder block of the SD VAE at 512x512 in float32.
`conv3x3` runs the convolution on blocks of output rows, each from its rows of the input and their one-row
halo, so that the unfolded block stays under CONV_BLOCK elements; what comes before the convolution (a nearest
2x upsampling, an elementwise prologue such as GroupNorm's normalization and an activation) is applied per
block too, so that its full-size results never exist. Each output value is the same dot product over the
same values as in one call: the result is identical. Elsewhere (Metal, CUDA: implicit-GEMM convolutions),
when one block covers the image, and inside `whole_images()` (what mx.compile traces: the blocks are
evaluated as they go), it is one call.
"""

from contextlib import contextmanager
from contextvars import ContextVar

import mlx.core as mx

_WHOLE_IMAGES = ContextVar("whole_images", default=False)

# unfolded-input elements per block (8M: 32 MiB in float32; products of at least 1,800 x 4,608 x C)
CONV_BLOCK = 2**23


def upsample2x(x):
    """Nearest-neighbour 2x upsampling of NHWC x, as F.interpolate(scale_factor=2.0, mode="nearest")."""
    B, H, W, C = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
    return x.reshape(B, 2 * H, 2 * W, C)  # (B, 2H, 2W, C)


def conv3x3(conv, x, prologue=None, upsample=False, residual=None):
    """conv(prologue(upsample2x(x))) + residual() for a 3x3, stride-1, padding-1 convolution layer (nn.Conv2d or
    a quantized one) on NHWC x. Optional: `prologue` (elementwise: it sees blocks of rows), the upsampling, and
    `residual(start, stop)`, the rows start..stop of a term added to the output."""
    B, H, W, C = x.shape
    scale = 2 if upsample else 1
    rows = max(1, CONV_BLOCK // (9 * B * scale * W * C))
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

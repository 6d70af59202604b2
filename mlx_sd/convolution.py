"""3x3 convolutions in blocks of rows on MLX's CPU backend, to bound their memory.

MLX's CPU convolution unfolds its input (im2col) into a (B * H * W, 9 * C) matrix and multiplies it by the
kernel: 9x the input's memory, 1.2 GB for the last decoder block of the SD VAE at 512x512 in float32.
`conv3x3` runs the convolution on blocks of output rows, each with its one-row halo, so that the unfolded block
stays under CONV_BLOCK elements. Each output value is the same dot product over the same unfolded row as in
one call: the result is identical. Elsewhere (Metal, CUDA: implicit-GEMM convolutions) it calls the layer once.
"""

import mlx.core as mx

# unfolded-input elements per block (32M: 128 MiB in float32)
CONV_BLOCK = 2**25


def conv3x3(conv, x):
    """conv(x) for a 3x3, stride-1, padding-1 convolution layer (nn.Conv2d or a quantized one) on NHWC x."""
    B, H, W, C = x.shape
    rows = max(1, CONV_BLOCK // (9 * B * W * C))
    if rows >= H or mx.default_device() != mx.cpu:
        return conv(x)
    blocks = []
    for start in range(0, H, rows):
        stop = min(start + rows, H)
        top, bottom = max(start - 1, 0), min(stop + 1, H)  # the halo rows; the layer zero-pads the image's edges
        blocks.append(conv(x[:, top:bottom])[:, start - top : stop - top])
        mx.eval(blocks[-1])  # the CPU backend frees a convolution's unfolded input only when its work is evaluated
    return mx.concatenate(blocks, axis=1)

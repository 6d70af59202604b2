"""GroupNorm for MLX's CPU backend that can normalize blocks of rows (the prologue of convolution.conv3x3)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .activations import fast_path, silu
from .convolution import evaluate_blocks
from .workers import Scratch, map_pieces

# elements per block of the variance's squared deviations (eagerly on the CPU; 4 MiB in float32)
NORM_BLOCK = 2**20


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm(pytorch_compatible=True); in float32 on the CPU, from two reductions and one fused pass.

    MLX's version transposes the groups together and back: five temporaries of the input's size (640 MiB at
    the VAE decoder's 512x512x128). This one keeps one (its output; eagerly on the CPU the variance's squared
    deviations exist a block of rows at a time), and its two-pass variance is the more accurate (max
    error 3e-6 against float64 where MLX's is 4e-3, for 1M values per group of mean 1 and deviation 3). Its
    sums run per channel over each row, then over the rows, then over the group's channels: reducing the (pixels, group,
    channel) axes of a grouped view directly took 0.3 s per pass at 512x512x128 on the CPU backend, 0.01 s so.
    `normalizer` gives the normalization with the statistics of a whole image, to apply to blocks of rows."""

    def __call__(self, x):
        return self.normalizer(x)(x)

    def normalizer(self, x):
        """A function that normalizes x, or any block of its rows, with x's statistics."""
        if not fast_path(x):
            return super().__call__
        B, _, _, C = x.shape
        mean, inv_std = self.statistics(x)
        w, b = (p.reshape(self.num_groups, -1) for p in (self.weight, self.bias))

        def normalize(rows):
            g = rows.reshape(B, -1, self.num_groups, C // self.num_groups)
            return _normalize(g, mean, inv_std, w, b).reshape(rows.shape)

        return normalize

    def statistics(self, x):
        """The mean and 1 / standard deviation of each group of float32 x (B, H, W, C), each (B, 1, G, 1)."""
        if evaluate_blocks():
            return tuple(mx.array(a) for a in _numpy_statistics(x, self.num_groups, self.eps))
        B, H, W, C = x.shape
        G, n = self.num_groups, H * W * (C // self.num_groups)

        def group_sums(t):  # (B, H, W, C) -> (B, 1, G, 1): per-channel sums over rows, then columns (fast)
            return t.sum(axis=2).sum(axis=1).reshape(B, G, -1).sum(axis=-1).reshape(B, 1, G, 1)

        mean = group_sums(x) / n  # here only while mx.compile traces: eagerly, _numpy_statistics in blocks
        channel_mean = self._per_channel(mean, C).reshape(B, 1, 1, C)
        squares = group_sums(mx.square(x - channel_mean))
        return mean, mx.rsqrt(squares / n + self.eps)

    def affine(self, x):
        """The normalization of float32 x as x * scale + shift per channel: (scale, shift), each (B, C)."""
        mean, inv_std = self.statistics(x)
        scale = self._per_channel(inv_std, x.shape[-1]) * self.weight
        return scale, self.bias - self._per_channel(mean, x.shape[-1]) * scale

    def _per_channel(self, t, channels):
        """(B, 1, G, 1) per group -> (B, C) per channel."""
        B, G = t.shape[0], self.num_groups
        return mx.broadcast_to(t.reshape(B, G, 1), (B, G, channels // G)).reshape(B, channels)


def _numpy_statistics(x, groups, eps):
    """GroupNorm.statistics eagerly on the CPU, in numpy on the worker threads (MLX's reductions use one core:
    0.097 s at 512 x 512 x 128, x86 AVX-512; 0.048 s so): per block of rows, float32 sums per channel (a product
    with ones; the squared deviations from the float32 channel means by einsum), then float64 over the blocks."""
    mx.eval(x := mx.contiguous(x))
    images, (B, H, W, C) = np.asarray(x), x.shape
    rows, scratch = max(1, NORM_BLOCK // (W * C)), Scratch()
    pieces = [(b, start) for b in range(B) for start in range(0, H, rows)]
    ones = np.ones(rows * W, np.float32)

    def group_sums(sums):  # per piece (C,) -> per image and group (B, 1, G, 1), in float64
        per_image = np.sum(np.reshape(sums, (B, -1, C)), axis=1, dtype=np.float64)
        return per_image.reshape(B, 1, groups, -1).sum(axis=-1, keepdims=True) / (H * W * C // groups)

    def sums(piece, mean=None):  # on a worker thread: numpy only
        b, start = piece
        block = images[b, start : start + rows].reshape(-1, C)
        if mean is None:
            return ones[: len(block)] @ block
        deviations = np.subtract(block, mean[b], out=scratch.get("deviations", block.shape))  # reused memory
        return np.einsum("ij,ij->j", deviations, deviations)

    mean = group_sums(map_pieces(sums, pieces))
    channel_mean = np.repeat(mean.reshape(B, groups), C // groups, axis=1).astype(np.float32)
    variance = group_sums(map_pieces(lambda piece: sums(piece, channel_mean), pieces))
    return mean.astype(np.float32), (1 / np.sqrt(variance + eps)).astype(np.float32)


@mx.compile
def _normalize(g, mean, inv_std, weight, bias):
    return (g - mean) * (inv_std * weight) + bias


class NormAct:
    """rows -> act(norm(rows)) with the statistics of x: a prologue for convolution.conv3x3. Where that is
    GroupNorm and SiLU on float32 x on the CPU, `affine()` gives the normalization per channel, for
    convolution's numpy path to apply with the SiLU itself."""

    def __init__(self, norm, x, act):
        self.norm, self.x, self.act = norm, x, act
        self._normalize = None

    def __call__(self, rows):
        if self._normalize is None:
            self._normalize = self.norm.normalizer(self.x)
        return self.act(self._normalize(rows))

    def affine(self):
        """(scale, shift), each (B, C), or None where the prologue is not GroupNorm + SiLU on the fast path."""
        if self.act is not silu or not isinstance(self.norm, GroupNorm) or not fast_path(self.x):
            return None
        return self.norm.affine(self.x)


def norm_act(norm, x, act):
    """rows -> act(norm(rows)) with the statistics of x: a prologue for convolution.conv3x3 (a NormAct)."""
    return NormAct(norm, x, act)

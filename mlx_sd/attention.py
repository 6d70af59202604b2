"""Scaled dot-product attention: MLX's fused kernel on the GPU, query-chunked on the CPU backend.

On the CPU backend mx.fast.scaled_dot_product_attention materializes the whole (B, heads, L, L) score matrix
and its softmax (2 x 671 MB for one 4096-token self-attention of SD at 512x512) and spends most of its time in
exp. `attention` there computes the same result a block of queries at a time, so that the score block stays
under ATTENTION_BLOCK elements, with the softmax's division applied to the (L, head_dim) output instead of the
(L, L) weights; the denominator comes from the same matrix product (v with a column of ones). In float32 the
blocks run in numpy on views of MLX's evaluated arrays (numpy's exp is vectorized; MLX's CPU exp is not), the
heads on worker threads (workers.py); inside convolution.whole_images(), i.e. while mx.compile traces, and in
half precision they are MLX operations (float32: the exp of mlx_sd.activations and the row maximum from
64-element pieces, row_max). SD 1.5's 4096-token self-attention (2 x 8 heads of 40): 8.7 s with MLX's kernel,
1.6-2.1 s with the blocks in MLX, 0.6 s in numpy (x86, 2 cores, OpenBLAS SkylakeX kernels).
"""

import mlx.core as mx
import numpy as np

from .activations import exp_nonpositive
from .convolution import evaluate_blocks
from .workers import Scratch, map_pieces

# score elements per query block on the CPU (4M float32: 16 MiB per intermediate)
ATTENTION_BLOCK = 2**22
# score elements per piece of the numpy softmax's passes (128K: 512 KiB, within a core's L2 cache)
SOFTMAX_PIECE = 2**17


def attention(q, k, v, scale):
    """softmax(q k^T * scale) v for q (B, heads, Lq, d), k and v (B, heads, Lk, d); unmasked."""
    if mx.default_device() != mx.cpu:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    if q.dtype == mx.float32 and evaluate_blocks():
        return _numpy_attention(q, k, v, scale)
    B, heads, Lq, _ = q.shape
    block = max(1, ATTENTION_BLOCK // (B * heads * k.shape[2]))
    kt = k.swapaxes(-1, -2)  # (B, heads, d, Lk)
    q = q * mx.array(scale, q.dtype)
    if q.dtype == mx.float32:
        v = _with_ones(v)
    outs = []
    for i in range(0, Lq, block):
        outs.append(_attention_block(q[:, :, i : i + block], kt, v))
        if evaluate_blocks():
            mx.eval(outs[-1])
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def _with_ones(v):
    """v (B, heads, Lk, d) with a column of ones: its product with the weights gives the softmax's denominator
    too (no separate sum)."""
    return mx.concatenate([v, mx.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)  # (B, heads, Lk, d + 1)


def _attention_block(q, kt, v):
    """In MLX operations (what mx.compile traces, and half precision); in float32, v ends with the column of
    ones."""
    scores = q @ kt  # (B, heads, block, Lk)
    if scores.dtype != mx.float32:
        # as MLX's own fallback: a softmax accumulated in float32, weights in the input dtype
        return mx.softmax(scores, axis=-1, precise=True) @ v
    out = exp_nonpositive(scores, row_max(scores)) @ v  # the subtraction inside the exp's kernels
    return out[..., :-1] / out[..., -1:]


def _numpy_attention(q, k, v, scale):
    """The float32 attention on the CPU backend, evaluated now: the same steps in numpy on views of MLX's
    evaluated q, k^T and v, one (batch, head) and block of queries at a time, on the worker threads
    (workers.map_pieces; the pieces are blocks, not heads: the SD VAE's one-head 4096-token attention ran on one
    of two workers, 0.43 s, now 0.22 s). numpy's exp is vectorized (a 2 x 8 x 512 x 4096 score block: 0.04 s
    against 0.26 s for activations.exp_nonpositive), one head's block stays in the caches between its products,
    and the softmax's passes go over pieces that stay in a core's: one SD 1.5 4096-token layer takes 0.6 s, not
    1.6-2.1 (x86 AVX-512, one thread), and 1.1 s instead of 2.1 with the workers (x86 AVX2, 2 cores)."""
    B, heads, Lq, d = q.shape
    block = max(1, ATTENTION_BLOCK // k.shape[2])
    arrays = mx.contiguous(q * mx.array(scale, q.dtype)), mx.contiguous(k.swapaxes(-1, -2)), _with_ones(v)
    mx.eval(*arrays)
    q, kt, v = (np.asarray(a) for a in arrays)  # no copies: the arrays stay alive until the end
    out, buffers = np.empty((B, heads, Lq, d), np.float32), Scratch()

    def piece(item):  # on a worker thread: numpy only
        b, h, i = item[0], item[1], item[2] * block
        rows = q[b, h, i : i + block]
        scores = np.matmul(rows, kt[b, h], out=buffers.get("scores", (len(rows), kt.shape[-1])))
        _exp_minus_row_max(scores)
        weighted = np.matmul(scores, v[b, h], out=buffers.get("weighted", (len(rows), v.shape[-1])))
        np.divide(weighted[:, :-1], weighted[:, -1:], out=out[b, h, i : i + block])

    map_pieces(piece, np.ndindex(B, heads, -(-Lq // block)))
    return mx.array(out)


def _exp_minus_row_max(scores):
    """scores = exp(scores - their row maximum), in place, SOFTMAX_PIECE elements at a time, which stay in the
    caches between the passes: numpy's exp took 2.7 ns per value on 1 MiB, 8 ns on a 16 MiB block (x86 AVX2);
    one 4096 x 4096 head 0.09 s instead of 0.12. The same values as in one piece."""
    rows = max(1, SOFTMAX_PIECE // scores.shape[1])
    for i in range(0, len(scores), rows):
        piece = scores[i : i + rows]
        np.subtract(piece, piece.max(axis=-1, keepdims=True), out=piece)
        np.exp(piece, out=piece)


def row_max(x):
    """x.max(axis=-1, keepdims=True); for long rows (multiples of 64 from 1024) as the maximum of 64-element
    pieces first, which is elementwise across pieces: ~3x faster on the CPU backend, and the same maximum."""
    n = x.shape[-1]
    if n < 1024 or n % 64:
        return x.max(axis=-1, keepdims=True)
    return x.reshape(*x.shape[:-1], n // 64, 64).max(axis=-2).max(axis=-1, keepdims=True)

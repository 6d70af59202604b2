"""Scaled dot-product attention: MLX's fused kernel on the GPU, query-chunked on the CPU backend.

On the CPU backend mx.fast.scaled_dot_product_attention materializes the whole (B, heads, L, L) score matrix
and its softmax (2 x 671 MB for one 4096-token self-attention of SD at 512x512) and spends most of its time in
exp. `attention` there computes the same result a block of queries at a time, so that the score block stays
under ATTENTION_BLOCK elements, with the exp of mlx_sd.activations in float32 and the softmax's division
applied to the (L, head_dim) output instead of the (L, L) weights; the denominator comes from the same matrix
product (v with a column of ones) and the row maximum from 64-element pieces (row_max). The blocks, and the
stages of each, are evaluated one after the other (MLX would otherwise interleave up to 20 of them), except
inside convolution.whole_images(), i.e. while mx.compile traces. SD 1.5's 4096-token self-attention (2 x 8
heads of 40): 8.7 s with MLX's kernel, 2.1-2.5 s here (x86, 2 cores, OpenBLAS SkylakeX kernels).
"""

import mlx.core as mx

from .activations import exp_nonpositive
from .convolution import evaluate_blocks

# score elements per query block on the CPU (4M float32: 16 MiB per intermediate)
ATTENTION_BLOCK = 2**22


def attention(q, k, v, scale):
    """softmax(q k^T * scale) v for q (B, heads, Lq, d), k and v (B, heads, Lk, d); unmasked."""
    if mx.default_device() != mx.cpu:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    B, heads, Lq, _ = q.shape
    block = max(1, ATTENTION_BLOCK // (B * heads * k.shape[2]))
    kt = k.swapaxes(-1, -2)  # (B, heads, d, Lk)
    q = q * mx.array(scale, q.dtype)
    if q.dtype == mx.float32:
        # a column of ones: the product with the weights gives the softmax's denominator too (no separate sum)
        v = mx.concatenate([v, mx.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)  # (B, heads, Lk, d + 1)
    evaluate = evaluate_blocks()
    if block >= Lq:
        return _attention_block(q, kt, v, evaluate)
    outs = []
    for i in range(0, Lq, block):
        outs.append(_attention_block(q[:, :, i : i + block], kt, v, evaluate))
        if evaluate:
            mx.eval(outs[-1])
    return mx.concatenate(outs, axis=2)


def _attention_block(q, kt, v, evaluate):
    """With `evaluate`, each stage is evaluated before the next is built, which the CPU backend runs faster
    than one graph of the block; values unchanged. In float32, v ends with the column of ones."""
    stage = mx.eval if evaluate else (lambda *arrays: None)
    scores = q @ kt  # (B, heads, block, Lk)
    if scores.dtype != mx.float32:
        # as MLX's own fallback: a softmax accumulated in float32, weights in the input dtype
        return mx.softmax(scores, axis=-1, precise=True) @ v
    stage(scores)
    peak = row_max(scores)
    stage(peak)
    weights = exp_nonpositive(scores, peak)  # the subtraction inside the exp's kernels
    stage(weights)
    out = weights @ v  # (B, heads, block, d + 1)
    stage(out)
    return out[..., :-1] / out[..., -1:]


def row_max(x):
    """x.max(axis=-1, keepdims=True); for long rows (multiples of 64 from 1024) as the maximum of 64-element
    pieces first, which is elementwise across pieces: ~3x faster on the CPU backend, and the same maximum."""
    n = x.shape[-1]
    if n < 1024 or n % 64:
        return x.max(axis=-1, keepdims=True)
    return x.reshape(*x.shape[:-1], n // 64, 64).max(axis=-2).max(axis=-1, keepdims=True)

"""Scaled dot-product attention: MLX's fused kernel on the GPU, query-chunked on the CPU backend.

On the CPU backend mx.fast.scaled_dot_product_attention materializes the whole (B, heads, L, L) score matrix
and its softmax (2 x 671 MB for one 4096-token self-attention of SD at 512x512) and spends most of its time in
exp. `attention` there computes the same result a block of queries at a time, so that the score block stays
under ATTENTION_BLOCK elements, with the exp of mlx_sd.activations in float32 and the softmax's division
applied to the (L, head_dim) output instead of the (L, L) weights. The blocks are evaluated one after the
other (MLX would otherwise interleave up to 20 of them), except inside convolution.whole_images(), i.e.
while mx.compile traces.
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
    if block >= Lq:
        return _attention_block(q, kt, v)
    evaluate = evaluate_blocks()
    outs = []
    for i in range(0, Lq, block):
        outs.append(_attention_block(q[:, :, i : i + block], kt, v))
        if evaluate:
            mx.eval(outs[-1])
    return mx.concatenate(outs, axis=2)


def _attention_block(q, kt, v):
    scores = q @ kt  # (B, heads, block, Lk)
    if scores.dtype != mx.float32:
        # as MLX's own fallback: a softmax accumulated in float32, weights in the input dtype
        return mx.softmax(scores, axis=-1, precise=True) @ v
    weights = exp_nonpositive(scores - scores.max(axis=-1, keepdims=True))
    return (weights @ v) / weights.sum(axis=-1, keepdims=True)

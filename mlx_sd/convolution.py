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
blocks agree with one call within float32 rounding. Where those products would be used (the second form without
upsampling) and the prologue is GroupNorm + SiLU (norms.NormAct) or none, the blocks are computed eagerly in
numpy instead (_numpy_conv3x3: vectorized elementwise work, and Winograd's F(2x2, 3x3), 16 multiplications per
2 x 2 outputs and channel in place of 36: 0.70-0.76x the time of three products with K = 3 C, and the SD VAE's
decode at 512 x 512 0.76x; the error against float64 is 1.6x that of the direct products; upsampling ones by
Winograd's F(2x2, 2x2) on the four 2x2 convolutions that nearest 2x upsampling makes of a 3x3 one, 9 in place of
16). Elsewhere (Metal, CUDA: implicit-GEMM convolutions), when one block covers the image, and inside
`whole_images()` (what mx.compile traces: the blocks are evaluated as they go), it is one call.
"""

import threading
from contextlib import contextmanager
from contextvars import ContextVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .quantize import QuantizedConv2d
from .workers import Scratch, map_pieces, width

_WHOLE_IMAGES = ContextVar("whole_images", default=False)

# unfolded-input elements per block (8M: 32 MiB in float32; products of at least 1,800 x 4,608 x C)
CONV_BLOCK = 2**23
# output pixels (all images) from which a float32 CPU convolution is nine shifted products rather than MLX's
# unfolding convolution: 1.4-2.4x faster from 2 x 64 x 64 pixels, slower on 2 x 16 x 16 (x86, OpenBLAS)
SHIFTED_MIN_PIXELS = 8192
# output pixels from which the numpy path (_numpy_conv3x3) is taken where it applies: 0.5x MLX's time for
# 1 x 64 x 64 x 512, 0.7x for 2 x 32 x 32 x 640, even at 1 x 32 x 32 x 512, 2x at 2 x 16 x 16 x 1280 (where
# transforming the kernel costs more than it saves)
NUMPY_MIN_PIXELS = 2048
# transformed input elements (16 per 2 x 2 output pixels and channel) per block of the numpy path (4M: 16 MiB):
# large enough for products with M >= ~400 at 128 x 128 x 512, small enough to stay in the caches at 512 x 512 x 128
# (x86 AVX-512, 2 workers: the SD VAE's layers 0.75-1.0x their time with 2M; 8M and 16M the same time, except in
# this VM's slow periods, 0.7-0.9x then, for 4x the scratch memory)
NUMPY_CONV_BLOCK = 2**22
# upsampling convolutions take blocks of UPSAMPLED_BLOCKS times as many output rows (with F(2x2, 2x2)'s small
# transformed input, _upsampled_winograd): the SD VAE's 256 -> 512 x 256 channels in blocks of 60 rows, ~45 MiB of
# scratch per worker, 0.85x the time in blocks of 12 (2x, as before); 128 -> 256 x 512 0.78x (x86 AVX-512, 2 workers)
UPSAMPLED_BLOCKS = 8
# Winograd F(2x2, 3x3): the input transform B^T d B of a 4 x 4 tile and the output transform A^T m A of its 4 x 4
# products, as (index, sign) terms over a tile's rows or columns 0-3
WINOGRAD_B = (((0, 1), (2, -1)), ((1, 1), (2, 1)), ((2, 1), (1, -1)), ((1, 1), (3, -1)))
WINOGRAD_A = (((0, 1), (1, 1), (2, 1)), ((1, 1), (2, -1), (3, -1)))
# and the kernel transform's G: a transformed row (column) of a 3x3 kernel from its three rows (columns)
WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
# nearest 2x upsampling then a 3x3 convolution: the output rows (columns) 2 i + p take the taps PHASES[p][0] from
# input row (column) i + p - 1 and PHASES[p][1] from row i + p
PHASES = (((0,), (1, 2)), ((0, 1), (2,)))
# Winograd F(2x2, 2x2) for the four 2x2 convolutions of an upsampling one: the rows (columns) d0, d1, d2 of a 3 x 3
# input tile become d0 - d1, d1 and d2 - d1 (B^T), a 2x2 kernel's k0, k1 become k0, k0 + k1 and k1 (G), and the
# 3 x 3 products m0, m1, m2 the outputs m0 + m1 and m1 + m2 (A^T): exact sums of the products k0 d0 + k1 d1 and
# k0 d1 + k1 d2
WINOGRAD_2X2_G = ((1, 0), (1, 1), (0, 1))
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
    kind = shifted_products(conv, x, scale, NUMPY_MIN_PIXELS) if evaluate_blocks() else None
    if kind == "inputs" or (kind == "outputs" and not upsample):
        affine = None if prologue is None else getattr(prologue, "affine", lambda: None)()
        if prologue is None or affine is not None:
            return _numpy_conv3x3(conv, x, affine, upsample, residual, overwrite)
    kind = shifted_products(conv, x, scale)
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
    is written into a zero-padded block (numpy's elementwise work is vectorized; MLX's CPU kernels are not
    here), then convolved by Winograd's F(2x2, 3x3) (_winograd: 16 products with K = C in place of 36 per 2 x 2
    outputs), when upsampling as four 2x2 convolutions of the input, by Winograd's F(2x2, 2x2) (_upsampled_winograd: 9
    products with K = C in place of 16) or for an odd number of input rows or columns directly (_upsampled), otherwise
    for an odd number of rows or columns by three products with K = 3 C (_products), and to SHIFTED_SUMS_MAX outputs or
    fewer by one product and shifted sums (_shifted_sums: the SD VAE's conv_out at 512 x 512 0.21 s, 0.64 s in MLX).
    The workers also add the bias and the residual (its rows for a group of blocks evaluated before them) and
    write the output (SD VAE 512 x 512 x 128: the 0.3 s of 1.05 s that the calling thread spent so before,
    both cores idle but one). With `overwrite` (and no upsampling, as many outputs as inputs) the output's
    buffer is x's own: each block's first and last rows, which its neighbours read, wait until the next group
    of blocks has run."""
    B, H, W, C = x.shape
    scale = 2 if upsample else 1
    weight = _float32_kernel(conv)
    arrays = [mx.contiguous(x), weight]
    arrays += [conv.bias.astype(mx.float32)] if "bias" in conv else []
    arrays += list(affine or ())
    mx.eval(*arrays)
    images, weight, *rest = (np.asarray(a) for a in arrays)  # no copies: `arrays` stays alive until the end
    bias = rest.pop(0) if "bias" in conv else None
    halves = [a * 0.5 for a in rest]  # the affine's scale and shift halved, as _prologue takes them
    kernels, buffers = _Kernels(weight), Scratch()
    in_place = overwrite and scale == 1 and weight.shape[0] == C
    out = arrays[0] if in_place else _evaluated(mx.zeros((B, scale * H, scale * W, weight.shape[0]), mx.float32))
    target = np.asarray(out)  # a view: writing it writes `out`
    step = 2 * scale  # even rows; upsampling, even input rows (_upsampled_winograd)
    rows = (UPSAMPLED_BLOCKS if upsample else 1) * NUMPY_CONV_BLOCK // (4 * (scale * W + 2) * C)
    rows = _balanced_rows(scale * H, max(step, rows // step * step), B, step)

    def piece(item):  # on a worker thread: numpy only
        start, b, extra = item
        stop = min(start + rows, scale * H)
        rows_out = None if in_place else target[b, start:stop]  # written there, or by _write below
        block = _numpy_block(images[b], start, stop, scale, [a[b] for a in halves], kernels, buffers, bias, rows_out)
        if extra is not None:
            block += extra.reshape(block.shape)
        return _write(target[b, start:stop], block, keep_edges=True) if in_place else None

    edges = []
    for group in _groups(range(0, scale * H, rows), B):
        first, last = group[0], min(group[-1] + rows, scale * H)
        extra = None if residual is None else np.asarray(_evaluated(mx.contiguous(residual(first, last))))
        pieces = [
            (s, b, None if extra is None else extra[b, s - first : s - first + rows]) for s in group for b in range(B)
        ]
        done = map_pieces(piece, pieces)
        _write_edges(target, edges, rows)  # the group before's: the blocks that read them have run
        edges = [(s, b, kept) for (s, b, _), kept in zip(pieces, done)]
    _write_edges(target, edges, rows)
    return out


def _balanced_rows(height, rows, images, step=2):
    """The block height, a multiple of `step` from `step` to 5/4 of `rows`, whose groups of blocks (_groups) take
    the fewest rows one after the other, `rows` itself unless that is 2% fewer: for one image on two workers, 64
    rows in blocks of 30 ran as 30 rows and then 4 on one worker (now 2 x 32 at once), 512 rows in blocks of 14 as
    19 groups (16: 16), 32 rows in one block of 62 on one worker (2 x 16)."""

    def cost(r):  # a group takes as long as its first block, the only one that can be longer than the last
        return sum(min(r, height - group[0]) for group in _groups(range(0, height, r), images))

    best = min(range(step, max(step, rows * 5 // 4) + 1, step), key=lambda r: (cost(r), -r))
    return best if cost(best) < 0.98 * cost(rows) else rows


def _groups(starts, images):
    """The row blocks' starts in groups of one piece per worker: all images of a block, and consecutive blocks
    where there are fewer images than workers (one block at a time where there is no pool)."""
    group = -(-width() // images)
    return [starts[g : g + group] for g in range(0, len(starts), group)]


def _write(rows, block, keep_edges=False):
    """Writes a block (n, width, O), or its (n / 2, 2, width / 2, 2, O) tiles, into contiguous `rows`; with
    keep_edges all but its first and last rows, which it returns (copies, (width, O)) to be written later."""
    view = _into(rows, block.shape)
    if not keep_edges:
        view[...] = block
        return None
    if block.ndim == 3:
        view[1:-1] = block[1:-1]
        edges = block[0], block[-1]
    else:  # row i of the block: tile row i // 2, phase i % 2
        if len(block) > 1:
            view[0, 1], view[1:-1], view[-1, 0] = block[0, 1], block[1:-1], block[-1, 0]
        edges = block[0, 0], block[-1, 1]
    return [np.ascontiguousarray(edge).reshape(rows.shape[1:]) for edge in edges]


def _into(rows, shape):
    """Contiguous output `rows` viewed as `shape` (raises rather than copies), or a new array where rows is None."""
    if rows is None:
        return np.empty(shape, np.float32)
    view = rows.view()
    view.shape = shape
    return view


def _write_edges(target, edges, rows):
    """Writes the first and last rows that _write kept of each block (start, image, kept)."""
    for start, b, kept in edges:
        if kept is not None:
            target[b, start], target[b, min(start + rows, len(target[b])) - 1] = kept


class _Kernels:
    """An OHWI 3x3 kernel (numpy float32) in the layouts of _products (per dy: (dx, C) x O), _winograd (the 16
    transformed (C, O) kernels G k G^T), _upsampled and _shifted_sums, each made once per call when first
    needed; the blocks ask for them from the worker threads, so each is made under a lock."""

    def __init__(self, weight):
        self.weight = weight
        self.per_dy = weight.transpose(1, 2, 3, 0).reshape(3, -1, weight.shape[0])  # a view
        self.few_outputs = weight.shape[0] <= SHIFTED_SUMS_MAX
        self._made = {}
        self._lock = threading.Lock()

    def _layout(self, make):
        with self._lock:
            if make not in self._made:
                self._made[make] = make(self.weight)
            return self._made[make]

    @property
    def winograd(self):
        return self._layout(_winograd_kernels)

    @property
    def phases(self):
        return self._layout(_phase_kernels)

    @property
    def phases_winograd(self):
        return self._layout(_phase_winograd_kernels)

    @property
    def taps(self):
        return self._layout(_tap_kernels)


def _tap_sums(weight, combinations):
    """(n, C, O) kernels, each a linear combination (a row of `combinations`, (n, 9)) of the nine taps of an OHWI
    weight: one batched product, (O, n, C), viewed as (n, C, O) (512 x 512 channels: 6 ms, 36 ms as sums of
    strided taps; products with the views ran as fast as with contiguous copies)."""
    taps = weight.reshape(weight.shape[0], 9, weight.shape[-1])  # (O, [dy, dx], C)
    return np.matmul(np.asarray(combinations, np.float32), taps).transpose(1, 2, 0)


def _winograd_kernels(weight):
    """The 16 transformed (C, O) kernels G k G^T, (16, C, O)."""
    g = np.array(WINOGRAD_G, np.float32)
    return _tap_sums(weight, np.einsum("ai,bj->abij", g, g).reshape(16, 9))


def _tap_kernels(weight):
    """For _shifted_sums: the nine taps' (C, O) kernels side by side, (C, [dy, dx, O])."""
    return np.ascontiguousarray(weight.transpose(3, 1, 2, 0)).reshape(weight.shape[-1], -1)


def _phase_kernels(weight):
    """For _upsampled, per output row and column phase (pr, pc) and input row offset a: the (2 C, O) kernel of
    input column offsets b = 0 and 1, each the sum of the 3x3 taps that fall on that input pixel."""
    combinations = np.zeros((2, 2, 2, 2, 3, 3), np.float32)
    for pr, pc, a, b in np.ndindex(2, 2, 2, 2):
        for dy in PHASES[pr][a]:
            combinations[pr, pc, a, b, dy, PHASES[pc][b]] = 1
    return _tap_sums(weight, combinations.reshape(16, 9)).reshape(2, 2, 2, 2 * weight.shape[-1], -1)


def _phase_winograd_kernels(weight):
    """For _upsampled_winograd, per output phase (pr, pc): the 9 transformed (C, O) kernels G k G^T of its 2x2
    kernel k (each entry the sum of the 3x3 taps that fall on that input pixel, as _phase_kernels), (2, 2, 3, 3,
    C, O)."""
    combinations = np.zeros((2, 2, 3, 3, 3, 3), np.float32)
    for pr, pc, a, b, i, j in np.ndindex(2, 2, 3, 3, 2, 2):
        for dy in PHASES[pr][i]:
            for dx in PHASES[pc][j]:
                combinations[pr, pc, a, b, dy, dx] += WINOGRAD_2X2_G[a][i] * WINOGRAD_2X2_G[b][j]
    return _tap_sums(weight, combinations.reshape(36, 9)).reshape(2, 2, 3, 3, weight.shape[-1], -1)


def _numpy_block(image, start, stop, scale, halves, kernels, buffers, bias=None, out=None):
    """Output rows start..stop of _numpy_conv3x3 for one image (H, W, C), plus `bias` (O) where given: numpy (rows,
    scale * W, O), or from _winograd, _upsampled and _upsampled_winograd its 2 x 2 tiles (rows / 2, 2, scale * W / 2,
    2, O); written into `out` (contiguous (rows, scale * W, O)) where given, and then a view of it. `halves`: the
    prologue's halved (scale, shift), or none; `buffers`: the call's Scratch."""
    H, W, C = image.shape
    rows = stop - start

    def padded(shape):  # zeros, in this thread's reused memory
        block = buffers.get("padded", shape)
        block.fill(0)
        return block

    def prologue(out, inputs):
        _prologue(out, inputs, halves, buffers.get("prologue", out.shape))

    if scale == 2:  # start and stop are even (blocks of even rows): input rows start / 2 - 1 .. stop / 2
        top, bottom = max(start // 2 - 1, 0), min(stop // 2 + 1, H)
        first = top - (start // 2 - 1)  # the padded row of input row `top`; the prologue commutes with 2x
        if rows % 4 or W % 2:
            block = padded((rows // 2 + 3, W + 2, C))
            prologue(block[first : first + bottom - top, 1:-1], image[top:bottom])
            return _biased(_upsampled(block, rows // 2, W, kernels.phases, buffers, out), bias)
        block = _split_columns(padded((rows // 2 + 3, 2, W // 2 + 1, C)), first, image[top:bottom], prologue)
        return _upsampled_winograd(block, rows // 2, kernels.phases_winograd, buffers, bias, out)
    top, bottom = max(start - 1, 0), min(stop + 1, H)  # input rows start - 1 .. stop, inside the image
    first = top - (start - 1)
    if rows % 2 or W % 2 or kernels.few_outputs:
        block = padded((rows + 3, W + 2, C))  # and one spare row
        prologue(block[first : first + bottom - top, 1:-1], image[top:bottom])
        if kernels.few_outputs:
            products = _shifted_sums(block, rows, W, kernels.taps)
        else:
            products = _products(block, rows, W, kernels.per_dy)
        if out is None:
            return _biased(products, bias)
        _write(out, products)
        return _biased(_into(out, products.shape), bias)
    block = _split_columns(padded((rows + 3, 2, W // 2 + 1, C)), first, image[top:bottom], prologue)
    return _winograd(block, rows, kernels.winograd, buffers, bias, out)


def _split_columns(block, first, rows, prologue):
    """Writes prologue(rows) into a zeroed (n, 2, W / 2 + 1, C) block from its row `first`, the padded column
    2 j + p at [:, p, j]: odd padded columns (the image's even ones), then even ones. Returns the block."""
    prologue(block[first : first + len(rows), 1, :-1], rows[:, 0::2])
    prologue(block[first : first + len(rows), 0, 1:], rows[:, 1::2])
    return block


def _biased(block, bias):
    if bias is not None:
        block += bias
    return block


def _prologue(out, inputs, halves, scratch):
    """out = SiLU(inputs * scale + shift) for halves = (scale / 2, shift / 2), by way of `scratch` (out's shape);
    inputs themselves for no halves. SiLU(y) = y (1 + tanh(y / 2)) / 2 = h + h tanh(h) for h = y / 2: five passes
    (x86 AVX-512: 3.4 ns per value, e**-y's form 3.9; numpy's SIMD tanh and exp, within 7e-7 of float64)."""
    if not halves:
        out[...] = inputs
        return
    np.multiply(inputs, halves[0], out=out)
    out += halves[1]  # h
    np.tanh(out, out=scratch)
    scratch *= out
    out += scratch


def _products(padded, rows, width, kernels):
    """The 3x3 convolution of a zero-padded block (rows + 3, width + 2, C): its rows flattened, the three dx taps
    side by side (3 C columns), and three products, one per dy, of slices shifted by dy * (width + 2) rows."""
    Wp, taps = width + 2, _taps(padded)
    m = rows * Wp
    out = taps[:m] @ kernels[0]
    for dy in (1, 2):
        out += taps[dy * Wp : dy * Wp + m] @ kernels[dy]
    return out.reshape(rows, Wp, -1)[:, :width]


def _shifted_sums(padded, rows, width, kernels):
    """The 3x3 convolution of a zero-padded block (rows + 3, width + 2, C) to few (O) outputs: one product of its
    pixels with the nine taps' kernels side by side (C, 9 O), then the sum of each tap's O columns shifted by
    its offset (as shifted_sums_conv3x3)."""
    Wp, n = width + 2, kernels.shape[-1] // 9
    products = padded.reshape(-1, padded.shape[-1]) @ kernels  # (pixels, [dy, dx, O])
    m = rows * Wp
    out = products[:m, :n].copy()
    for tap in range(1, 9):
        shift = tap // 3 * Wp + tap % 3
        out += products[shift : shift + m, tap * n : (tap + 1) * n]
    return out.reshape(rows, Wp, n)[:, :width]


def _taps(padded, buffers=None):
    """A zero-padded block (rows, Wp, C) flattened to pixels, with the three dx taps of each side by side:
    (rows * Wp - 2, 3 C); in the calling thread's memory of `buffers` (a Scratch) where given."""
    flat = padded.reshape(-1, padded.shape[-1])
    n, C = len(flat) - 2, flat.shape[-1]
    out = None if buffers is None else buffers.get("taps", (n, 3 * C))
    return np.concatenate([flat[0:n], flat[1 : n + 1], flat[2 : n + 2]], axis=1, out=out)  # dx = 0, 1, 2


def _upsampled(padded, rows, width, kernels, buffers, out=None):
    """The 3x3 convolution of the nearest 2x upsampling of a zero-padded block (rows + 3, width + 2, C), from the
    block itself: each of the four output phases (even or odd row and column) is a 2x2 convolution of the input
    with sums of the 3x3 taps (_Kernels.phases), two products with K = 2 C on the three dx taps side by side.
    16 C multiplications per 2 x 2 outputs and output channel, as Winograd's, with no transforms and a quarter
    of the input. Returns the output tiles (rows, 2, width, 2, O), in the output rows `out` where given."""
    Wp, C, taps = width + 2, padded.shape[-1], _taps(padded, buffers)
    m = rows * Wp
    tiles = _into(out, (rows, 2, width, 2, kernels.shape[-1]))
    out = tiles.transpose(0, 1, 3, 2, 4)  # (rows, 2, 2, width, O)
    y, product = (buffers.get(slot, (m, kernels.shape[-1])) for slot in ("y", "product"))
    for pr, pc in np.ndindex(2, 2):
        columns = taps[:, pc * C : (pc + 2) * C]  # input columns j + pc - 1 and j + pc
        np.matmul(columns[pr * Wp : pr * Wp + m], kernels[pr, pc, 0], out=y)
        y += np.matmul(columns[(pr + 1) * Wp : (pr + 1) * Wp + m], kernels[pr, pc, 1], out=product)
        out[:, pr, pc] = y.reshape(rows, Wp, -1)[:, :width]
    return tiles


def _upsampled_winograd(padded, rows, kernels, buffers, bias=None, out=None):
    """_upsampled by Winograd's F(2x2, 2x2), for an even number of input rows, the padded block's columns even
    and odd apart ((rows + 3, 2, S + 1, C) for 2 S input columns): each output phase's 2 x 2 outputs (input rows
    2 t, 2 t + 1, columns 2 s, 2 s + 1) from the 3 x 3 input pixels around them, transformed (B^T d B: the
    differences of their outer rows, then columns, with the middle one), 9 products with the transformed kernels
    (G k G^T) and the output transform (A^T m A: sums). 9 C multiplications per 2 x 2 outputs and output channel in
    place of 16: the SD VAE's 256 -> 512 x 256 channels 0.88x _upsampled's time, 128 -> 256 x 512 0.86x (same blocks, 2
    workers); the error against float64 0.9-2.4x that of MLX's convolution (64-256 channels). Returns the output tiles
    (rows, 2, 2 S, 2, O), in the output rows `out` where given; a `bias` goes into the products m_11, which all four
    outputs of a tile sum."""
    T, S, C, outputs = rows // 2, padded.shape[2] - 1, padded.shape[-1], kernels.shape[-1]
    tiles = _into(out, (rows, 2, 2 * S, 2, outputs))
    phases = tiles.reshape(T, 2, 2, S, 2, 2, outputs)  # [t, r, pr, s, c, pc]: output row 4 t + 2 r + pr, ...
    outer = [buffers.get(slot, (T, 2, S + 1, C)) for slot in ("u", "u2")]
    v, m = buffers.get("v", (3, T, S, C)), buffers.get("m", (3, 3, T * S, outputs))
    columns = buffers.get("half", (3, T, S, outputs))
    for pr in range(2):
        d = [padded[pr + a : pr + a + 2 * T : 2] for a in range(3)]  # row a of every tile: (T, 2, S + 1, C)
        np.subtract(d[0], d[1], out=outer[0])
        np.subtract(d[2], d[1], out=outer[1])
        for pc in range(2):
            for a, row in enumerate((outer[0], d[1], outer[1])):
                e = [row[:, (pc + b) % 2, (pc + b) // 2 : (pc + b) // 2 + S] for b in range(3)]  # column b: (T, S, C)
                np.subtract(e[0], e[1], out=v[0])
                np.copyto(v[1], e[1])  # contiguous: one product
                np.subtract(e[2], e[1], out=v[2])
                for b in range(3):
                    np.matmul(v[b].reshape(T * S, C), kernels[pr, pc, a, b], out=m[a, b])
            if bias is not None:
                m[1, 1] += bias
            for c in range(2):
                np.add(m[:, c], m[:, c + 1], out=columns.reshape(3, T * S, outputs))
                for r in range(2):
                    np.add(columns[r], columns[r + 1], out=phases[:, r, pr, :, c, pc])
    return tiles


def _winograd(padded, rows, kernels, buffers, bias=None, out=None):
    """The 3x3 convolution of a zero-padded block, its columns even and odd apart ((rows + 3, 2, S + 1, C) for
    2 S output columns; rows even) by Winograd's F(2x2, 3x3): each 2 x 2 output tile from the 4 x 4 input
    tile around it, transformed (B^T d B: sums and differences of its rows, then of its columns), 16 products
    with the transformed kernels (G k G^T), and the output transform (A^T m A). 16 C multiplications per
    output tile and output channel in place of 36; the error against float64 is 1.6x the direct products'
    (4.3e-6 vs 2.7e-6 at outputs of 9.4). With the columns apart, every sum reads contiguous rows of S C values
    (numpy's strided loops ran 2.3x slower). Returns the tiles (rows / 2, 2, 2 S / 2, 2, O), in the output rows
    `out` where given; a `bias` goes into the products m_11, whose coefficient is 1 in all four outputs of a
    tile (a pass over a quarter of the outputs)."""
    T, S, C = rows // 2, padded.shape[2] - 1, padded.shape[-1]
    d = [padded[k : k + 2 * T : 2] for k in range(4)]  # row k of every tile
    v, u = buffers.get("v", (4, 4, T, S, C)), buffers.get("u", (T, 2, S + 1, C))
    for a, pair in enumerate(WINOGRAD_B):
        _combine(d, pair, out=u)
        columns = [u[:, 0, :-1], u[:, 1, :-1], u[:, 0, 1:], u[:, 1, 1:]]  # column k of every tile: (T, S, C)
        for b, pair in enumerate(WINOGRAD_B):
            _combine(columns, pair, out=v[a, b])
    m = np.matmul(v.reshape(16, T * S, C), kernels, out=buffers.get("m", (16, T * S, kernels.shape[-1])))
    if bias is not None:
        m[5] += bias
    m = m.reshape(4, 4, T, S, -1)
    tiles, half = _into(out, (T, 2, S, 2, m.shape[-1])), buffers.get("half", (4, T, S, m.shape[-1]))
    for c, column in enumerate(WINOGRAD_A):
        _combine([m[:, k] for k in range(4)], column, out=half)  # (4, T, S, O): output column c of each row
        for r, row in enumerate(WINOGRAD_A):
            _combine(half, row, out=tiles[:, r, :, c])
    return tiles


def _combine(parts, terms, out=None):
    """sum(sign * parts[i] for i, sign in terms) of two or more terms, the first with sign +1, into `out` if given."""
    (first, _), (second, sign), *rest = terms
    out = (np.add if sign > 0 else np.subtract)(parts[first], parts[second], out=out)
    for i, sign in rest:
        (np.add if sign > 0 else np.subtract)(out, parts[i], out=out)
    return out


def _evaluated(a):
    mx.eval(a)
    return a


def shifted_products(conv, x, scale=1, min_pixels=None):
    """How conv3x3 computes `conv` on x: "inputs", nine products of shifted inputs (shifted_conv3x3); "outputs",
    one product whose outputs are shifted and summed (few output channels: shifted_sums_conv3x3); or None,
    MLX's convolution. The shifted forms take an nn.Conv2d or QuantizedConv2d on float32 x on the CPU backend
    (its weights in any dtype, promoted to float32 for the call) with at least `min_pixels` (SHIFTED_MIN_PIXELS)
    output pixels and 64 input channels: "inputs" for 64 output channels or more, "outputs" for SHIFTED_SUMS_MAX
    or fewer. conv3x3 asks with min_pixels=NUMPY_MIN_PIXELS where the numpy path would replace "inputs"."""
    B, H, W, C = x.shape
    if (
        type(conv) not in (nn.Conv2d, QuantizedConv2d)
        or x.dtype != mx.float32
        or mx.default_device() != mx.cpu
        or B * H * W * scale * scale < (SHIFTED_MIN_PIXELS if min_pixels is None else min_pixels)
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

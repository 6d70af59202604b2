"""How one layer takes a LoRA's change: merged into a float weight (`merged_weight`), or beside a quantized layer as
a `LoRABranch`. Layouts: the changes come in PyTorch order (out, in * kh * kw); our weights are (out, in) for Linear
and (out, kh, kw, in) for convolutions (unet.py's `sanitize`).
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .quantize import QuantizedConv2d


@dataclass(frozen=True)
class Layer:
    """What a LoRA needs to know of a layer: its weight shape in PyTorch layout (out, in[, kh, kw]), and kind."""

    shape: tuple
    conv: bool
    quantized: bool
    bias: bool


def layer_table(module):
    """{path: Layer} of every Linear / Conv2d layer, quantized or not, of a model."""
    modules = dict(module.named_modules())
    table = {}
    for path, m in modules.items():
        if isinstance(m, LoRABranch):
            m = m.base
        elif path.rpartition(".")[0] in modules and isinstance(modules[path.rpartition(".")[0]], LoRABranch):
            continue
        if isinstance(m, nn.Linear):
            table[path] = Layer(tuple(m.weight.shape), False, False, "bias" in m)
        elif isinstance(m, nn.QuantizedLinear):
            table[path] = Layer((m.weight.shape[0], m.weight.shape[1] * 32 // m.bits), False, True, "bias" in m)
        elif isinstance(m, (nn.Conv2d, QuantizedConv2d)):
            o, kh, kw, i = m.kernel_shape if isinstance(m, QuantizedConv2d) else m.weight.shape
            table[path] = Layer((o, i, kh, kw), True, isinstance(m, QuantizedConv2d), "bias" in m)
    return table


def to_layer_layout(w, layer):
    """(n, in * kh * kw) in PyTorch order -> our layout: (n, in) for Linear, (n, kh, kw, in) for convolutions."""
    if not layer.conv:
        return w
    _, i, kh, kw = layer.shape
    return w.reshape(w.shape[0], i, kh, kw).transpose(0, 2, 3, 1)


def _inner_shape(layer):
    """A layer weight's shape after the output axis, in our layout: (in,) or (kh, kw, in)."""
    if not layer.conv:
        return layer.shape[1:]
    _, i, kh, kw = layer.shape
    return (kh, kw, i)


class LoRABranch(nn.Module):
    """A quantized layer with weight changes beside it: y = base(x) + (down(x) @ up.T) + dense(x).

    `down` is (r, in) or an (r, kh, kw, in) kernel run with the layer's stride and padding, `up` (out, r) carries the
    scales; `dense` is a full weight change (LoHa, LoKr, full deltas). The factors are private: not parameters."""

    def __init__(self, base, down, up, dense):
        super().__init__()
        self.base = base
        self._down, self._up, self._dense = down, up, dense
        self._conv = isinstance(base, QuantizedConv2d)

    def _apply(self, x, w):
        if not self._conv:
            return x @ w.T
        b = self.base
        return mx.conv2d(x, w, stride=b.stride, padding=b.padding, dilation=b.dilation, groups=b.groups)

    def __call__(self, x):
        y = self.base(x)
        if self._down is not None:
            y = y + self._apply(x, self._down) @ self._up.T
        if self._dense is not None:
            y = y + self._apply(x, self._dense)
        return y


def weight_terms(active, layer):
    """The weight changes of (scale, patch) pairs in our layout, float32, scales folded in: low-rank [(up (out, r),
    down (r, in * kh * kw))] and dense [(out, in * kh * kw)]. Only the small down factor is transposed."""
    low, dense = [], []
    for scale, patch in active:
        factors = patch.factors
        if factors is not None:
            up, down = factors
            low.append((scale * up, to_layer_layout(down, layer).reshape(down.shape[0], -1).astype(mx.float32)))
        elif patch.shape2d is not None:
            dense.append(scale * to_layer_layout(patch.delta2d(), layer).reshape(layer.shape[0], -1))
    return low, dense


def merged_weight(original, low, dense):
    """original + sum(up @ down) + sum(dense), computed in float32 (one addmm per low-rank change)."""
    w = original.reshape(original.shape[0], -1)
    w = w if w.dtype == mx.float32 else w.astype(mx.float32)
    for up, down in low:
        w = mx.addmm(w, up, down)
    for d in dense:
        w = w + d
    return w.reshape(original.shape).astype(original.dtype)


def make_branch(base, layer, active):
    """A LoRABranch for the (scale, patch) pairs with a weight change, or None if there is none."""
    low, dense = weight_terms(active, layer)
    if not low and not dense:
        return None
    dtype, shape = base.scales.dtype, (-1, *_inner_shape(layer))
    down = up = None
    if low:
        up = mx.concatenate([u for u, _ in low], axis=1).astype(dtype)  # (out, R)
        down = mx.concatenate([d for _, d in low], axis=0).reshape(shape).astype(dtype)  # (R, in) or (R, kh, kw, in)
    dense = sum(dense).reshape(shape).astype(dtype) if dense else None
    return LoRABranch(base, down, up, dense)


def get_module(root, path):
    for part in path.split("."):
        root = root[int(part)] if isinstance(root, list) else getattr(root, part)
    return root


def set_module(root, path, module):
    head, _, last = path.rpartition(".")
    parent = get_module(root, head) if head else root
    if isinstance(parent, list):
        parent[int(last)] = module
    else:
        setattr(parent, last, module)


def set_param(originals, key, module, param, merge):
    """module.param = merge(its original), keeping the original in `originals[key]`; merge None puts the original
    back. Returns the new array (to evaluate) or None."""
    original = originals.get(key)
    if merge is None:
        if original is not None:
            setattr(module, param, originals.pop(key))
        return None
    if original is None:
        original = originals[key] = getattr(module, param)
    value = merge(original)
    setattr(module, param, value)
    return value


def bias_merge(biases):
    if not biases:
        return None
    return lambda b: (b.astype(mx.float32) + sum(biases)).astype(b.dtype)

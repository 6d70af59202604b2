"""Quantization: Linear and embedding layers via mlx.nn.quantize, convolutions as QuantizedConv2d, and rebuilding
the quantized layers of a saved component from its `*.scales` keys."""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .weights import ModelLoadError

QUANTIZE_BITS = (4, 8)
QUANTIZE_GROUP_SIZES = (32, 64, 128)


class QuantizedConv2d(nn.Module):
    """A Conv2d whose (out, kh, kw, in) kernel is kept quantized as an (out, kh * kw * in) matrix, in groups along
    kh * kw * in, and dequantized for each call: the memory at rest of a quantized layer, the arithmetic of a
    float convolution. Keys as QuantizedLinear: weight (packed uint32), scales, biases, bias."""

    def __init__(self, conv: nn.Conv2d, group_size, bits):
        super().__init__()
        self.kernel_shape = tuple(conv.weight.shape)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.group_size, self.bits = group_size, bits
        flat = conv.weight.reshape(self.kernel_shape[0], -1)
        self.weight, self.scales, self.biases = mx.quantize(flat, group_size, bits)
        if "bias" in conv:
            self.bias = conv.bias

    def kernel(self, dtype=None):
        """The dequantized (out, kh, kw, in) kernel, in `dtype` (default: the scales')."""
        w = dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits, dtype=dtype)
        return w.reshape(self.kernel_shape)

    def __call__(self, x):
        y = mx.conv2d(
            x,
            self.kernel(x.dtype),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )
        return y + self.bias if "bias" in self else y


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear that, for float32 inputs on MLX's CPU backend, dequantizes its weight for the call and
    multiplies in float32 (~180 GFLOP/s on x86 where the CPU's quantized_matmul runs at ~2): the memory at rest of
    a quantized layer, a transient float copy of one layer's weight while it runs. Elsewhere quantized_matmul."""

    def __call__(self, x):
        if x.dtype != mx.float32 or mx.default_device() != mx.cpu:
            return super().__call__(x)
        w = dequantize(
            self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits, self.mode, x.dtype
        )
        return mx.addmm(self["bias"], x, w.T) if "bias" in self else x @ w.T


def dequantize(weight, scales, biases, group_size, bits, mode="affine", dtype=None):
    """mx.dequantize computed in `dtype` (default: the scales'): float32 scales give a float32 weight directly,
    4.5x faster on the CPU backend than dequantizing in float16 and casting (its float16 arithmetic is slow),
    and without float16's rounding."""
    if dtype is not None and dtype != scales.dtype:
        scales = scales.astype(dtype)
        biases = None if biases is None else biases.astype(dtype)
    return mx.dequantize(weight, scales, biases, group_size, bits, mode)


def quantize_model(model: nn.Module, bits, group_size, convolutions=False):
    """Quantizes `model` in place; returns the `quantization` entry that its config.json records.

    Quantized: Linear layers (attention and feed-forward projections, time embeddings, projections) and the
    token embedding, wherever the input width is a multiple of `group_size`; with `convolutions`, also every
    Conv2d but the model's first and last (`conv_in`, `conv_out`: the latent-space ends, few weights and the
    most sensitive) whose kh * kw * in is a multiple of `group_size` (QuantizedConv2d). Norms, biases and the
    position embedding stay float."""
    if bits not in QUANTIZE_BITS:
        raise ValueError(f"quantization bits must be one of {QUANTIZE_BITS}, got {bits!r}")
    if group_size not in QUANTIZE_GROUP_SIZES:
        raise ValueError(f"quantization group size must be one of {QUANTIZE_GROUP_SIZES}, got {group_size!r}")

    def quantizable(path, module):
        if not isinstance(module, (nn.Linear, nn.Embedding)) or path.endswith("position_embedding"):
            return False
        return module.weight.shape[-1] % group_size == 0

    _quantize_layers(model, group_size, bits, quantizable, (nn.Linear, nn.Embedding))
    if convolutions:
        _quantize_layers(
            model,
            group_size,
            bits,
            lambda path, conv: (
                path.rsplit(".", 1)[-1] not in ("conv_in", "conv_out")
                and (conv.weight.size // conv.weight.shape[0]) % group_size == 0
            ),
            (nn.Conv2d,),
        )
    return {"group_size": group_size, "bits": bits, **({"convolutions": True} if convolutions else {})}


# a layer type -> its quantized version, made from the float layer
QUANTIZED = {
    nn.Linear: QuantizedLinear.from_linear,
    nn.Embedding: nn.QuantizedEmbedding.from_embedding,
    nn.Conv2d: QuantizedConv2d,
}


def _quantize_layers(model, group_size, bits, predicate, kinds=tuple(QUANTIZED)):
    """Replaces the layers of `kinds` (keys of QUANTIZED) where predicate(path, module) by their quantized versions."""
    layers = [
        (path, QUANTIZED[next(k for k in kinds if isinstance(m, k))](m, group_size, bits))
        for path, m in model.named_modules()
        if isinstance(m, kinds) and predicate(path, m)
    ]
    if layers:
        model.update_modules(tree_unflatten(layers))


def rebuild_quantized(model: nn.Module, weights, quantization, component):
    """Makes quantized layers of the modules that have `*.scales` in `weights`, as the `quantization` entry of
    the component's config.json says, so that `load_strict` can then fill them."""
    try:
        group_size, bits = quantization["group_size"], quantization["bits"]
        _quantize_layers(model, group_size, bits, lambda path, _: f"{path}.scales" in weights)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{component}: cannot rebuild its quantized layers from {quantization!r} ({e})") from None

"""Finding model folders (local or on the Hugging Face Hub) and loading their weights strictly."""

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

# Only these files are fetched from the Hub: configs, tokenizer files and non-variant safetensors.
HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer*/*.json",
    "tokenizer*/*.txt",
    "*/diffusion_pytorch_model.safetensors",
    "*/diffusion_pytorch_model.safetensors.index.json",
    "*/diffusion_pytorch_model-*.safetensors",
    "*/model.safetensors",
    "*/model.safetensors.index.json",
    "*/model-*.safetensors",
    "mlx_sd.json",
    "*/mlx_model.safetensors",
]
# Configs and tokenizer files only: what `mlx-sd convert --config` needs besides a single-file checkpoint's weights.
CONFIG_PATTERNS = [p for p in HUB_PATTERNS if not p.endswith(".safetensors")]
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
MANIFEST = "mlx_sd.json"  # marks a folder written by `mlx-sd convert`
MLX_WEIGHTS = "mlx_model.safetensors"  # a converted component's weights, already in MLX layout
QUANTIZE_BITS = (4, 8)
QUANTIZE_GROUP_SIZES = (32, 64, 128)


class ModelLoadError(Exception):
    """A model could not be found or loaded; the message says what to do."""


def resolve_model(name_or_path, allow_patterns=HUB_PATTERNS):
    """Returns the local folder of a diffusers-format model: a local path, or a Hub repo id downloaded
    through huggingface_hub into the user's cache (the files `allow_patterns` name; HF_HUB_OFFLINE honoured)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.suffix in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{name_or_path} is a pickle checkpoint; mlx_sd never unpickles files, use a .safetensors file"
        )
    if path.exists():
        raise ModelLoadError(
            f"{name_or_path} is not a model folder or a .safetensors checkpoint; pass a diffusers-format folder"
        )
    if str(name_or_path).count("/") != 1 or str(name_or_path).startswith((".", "/", "~")):
        raise ModelLoadError(
            f"model {name_or_path!r} not found: pass a local model folder or a Hugging Face repo id (owner/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=allow_patterns))
    except Exception as e:  # network, auth, missing repo, offline cache miss
        offline = " (HF_HUB_OFFLINE is set and it is not in the cache)" if os.environ.get("HF_HUB_OFFLINE") else ""
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"could not get model {name_or_path!r} from the Hugging Face Hub{offline}: {reason}"
        ) from None


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"missing {path}: is {path.parent.parent} a diffusers-format model folder?")
    with open(path) as f:
        return json.load(f)


def read_safetensors(folder):
    """All weights of one component folder (single or sharded safetensors), as MLX arrays."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"missing component folder {folder}: is {folder.parent} a diffusers-format model folder?")
    for stem in ("diffusion_pytorch_model", "model"):
        single = folder / f"{stem}.safetensors"
        index = folder / f"{stem}.safetensors.index.json"
        if single.is_file():
            return _load_file(single)
        if index.is_file():
            shards = sorted(set(read_json(index)["weight_map"].values()))
            weights = {}
            for shard in shards:
                weights.update(_load_file(folder / shard))
            return weights
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return _load_file(files[0])
    if any(folder.glob(f"*{s}") for s in PICKLE_SUFFIXES):
        raise ModelLoadError(
            f"{folder} holds only pickle weights; mlx_sd loads safetensors only (save the model with safe_serialization=True)"
        )
    raise ModelLoadError(f"no safetensors weights found in {folder}")


def _load_file(path):
    try:
        return mx.load(str(path))
    except Exception as e:
        raise ModelLoadError(f"could not read {path}: not a valid safetensors file ({e})") from None


def load_strict(model: nn.Module, weights, component, dtype=None):
    """Loads `weights` into `model`: every key used, every parameter filled, every shape equal."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_sample(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_sample(unexpected)}")
        raise ModelLoadError(f"{component} weights do not match the model: " + "; ".join(parts))
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise ModelLoadError(
                f"{component} weight {key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    return model


def _sample(keys, n=5):
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def is_converted(folder):
    """True for a folder written by `mlx-sd convert` (weights in MLX layout, possibly quantized)."""
    return (Path(folder) / MANIFEST).is_file()


def read_converted(folder):
    """The weights of one component folder of a converted model, as saved (MLX layout, no sanitize)."""
    path = Path(folder) / MLX_WEIGHTS
    if not path.is_file():
        raise ModelLoadError(f"missing {path}: the converted model folder is incomplete, convert it again")
    return _load_file(path)


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

    def __call__(self, x):
        w = mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits)
        y = mx.conv2d(x, w.reshape(self.kernel_shape).astype(x.dtype), stride=self.stride, padding=self.padding,
                      dilation=self.dilation, groups=self.groups)
        return y + self.bias if "bias" in self else y


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

    nn.quantize(model, group_size, bits, class_predicate=quantizable)
    if convolutions:
        _quantize_convolutions(model, group_size, bits, lambda path, conv: (
            path.rsplit(".", 1)[-1] not in ("conv_in", "conv_out") and (conv.weight.size // conv.weight.shape[0]) % group_size == 0))
    return {"group_size": group_size, "bits": bits, **({"convolutions": True} if convolutions else {})}


def _quantize_convolutions(model, group_size, bits, predicate):
    convs = [(path, QuantizedConv2d(m, group_size, bits)) for path, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and predicate(path, m)]
    if convs:
        model.update_modules(tree_unflatten(convs))


def rebuild_quantized(model: nn.Module, weights, quantization, component):
    """Makes quantized layers of the modules that have `*.scales` in `weights`, as the `quantization` entry of
    the component's config.json says, so that `load_strict` can then fill them."""
    try:
        group_size, bits = quantization["group_size"], quantization["bits"]
        nn.quantize(model, group_size, bits, class_predicate=lambda path, m: (
            isinstance(m, (nn.Linear, nn.Embedding)) and f"{path}.scales" in weights))
        _quantize_convolutions(model, group_size, bits, lambda path, _: f"{path}.scales" in weights)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{component}: cannot rebuild its quantized layers from {quantization!r} ({e})") from None

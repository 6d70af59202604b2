"""Reading weights (safetensors only, never pickle) and loading them strictly into a model."""

import json
import math
import struct
from collections import namedtuple
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
MANIFEST = "mlx_sd.json"  # marks a folder written by `mlx-sd convert`
MLX_WEIGHTS = "mlx_model.safetensors"  # a converted component's weights, already in MLX layout
MAX_JSON_BYTES = 64 * 2**20  # config, index and tokenizer files are far smaller (the largest, vocab.json: 1 MB)
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2}
DTYPE_BYTES |= {"I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
Tensor = namedtuple("Tensor", "shape dtype")


class ModelLoadError(Exception):
    """A model could not be found or loaded; the message says what to do."""


def is_pickle(path):
    """True for a pickle checkpoint's name (.bin, .ckpt, .pt, .pth, any case): such files are never opened."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(path):
    """Raises ModelLoadError for a pickle checkpoint, without opening it."""
    if is_pickle(path):
        raise ModelLoadError(f"{path} is a pickle checkpoint; mlx_sd never unpickles files: use a .safetensors file")


def read_json(path):
    """A JSON object from a model folder's file, or ModelLoadError naming the file: missing, too large, not
    UTF-8 JSON, or not an object."""
    path = Path(path)
    if not path.is_file():
        top = path.name in ("model_index.json", MANIFEST)  # these sit in the model folder itself
        raise ModelLoadError(
            f"missing {path}: is {path.parent if top else path.parent.parent} a diffusers-format model folder?"
        )
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ModelLoadError(f"{path} is {path.stat().st_size} bytes, too large for a config file")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ModelLoadError(f"{path} is not valid JSON: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        raise ModelLoadError(f"{path} holds {kind}, expected a JSON object ({{...}})")
    return value


def safetensors_header(path):
    """name -> Tensor(shape, dtype) from a .safetensors file's header, without reading the weights. Checked:
    a bounded JSON header, every tensor's byte range matching its shape and dtype, and all of them inside the
    file (a truncated file is refused); ModelLoadError naming the file otherwise."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > min(MAX_HEADER_BYTES, size - 8):
            raise ModelLoadError(f"{path} is not a valid safetensors file: no valid header size in its first 8 bytes")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):
            raise ModelLoadError(f"{path} is not a valid safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a valid safetensors file: its header is not a JSON object")
    tensors, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape, dtype, begin, stop = _check_entry(path, name, entry)
        tensors[name] = Tensor(shape, dtype)
        end = max(end, stop)
    if end > size - 8 - length:
        raise ModelLoadError(
            f"{path} is truncated (not a valid safetensors file): its tensors need {end} bytes of data, "
            f"the file holds {size - 8 - length}"
        )
    return tensors


def _check_entry(path, name, entry):
    """(shape, dtype, begin, end) of one header entry, checked."""
    entry = entry if isinstance(entry, dict) else {}
    shape, dtype, offsets = entry.get("shape"), entry.get("dtype"), entry.get("data_offsets")
    if not (dtype in DTYPE_BYTES and _naturals(shape) and len(shape) <= 8 and _naturals(offsets) and len(offsets) == 2):
        raise ModelLoadError(f"{path} is not a valid safetensors file: bad header entry {str(name)[:80]!r}")
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise ModelLoadError(
            f"{path} is not a valid safetensors file: tensor {str(name)[:80]!r} has {offsets[1] - offsets[0]} "
            f"bytes, its shape {shape} and dtype {dtype} need {math.prod(shape) * DTYPE_BYTES[dtype]}"
        )
    return tuple(shape), dtype, offsets[0], offsets[1]


def _naturals(value):
    return isinstance(value, list) and all(type(i) is int and i >= 0 for i in value)


def read_safetensors(folder, variant=None):
    """All weights of one component folder (single or sharded safetensors), as MLX arrays (see weight_files)."""
    weights = {}
    for path in weight_files(folder, variant):
        weights.update(_load_file(path))
    return weights


def read_safetensors_headers(folder, variant=None):
    """name -> Tensor(shape, dtype) of the weights read_safetensors would read, without reading them."""
    tensors = {}
    for path in weight_files(folder, variant):
        tensors.update(safetensors_header(path))
    return tensors


def weight_files(folder, variant=None):
    """The safetensors files holding one component's weights, as diffusers picks them: with `variant` ("fp16")
    its `{stem}.{variant}.safetensors` (or sharded index) where the folder has one, else the plain files; a
    folder holding a single weights file (a variant one included) gives that file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"missing component folder {folder}: is {folder.parent} a diffusers-format model folder?")
    for infix in (f".{variant}", "") if variant else ("",):
        for stem in ("diffusion_pytorch_model", "model"):
            single = folder / f"{stem}{infix}.safetensors"
            index = folder / f"{stem}.safetensors.index{infix}.json"
            if single.is_file():
                return [single]
            if index.is_file():
                return _shards(index)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files
    if files:
        names = ", ".join(f.name for f in files[:4])
        raise ModelLoadError(f"{folder} holds several weight files ({names}): choose one with variant=")
    if any(is_pickle(f) for f in folder.iterdir()):
        raise ModelLoadError(
            f"{folder} holds only pickle weights; mlx_sd loads safetensors only "
            "(save the model with safe_serialization=True)"
        )
    raise ModelLoadError(f"no safetensors weights found in {folder}")


def _shards(index):
    """The shard files a sharded checkpoint's index names (plain file names in its folder)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(f"{index} has no weight_map of tensor names to shard files")
    shards = sorted(set(weight_map.values()))
    if any(Path(shard).name != shard or shard in ("", ".", "..") for shard in shards):
        raise ModelLoadError(f"{index} names a shard outside its folder")
    return [index.parent / shard for shard in shards]


def _load_file(path):
    safetensors_header(path)  # a bounded, consistent header and every tensor's bytes present
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
                f"{component} weight {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    # in row-major order: a kernel that sanitize transposed OIHW -> OHWI is otherwise a strided view, which MLX's
    # convolution copies at every call (one SD 2.1-base UNet step at 256 on the CPU: 7.4 s against 5.0 s)
    weights = {k: mx.contiguous(v) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    return model


def evaluate_one_by_one(model: nn.Module):
    """Evaluates the model's parameters one array at a time: with no other reference left to the source arrays,
    each is freed once converted (or copied to row-major order), so that loading holds one array more than
    the weights, not a second copy of them."""
    for _, value in tree_flatten(model.parameters()):
        mx.eval(value)


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

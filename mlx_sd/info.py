"""Describing what a path holds: a model folder, a single-file checkpoint, or a PNG made by mlx_sd / A1111."""

import json
import struct
from collections import namedtuple
from pathlib import Path

from PIL import Image

from .infotext import parse_a1111_parameters
from .weights import MANIFEST

Tensor = namedtuple("Tensor", "shape dtype")


def safetensors_header(path):
    """name -> Tensor(shape, dtype) from a .safetensors header, without reading the weights."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {k: Tensor(tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}


def describe(path):
    """Lines describing `path`: family, components (parameters, dtype, quantization, size), or PNG parameters."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    if path.is_dir():
        return _describe_folder(path)
    if path.suffix.lower() == ".png":
        return _describe_png(path)
    if path.suffix.lower() == ".safetensors":
        return _describe_single_file(path)
    raise ValueError(f"{path} is not a model folder, a .safetensors checkpoint or a PNG")


def _describe_png(path):
    with Image.open(path) as image:
        text = image.text.get("parameters") if hasattr(image, "text") else None
        size = image.size
    if not text:
        return [f"{path}: PNG {size[0]}x{size[1]} without generation parameters"]
    lines = [f"{path}: PNG {size[0]}x{size[1]}"]
    lines += [f"  {key}: {value}" for key, value in parse_a1111_parameters(text).items()]
    return lines


def _describe_single_file(path):
    from .single_file import detect_family

    tensors = safetensors_header(path)
    try:
        family = detect_family(tensors)
    except ValueError as e:
        family = f"unrecognised ({e})"
    return [
        f"{path}: single-file checkpoint (original layout), family {family}",
        f"  {_count(tensors)} parameters, {_dtypes(tensors)}, {_size(path)}",
    ]


def _describe_folder(path):
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{path} has no model_index.json: not a model folder")
    index = json.loads(index_file.read_text())
    lines = [f"{path}: {index.get('_class_name', 'unknown pipeline')}"]
    manifest = path / MANIFEST
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        lines.append("  converted by mlx_sd: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    for component in sorted(p for p in path.iterdir() if p.is_dir()):
        files = sorted(component.glob("*.safetensors"))
        if not files:
            continue
        tensors = {}
        for f in files:
            tensors.update(safetensors_header(f))
        config_file = component / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        quantized = config.get("quantization")
        q = f", quantized {quantized['bits']}-bit (group {quantized['group_size']})" if quantized else ""
        q += " with convolutions" if quantized and quantized.get("convolutions") else ""
        lines.append(f"  {component.name}: {_count(tensors)} parameters, {_dtypes(tensors)}{q}, {_size(*files)}")
    return lines


def _count(tensors):
    n = 0
    for t in tensors.values():
        size = 1
        for d in t.shape:
            size *= d
        n += size
    return f"{n / 1e6:.1f}M"


def _dtypes(tensors):
    return "/".join(sorted({t.dtype for t in tensors.values()}))


def _size(*files):
    return f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MiB"

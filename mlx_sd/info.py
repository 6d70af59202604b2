"""Describing what a path holds: a model folder, a single-file checkpoint, or a PNG made by mlx_sd / A1111."""

import unicodedata
from pathlib import Path

from .infotext import parse_a1111_parameters
from .png import read_parameters
from .weights import MANIFEST, ModelLoadError, read_json, safetensors_header


def describe(path):
    """Lines describing `path`: family, components (parameters, dtype, quantization, size), or PNG parameters.

    Control characters (terminal escape sequences from a crafted PNG or file name) are shown escaped. A file
    that is not what its name says, or weights whose bytes are not all present, is a one-line ValueError naming
    the file."""
    try:
        return [printable(line) for line in _describe(Path(path))]
    except (ValueError, ModelLoadError) as e:
        raise ValueError(printable(str(e))) from None


def printable(text):
    """`text` with every control and format character (C0, DEL, C1, bidirectional overrides, ...; not the
    zero-width joiners of emoji) shown as an escape: \\x1b."""
    return "".join(
        c if unicodedata.category(c) not in ("Cc", "Cf") or c in "\u200c\u200d" else ascii(c)[1:-1] for c in text
    )


def _describe(path):
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
    text, size = read_parameters(path)
    if not text:
        return [f"{path}: PNG {size[0]}x{size[1]} without generation parameters"]
    lines = [f"{path}: PNG {size[0]}x{size[1]}"]
    lines += [f"  {key}: {value}" for key, value in parse_a1111_parameters(text).items()]
    return lines


def _describe_single_file(path):
    """A single-file checkpoint (SD or ControlNet), else a LoRA or textual-inversion embedding, else unrecognised."""
    from .adapter_files import describe_adapter
    from .single_file import detect_family

    tensors = safetensors_header(path)
    try:
        family = detect_family(tensors)
    except ValueError as e:
        try:
            return [f"{path}:", *(f"  {line}" for line in describe_adapter(path))]
        except (ModelLoadError, ValueError):
            family = f"unrecognised ({e})"
    return [
        f"{path}: single-file checkpoint (original layout), family {family}",
        f"  {_count(tensors)} parameters, {_dtypes(tensors)}, {_size(path)}",
    ]


def _describe_folder(path):
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{path} has no model_index.json: not a model folder")
    index = read_json(index_file)
    lines = [f"{path}: {index.get('_class_name', 'unknown pipeline')}"]
    manifest = path / MANIFEST
    if manifest.is_file():
        info = read_json(manifest)
        lines.append("  converted by mlx_sd: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    for component in sorted(p for p in path.iterdir() if p.is_dir()):
        files = sorted(component.glob("*.safetensors"))
        if not files:
            continue
        tensors = {}
        for f in files:
            tensors.update(safetensors_header(f))
        config_file = component / "config.json"
        config = read_json(config_file) if config_file.is_file() else {}
        quantized = config.get("quantization")
        quantized = quantized if isinstance(quantized, dict) else None
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

"""Writing PNGs atomically, with the generation parameters in A1111's `parameters` text chunk."""

import os
import tempfile
from pathlib import Path

from PIL.PngImagePlugin import PngInfo


def a1111_parameters(p):
    """The A1111 `parameters` text: prompt, `Negative prompt:` line, then `Key: value` settings."""
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    settings = [
        f"Steps: {p['steps']}",
        f"Sampler: {p['sampler']}",
        f"CFG scale: {p['guidance_scale']:g}",
        f"Seed: {p['seed']}",
        f"Size: {p['width']}x{p['height']}",
        f"Model: {p['model']}",
    ]
    if p.get("clip_skip"):
        settings.append(f"Clip skip: {p['clip_skip']}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def save_png(image, path, parameters=None):
    """Saves `image` to `path` through a temporary file in the same folder, so no partial file is left."""
    path = Path(path)
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", a1111_parameters(parameters))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

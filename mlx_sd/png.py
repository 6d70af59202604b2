"""Writing PNGs atomically, with the generation parameters in A1111's `parameters` text chunk."""

import io
import os
import tempfile
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def save_png(image, path, infotext=None):
    """Saves `image` to `path` through a temporary file in the same folder, so no partial file is left;
    `infotext` (A1111's `parameters` text) goes into a text chunk."""
    path = Path(path)
    info = PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_png_parameters(path):
    """The A1111 `parameters` text of a PNG; ValueError naming the file when it has none or cannot be read."""
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get("parameters")
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not text:
        raise ValueError(f"{path} has no generation parameters")
    return text


def png_bytes(image, infotext=None):
    """`image` encoded as PNG in memory, with `infotext` in the `parameters` text chunk as save_png writes it."""
    info = PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()

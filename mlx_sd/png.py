"""Writing PNGs safely, with the generation parameters in A1111's `parameters` text chunk; reading them back."""

import io
import os
import secrets
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from .images import open_image
from .outputs import claim


def save_png(image, path, infotext=None, overwrite=False):
    """Saves `image` as `path`, or as the first free numbered name (`out-1.png`, ...) if `path` exists, and
    returns the path written; `infotext` (A1111's `parameters` text) goes into a text chunk. The PNG is written to
    a temporary file in the same folder and only then given its name (outputs.claim), so no partial file is ever
    visible and no existing file is replaced unless `overwrite` (and then only one the user may write). The file
    gets the modes `open()` would give."""
    path = Path(path)
    info = PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    tmp, fd = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        return claim(tmp, path, overwrite)
    finally:  # after a claim by link, or after an error or an interrupt
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _create_temporary(path):
    """(name, fd) of a new hidden file next to `path`, created exclusively with mode 0o666 less the umask."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name[:200]}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def read_parameters(path):
    """(A1111 `parameters` text or None, (width, height)) of a PNG; ValueError naming the file if it is
    unreadable, truncated, oversized or not a PNG."""
    image = open_image(path)
    if image.format != "PNG":
        raise ValueError(f"{path} is a {image.format} image, not a PNG")
    return getattr(image, "text", {}).get("parameters"), image.size


def read_png_parameters(path):
    """The A1111 `parameters` text of a PNG; ValueError naming the file when it has none or cannot be read."""
    text, _ = read_parameters(path)
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

"""Writing PNGs atomically, with the generation parameters in A1111's `parameters` text chunk."""

import os
import tempfile
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from .infotext import a1111_parameters


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

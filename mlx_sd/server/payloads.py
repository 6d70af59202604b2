"""What requests carry and responses return: errors with an HTTP status, JSON bodies, base64 and uploaded images
(bounded before they are decoded), and encoded output images."""

import base64
import binascii
import io
import json

from PIL import Image, UnidentifiedImageError

from ..png import png_bytes
from ..settings import MAX_PIXELS

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what Pillow may open from a request
OUTPUT_FORMATS = ("png", "jpeg", "webp")


class RequestError(Exception):
    """A request the server refuses: `status` None for a bad value (A1111 422, OpenAI 400), else the HTTP status.
    `param` names the request field when there is one."""

    def __init__(self, message, param=None, status=None, code=None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


class Cancelled(Exception):
    """A task whose client went away, or that the server dropped while stopping."""


class BodyTooLarge(Exception):
    """Raised while reading a request body that exceeds the server's limit (413)."""


def parse_json_object(body, api_field="body"):
    """The JSON object in `body` (bytes); RequestError for malformed JSON or anything but an object."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(f"{api_field}: malformed JSON ({e})") from None
    if not isinstance(value, dict):
        raise RequestError(f"{api_field}: a JSON object is expected, got {type(value).__name__}")
    return value


def expect(value, kind, field, optional=True):
    """`value` if it is of type `kind` (or None when optional); RequestError naming `field` otherwise."""
    if value is None and optional:
        return None
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RequestError(f"{field} must be of type {names}, got {_show(value)}", field)
    return value


def _show(value):
    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return type(value).__name__


def decode_base64_image(text, field):
    """A PIL image from base64 (optionally a `data:image/...;base64,` URL); RequestError naming `field`."""
    if not isinstance(text, str):
        raise RequestError(f"{field} must be a base64 string", field)
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field} is not valid base64", field) from None
    return open_image(data, field)


def open_image(data, field):
    """A loaded PIL image from encoded bytes: PNG, JPEG or WebP of at most MAX_PIXELS pixels (413 beyond)."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(f"{field} is not a PNG, JPEG or WebP image", field) from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise RequestError(
            f"{field} is {width}x{height}: more than {MAX_PIXELS:,} pixels", field, status=413, code="image_too_large"
        )
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(f"{field}: cannot decode the image ({e})", field) from None
    return image


def encode_image(image, infotext=None, output_format="png", quality=None):
    """Base64 of `image` as PNG (with A1111's `parameters` chunk), JPEG or WebP (`quality` 0-100)."""
    if output_format == "png":
        data = png_bytes(image, infotext)
    else:
        buffer = io.BytesIO()
        image.save(buffer, format=output_format.upper(), quality=100 if quality is None else quality)
        data = buffer.getvalue()
    return base64.b64encode(data).decode("ascii")


# OpenAI's error `type` by status
OPENAI_ERROR_TYPES = {
    401: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


def is_openai(path):
    """Requests under /v1/ get OpenAI-shaped errors; the others A1111's (FastAPI's `detail`)."""
    return path.startswith("/v1/")


def error_body(path, status, message, param=None, code=None):
    """The JSON error body for a request path: OpenAI's `error` object, or A1111's `detail`."""
    if is_openai(path):
        kind = OPENAI_ERROR_TYPES.get(status, "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"detail": message}

"""OpenAI's images API (`/v1/images/generations`, `/v1/images/edits`, `/v1/models`), as the `openai` client with a
custom base_url sends it. Images come back as `b64_json` only (no hosted URLs). Besides OpenAI's fields, requests
may carry mlx_sd settings (the client's `extra_body`): negative_prompt, seed, steps, guidance_scale, sampler, and
strength for edits. Bad values answer 400 with an OpenAI `error` object whose `param` names the field."""

import re
import time

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..settings import GenerationSettings
from .generation import GenerationRequest, run_generation
from .payloads import OUTPUT_FORMATS, RequestError, encode_image, expect, open_image, parse_json_object
from .worker import Task, run_in_worker

# OpenAI's own model names mean "the model this server has loaded" (clients such as LangChain send one by default).
OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
# mlx_sd settings a request may add: field -> type
EXTRA_SETTINGS = {"negative_prompt": str, "seed": int, "steps": int, "guidance_scale": float, "sampler": str}
SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
MAX_FORM_FILES, MAX_FORM_FIELDS = 4, 64


def value(fields, key, kind, form, default=None):
    """fields[key] as `kind` (`default` when left out or null); a multipart form's values are strings, parsed."""
    raw = fields.get(key)
    raw = default if raw is None else raw
    if form and isinstance(raw, str) and kind is not str:
        try:
            raw = float(raw) if kind is float else int(raw)
        except ValueError:
            raise RequestError(
                f"{key} must be {'a number' if kind is float else 'an integer'}, got {raw!r}", key
            ) from None
    return expect(raw, (int, float) if kind is float else kind, key)


def image_request(server, fields, form, edit=None):
    """(GenerationRequest, output format, quality) from a generations body or an edits form; `edit`: the image
    settings of an edit."""
    prompt = fields.get("prompt")
    if prompt is None:
        raise RequestError("prompt is required", "prompt", code="missing_required_parameter")
    if fields.get("stream") not in (None, False, "false"):
        raise RequestError("stream: streaming is not supported", "stream")
    if value(fields, "response_format", str, form, "b64_json") != "b64_json":
        raise RequestError("response_format: only b64_json is supported (the server hosts no URLs)", "response_format")
    output_format = value(fields, "output_format", str, form, "png")
    if output_format not in OUTPUT_FORMATS:
        raise RequestError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}", "output_format")
    quality = value(fields, "output_compression", int, form)
    if quality is not None and not 0 <= quality <= 100:
        raise RequestError("output_compression must be between 0 and 100", "output_compression")
    width, height = size(value(fields, "size", str, form, "auto"))
    extra = {key: value(fields, key, kind, form) for key, kind in EXTRA_SETTINGS.items() if key in fields}
    settings = GenerationSettings(
        prompt=prompt, width=width, height=height, num_images=value(fields, "n", int, form, 1), **extra, **(edit or {})
    )
    model = value(fields, "model", str, form)
    entry = None if model is None or model in OPENAI_MODELS else server.catalog.find(model, "model")
    return GenerationRequest(settings.validate(), 1, entry, "model"), output_format, quality


def size(text):
    """(width, height) of OpenAI's "WIDTHxHEIGHT"; (None, None) for "auto": the model's (or the image's) size."""
    if text == "auto":
        return None, None
    match = SIZE.fullmatch(text)
    if match is None:
        raise RequestError(f"size must be WIDTHxHEIGHT (e.g. 512x512) or auto, got {text[:40]!r}", "size")
    return int(match[1]), int(match[2])


def images_response(result, output_format, quality):
    s = result.settings
    data = [
        {"b64_json": encode_image(image, text, output_format, quality)}
        for image, text in zip(result.images, result.infotexts)
    ]
    return {"created": int(time.time()), "data": data, "output_format": output_format, "size": f"{s.width}x{s.height}"}


async def run(request, generation, output_format, quality):
    task = Task(lambda worker, task: run_generation(worker, task, generation))
    result = await run_in_worker(request, request.app.state.server.worker, task)
    return JSONResponse(await run_in_threadpool(images_response, result, output_format, quality))


async def generations(request):
    body = parse_json_object(await request.body())
    return await run(request, *image_request(request.app.state.server, body, form=False))


async def edits(request):
    """An edit: the image, repainted where the mask is fully transparent (OpenAI's convention; without a mask, where
    the image itself is), or image-to-image at `strength` when nothing is transparent."""
    async with request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS) as form:
        image = await upload(form, "image", required=True)
        mask = await upload(form, "mask")
        edit = {"image": image.convert("RGB"), "mask": edit_mask(image, mask)}
        edit["strength"] = value(form, "strength", float, True)
        generation, output_format, quality = image_request(request.app.state.server, form, True, edit)
    return await run(request, generation, output_format, quality)


async def upload(form, field, required=False):
    """The image uploaded as `field` (the openai client sends a list as `field[]`); one at most."""
    files = form.getlist(field) + form.getlist(f"{field}[]")
    if not files:
        if required:
            raise RequestError(f"{field} is required", field, code="missing_required_parameter")
        return None
    if len(files) > 1 or not isinstance(files[0], UploadFile):
        raise RequestError(f"{field} must be one uploaded image file", field)
    return open_image(await files[0].read(), field)


def edit_mask(image, mask):
    """Our mask (white = repaint) from OpenAI's: fully transparent pixels of the mask (or of the image) are edited.
    None when the image has nothing transparent and no mask is given."""
    if mask is not None:
        if mask.size != image.size:
            raise RequestError(f"mask is {mask.width}x{mask.height}, the image {image.width}x{image.height}", "mask")
        if "A" not in mask.getbands():
            raise RequestError(
                "mask must have an alpha channel: fully transparent pixels mark the area to edit", "mask"
            )
        return transparent(mask)
    if "A" in image.getbands() or "transparency" in image.info:
        repaint = transparent(image.convert("RGBA"))
        return repaint if repaint.getextrema()[1] else None
    return None


def transparent(image):
    """White where `image` is fully transparent, black elsewhere."""
    return image.getchannel("A").point(lambda a: 255 if a == 0 else 0).convert("L")


async def models(request):
    entries = request.app.state.server.catalog.entries()
    data = [{"id": e.title, "object": "model", "created": 0, "owned_by": "mlx_sd"} for e in entries]
    return JSONResponse({"object": "list", "data": data})


ROUTES = [
    Route("/v1/images/generations", generations, methods=["POST"]),
    Route("/v1/images/edits", edits, methods=["POST"]),
    Route("/v1/models", models),
]

"""AUTOMATIC1111's web UI API (`/sdapi/v1/...`), as its clients (webuiapi, Open WebUI, SillyTavern, Krita and
Photoshop plugins) use it. Request and response fields follow A1111's modules/api/api.py and models.py; fields left
out take the model's defaults. Bad values answer 422 with a `detail` naming the field."""

import json
import time

from PIL import ImageOps
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.routing import Route

from .. import __version__
from ..schedulers import SAMPLERS, SCHEDULES, a1111_names
from ..settings import MAX_IMAGES, GenerationSettings, check_int
from .catalog import lora_names
from .generation import GenerationRequest, run_generation
from .payloads import RequestError, decode_base64_image, encode_image, expect, parse_json_object
from .worker import WATCH_SECONDS, Task, run_in_worker

# Fields whose A1111 features mlx_sd lacks: refused unless empty / off (clients send them off by default).
UNSUPPORTED = ("enable_hr", "restore_faces", "tiling", "subseed_strength", "styles", "script_name", "alwayson_scripts")
INPAINT_DEFAULTS = {"denoising_strength": 0.75, "mask_blur": 4}  # A1111's API defaults


def field(body, key, default):
    """body[key], or `default` when it is left out or null (pydantic's defaults in A1111)."""
    value = body.get(key)
    return default if value is None else value


def generation_request(server, body, img2img):
    """A GenerationRequest from a txt2img / img2img body; RequestError or SettingsError naming a bad field."""
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False, 0, "", [], {}):
            raise RequestError(f"{key}: this server does not support it (leave it out or off)", key)
    override = expect(body.get("override_settings"), dict, "override_settings") or {}
    expect(body.get("send_images"), bool, "send_images")
    batch_size, n_iter = field(body, "batch_size", 1), field(body, "n_iter", 1)
    check_int("batch_size", batch_size, 1, MAX_IMAGES)
    check_int("n_iter", n_iter, 1, MAX_IMAGES // batch_size)
    negative = body.get("negative_prompt")
    settings = GenerationSettings(
        prompt=field(body, "prompt", ""),
        negative_prompt=None if negative == "" else negative,  # A1111 encodes no negative prompt as SDXL's zeros
        width=body.get("width"),
        height=body.get("height"),
        steps=body.get("steps"),
        guidance_scale=body.get("cfg_scale"),
        sampler=expect(body.get("sampler_name") or body.get("sampler_index"), str, "sampler_name"),
        schedule=expect(body.get("scheduler"), str, "scheduler"),  # "Karras", ...; "Automatic": the sampler's own
        seed=field(body, "seed", -1),
        num_images=batch_size,
        clip_skip=clip_skip(override.get("CLIP_stop_at_last_layers", server.clip_skip)),
    )
    if img2img:
        settings = settings.replace(**image_settings(body))
    model = override.get("sd_model_checkpoint")
    if model is not None:
        model = server.catalog.find(model, "override_settings.sd_model_checkpoint")
    return GenerationRequest(settings.validate(), n_iter, model, "override_settings.sd_model_checkpoint")


def clip_skip(value):
    """A1111's CLIP_stop_at_last_layers: 1 (the last layer) is no clip skip."""
    return None if value is None or (type(value) is int and value == 1) else value


def image_settings(body):
    """image / strength / mask settings of an img2img body: one init image, an optional mask (white = repaint)."""
    images = expect(body.get("init_images"), list, "init_images")
    if not images or len(images) != 1:
        raise RequestError("init_images: give exactly one base64 image", "init_images")
    if field(body, "resize_mode", 0) != 0:
        raise RequestError("resize_mode: only 0 (just resize) is supported", "resize_mode")
    fields = {"image": decode_base64_image(images[0], "init_images")}
    fields["strength"] = field(body, "denoising_strength", INPAINT_DEFAULTS["denoising_strength"])
    if body.get("mask"):
        mask = decode_base64_image(body["mask"], "mask")
        if expect(body.get("inpainting_mask_invert"), (bool, int), "inpainting_mask_invert"):
            mask = ImageOps.invert(mask.convert("L"))
        fields.update(mask=mask, mask_blur=field(body, "mask_blur", INPAINT_DEFAULTS["mask_blur"]))
    return fields


def info(result):
    """A1111's `info` (processing.Processed.js()) for a GenerationResult."""
    s, n = result.settings, len(result.images)
    return {
        "prompt": result.prompt,
        "all_prompts": [result.prompt] * n,
        "negative_prompt": s.negative_prompt or "",
        "all_negative_prompts": [s.negative_prompt or ""] * n,
        "seed": result.seeds[0],
        "all_seeds": result.seeds,
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": s.width,
        "height": s.height,
        "sampler_name": a1111_names(s.sampler, s.schedule)[0],
        "scheduler": a1111_names(s.sampler, s.schedule)[1] or "Automatic",
        "cfg_scale": s.guidance_scale,
        "steps": s.steps,
        "batch_size": s.num_images,
        "restore_faces": False,
        "sd_model_name": result.model,
        "sd_model_hash": None,
        "denoising_strength": s.strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": result.infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": s.clip_skip or 1,
        "interrupted": result.interrupted,
        "version": f"mlx_sd {__version__}",
    }


def generation_response(result, body):
    """images (base64 PNGs with their infotext), parameters (the request, without its images), info (a string)."""
    images = []
    if body.get("send_images") is not False:
        images = [encode_image(image, text) for image, text in zip(result.images, result.infotexts)]
    parameters = dict(body)
    if "init_images" in body and not body.get("include_init_images"):
        parameters.update(init_images=None, mask=None)
    return {"images": images, "parameters": parameters, "info": json.dumps(info(result))}


async def read_json(request):
    return parse_json_object(await request.body())


async def generate(request, img2img):
    server = request.app.state.server
    body = await read_json(request)
    task_id = expect(body.get("force_task_id"), str, "force_task_id")
    generation = generation_request(server, body, img2img)
    task = Task(lambda worker, task: run_generation(worker, task, generation), task_id and task_id[:100])
    result = await run_in_worker(request, server.worker, task)
    return JSONResponse(await run_in_threadpool(generation_response, result, body))


async def txt2img(request):
    return await generate(request, img2img=False)


async def img2img(request):
    return await generate(request, img2img=True)


async def progress(request):
    """A1111's progress: the running task's share done, ETA, state, and a preview of its latest step."""
    worker = request.app.state.server.worker
    skip = request.query_params.get("skip_current_image", "false").lower() in ("true", "1")
    if not skip:
        worker.watched_until = time.monotonic() + WATCH_SECONDS
    task, queued = worker.current, worker.queued()
    task = task if task is not None and task.started is not None else None
    body = {"progress": 0.0, "eta_relative": 0.0, "state": state(task, queued), "current_image": None}
    body.update(textinfo=None, current_task=None)
    if task is not None:
        done, elapsed = task.progress, time.time() - task.started
        body.update(progress=done, eta_relative=elapsed / done - elapsed if done > 0 else 0.0, current_task=task.id)
        body["textinfo"] = f"step {task.step} of {task.steps}" if task.steps else None
        if not skip and task.preview is not None:
            body["current_image"] = await run_in_threadpool(encode_image, task.preview)
    return JSONResponse(body)


def state(task, queued):
    """A1111's shared.state.dict(), plus `queued`: the requests waiting behind the running one."""
    return {
        "skipped": False,
        "interrupted": task is not None and task.interrupted.is_set(),
        "stopping_generation": False,
        "job": "" if task is None else task.id,
        "job_count": 0 if task is None else task.batches,
        "job_timestamp": "0" if task is None else time.strftime("%Y%m%d%H%M%S", time.localtime(task.started)),
        "job_no": 0 if task is None else task.batch,
        "sampling_step": 0 if task is None else task.step,
        "sampling_steps": 0 if task is None else task.steps,
        "queued": queued,
    }


async def interrupt(request):
    request.app.state.server.worker.interrupt()
    return JSONResponse({})


async def options(request):
    """GET: the options clients read; POST: `sd_model_checkpoint` switches the model (queued like a generation),
    `CLIP_stop_at_last_layers` sets the default clip skip; other A1111 options are accepted and ignored."""
    server = request.app.state.server
    if request.method == "POST":
        body = await read_json(request)
        skip = body.get("CLIP_stop_at_last_layers", server.clip_skip or 1)
        GenerationSettings(clip_skip=skip).validate()
        if body.get("sd_model_checkpoint") is not None:
            entry = server.catalog.find(body["sd_model_checkpoint"], "sd_model_checkpoint")
            task = Task(lambda worker, _: worker.load(entry, "sd_model_checkpoint"))
            await run_in_worker(request, server.worker, task)
        server.clip_skip = clip_skip(skip)
        return JSONResponse(None)
    model = server.worker.model
    return JSONResponse(
        {
            "sd_model_checkpoint": None if model is None else model.title,
            "sd_checkpoint_hash": None,
            "CLIP_stop_at_last_layers": server.clip_skip or 1,
            "samples_format": "png",
        }
    )


async def sd_models(request):
    entries = request.app.state.server.catalog.entries()
    return JSONResponse(
        [
            {
                "title": e.title,
                "model_name": e.model_name,
                "hash": None,
                "sha256": None,
                "filename": e.title,
                "config": None,
            }
            for e in entries
        ]
    )


async def samplers(request):
    """The samplers (A1111 1.9+ lists schedules separately, see schedulers)."""
    return JSONResponse([{"name": s.display, "aliases": [name], "options": {}} for name, s in SAMPLERS.items()])


async def schedulers(request):
    """A1111 1.9+'s schedule types: "Automatic" (the sampler's own) and ours."""
    rows = [{"name": "automatic", "label": "Automatic", "aliases": None}]
    rows += [{"name": name, "label": s.label, "aliases": None} for name, s in SCHEDULES.items()]
    return JSONResponse(rows)


async def loras(request):
    names = lora_names(request.app.state.server.config.lora_dir)
    return JSONResponse([{"name": n, "alias": n, "path": f"{n}.safetensors", "metadata": {}} for n in names])


async def scripts(request):
    """No scripts (webuiapi asks when it starts)."""
    return JSONResponse({"txt2img": [], "img2img": []})


ROUTES = [
    Route("/sdapi/v1/txt2img", txt2img, methods=["POST"]),
    Route("/sdapi/v1/img2img", img2img, methods=["POST"]),
    Route("/sdapi/v1/progress", progress),
    Route("/sdapi/v1/interrupt", interrupt, methods=["POST"]),
    Route("/sdapi/v1/options", options, methods=["GET", "POST"]),
    Route("/sdapi/v1/sd-models", sd_models),
    Route("/sdapi/v1/samplers", samplers),
    Route("/sdapi/v1/schedulers", schedulers),
    Route("/sdapi/v1/loras", loras),
    Route("/sdapi/v1/scripts", scripts),
]

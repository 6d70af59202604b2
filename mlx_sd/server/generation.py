"""A generation as the server runs it on its worker: the model switch a request asks for, LoRA tags, batches (A1111's
n_iter), progress and previews per step, cancel and interrupt."""

import time
from dataclasses import dataclass

import mlx.core as mx

from ..pipeline import Images, to_pil
from ..settings import GenerationSettings, image_seed
from .payloads import Cancelled, RequestError


@dataclass
class GenerationRequest:
    """What a client asked for: validated settings (the prompt may hold <lora:...> tags), run `batches` times
    (image i of the whole request uses seed + i), on the catalog entry `model` (None: the resident one)."""

    settings: GenerationSettings
    batches: int = 1
    model: object = None
    model_field: str = "model"  # the request field that named the model, for errors


@dataclass
class GenerationResult:
    batches: list  # an Images per batch run
    prompt: str  # as the client wrote it, tags included (A1111 keeps them in the infotext)
    model: str  # the model's title
    interrupted: bool

    @property
    def images(self):
        return [image for batch in self.batches for image in batch]

    @property
    def settings(self):
        return self.batches[0].settings

    @property
    def seeds(self):
        return [image_seed(self.settings.seed, i) for i in range(len(self.images))]

    @property
    def infotexts(self):
        """The A1111 infotext of each image (the prompt's <lora:...> tags kept, and the LoRAs' hashes)."""
        return [batch.infotext(i) for batch in self.batches for i in range(len(batch))]


def run_generation(worker, task, request):
    """Runs a GenerationRequest on the worker thread (Task.run); returns a GenerationResult."""
    if task.cancelled.is_set():
        raise Cancelled("cancelled before it started")
    if request.model is not None:
        worker.load(request.model, request.model_field)
    pipe = worker.pipe
    if pipe is None:  # the last model switch failed and the previous model could not be loaded again
        raise RequestError("no model is loaded: choose one (sd_model_checkpoint / model)", status=503)
    settings = request.settings.resolve(pipe.limits())  # the seed drawn once for all batches
    task.batches = request.batches
    batches = []
    for k in range(request.batches):
        task.batch, task.step = k, 0
        seed = image_seed(settings.seed, k * settings.num_images)
        batches.append(run_batch(worker, task, settings.replace(seed=seed)))
        if task.interrupted.is_set():
            break
    return GenerationResult(batches, request.settings.prompt, pipe.name, task.interrupted.is_set())


def run_batch(worker, task, settings):
    """One pipe.stream() run; after each step it records progress, makes a preview if someone watches, and stops
    when the task is cancelled (Cancelled) or interrupted (the current latents decoded)."""
    pipe = worker.pipe
    stream = pipe.stream(settings)
    try:
        for item in stream:
            if item.images is not None:
                return item.images
            task.step, task.steps = item.step, item.total
            task.steps_done += 1
            if time.monotonic() < worker.watched_until:
                task.preview = pipe.decode_preview(item.latents[:1])[0]
            if task.cancelled.is_set():
                raise Cancelled(f"cancelled after step {item.step} of {item.total}")
            if task.interrupted.is_set():
                return decode_now(pipe, settings, item.latents)
    finally:
        stream.close()
    raise AssertionError("stream() ended without images")


def decode_now(pipe, settings, latents):
    """Images of latents part way through (A1111's interrupt returns them)."""
    tiled = pipe.low_memory if settings.tiled_decode is None else settings.tiled_decode
    images = to_pil(pipe.decode(latents, tiled))
    return Images(images, settings, pipe.name, {}, mx.get_peak_memory(), pipe.adapter_infotext(settings))

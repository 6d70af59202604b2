"""The text-to-image pipeline: tokenizer -> CLIP -> UNet + sampler -> VAE, and the Python API.

A generation runs in layers, as mlx-lm's generate_step -> stream_generate -> generate: `prepare(settings)` checks
the settings against the model and computes the starting latents and the text conditioning; `stream(settings)`
yields a `Step` after each sampler step and the images at the end (stopping the iteration cancels); `generate(...)`
collects the images.
"""

import re
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

from .activations import compute_dtype
from .adapter_files import embedding_hash, extract_lora_tags, find_lora, lora_hash
from .controlnet import control_residuals, prepare_controls
from .hub import resolve_variant
from .images import check_image_and_mask, default_size, load_image, preprocess_image, preprocess_mask
from .loading import load_component, load_denoiser, load_text_encoder, load_vae, model_family, open_model
from .lora import Adapters
from .prompts import apply_weights, chunk_prompt, count_chunks, pad_chunks
from .schedulers import default_sampler, make_scheduler
from .settings import FIELDS, GenerationSettings, ModelLimits, SettingsError, image_seed
from .thread_exit import clear_mlx_state_at_thread_exit
from .tokenizer import normalize
from .unet import DeepCache
from .vae import should_tile
from .weights import ModelLoadError, read_json

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_dtype():
    """float16 on a GPU (Metal, CUDA); float32 on the CPU backend, where float16 matrix products are ~50x slower."""
    return "float16" if mx.default_device().type == mx.DeviceType.gpu else "float32"


@dataclass
class Defaults:
    """Per-model generation defaults, read from the checkpoint's configs."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str


# Cheap previews: a linear map from the 4 latent channels to RGB (the factors ComfyUI and A1111 use).
PREVIEW_FACTORS = {
    "sd1": (
        [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
        [0.0, 0.0, 0.0],
    ),
    "sdxl": (
        [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
        [0.1084, -0.0175, -0.0011],
    ),
}
PREVIEW_FACTORS["sd2"] = PREVIEW_FACTORS["sd1"]


class GenerationCancelled(Exception):
    """Raised by generate() when its `cancel` event is set; no image is returned."""


class Images(list):
    """The generated PIL images, with the resolved settings (image i used seed + i).

    `seed`: the first image's seed; `settings`: the GenerationSettings used; `parameters`: their A1111 infotext;
    `timings`: seconds per phase; `peak_memory`: the peak bytes MLX held during the generation.
    """

    def __init__(self, images, settings, model_name, timings, peak_memory, infotext_extra=()):
        super().__init__(images)
        self.seed = settings.seed
        self.settings = settings
        self.model_name = model_name
        self.infotext_extra = list(infotext_extra)  # the pipeline's own entries (Lora hashes, TI hashes)
        self.parameters = settings.to_infotext(model_name, self.infotext_extra)
        self.timings = timings
        self.peak_memory = peak_memory

    def infotext(self, index):
        """The A1111 infotext of image `index` (its own seed)."""
        settings = self.settings.replace(seed=image_seed(self.seed, index))
        return settings.to_infotext(self.model_name, self.infotext_extra)


@dataclass
class Step:
    """What stream() yields: after each sampler step the latents; the last item also carries the images."""

    step: int  # steps done, 1..total
    total: int
    latents: mx.array  # (B, h, w, 4)
    images: Images | None = None


@dataclass
class Inpainting:
    """What the denoising loop needs to inpaint."""

    mask: mx.array  # (B, h, w, 1) 1 = repaint, at latent size
    image_latents: mx.array  # (B, h, w, 4) scaled latents of the input image
    masked_latents: mx.array  # (B, h, w, 4) latents of the masked image (inpainting UNets), or None
    noise: mx.array  # (B, h, w, 4) the noise the image latents are noised with


@dataclass
class Conditioning:
    """Text-encoder outputs for one batch, computed once per generation."""

    embeds: mx.array  # (B or 2B, 77, D): [negative; positive] when guidance is on
    guidance: bool
    extra: dict = field(default_factory=dict)


@dataclass
class Job:
    """A prepared generation: resolved settings and everything the denoising loop starts from."""

    settings: GenerationSettings
    scheduler: object
    timesteps: mx.array
    latents: mx.array  # the starting latents, scaled for the first step
    conditioning: Conditioning
    inpaint: Inpainting | None
    controls: list  # ControlNets with their prepared control images (controlnet.prepare_controls)
    timings: dict


UNLOADED = "this pipeline was unloaded; load the model again with from_pretrained"


class Freed:
    """In place of a model whose weights were freed (low_memory): its config and size, until it is read again."""

    def __init__(self, model):
        self.config = model.config
        self.nbytes = model_bytes(model)


def model_bytes(model):
    """The bytes of a model's weights (a Freed model's as they were)."""
    if isinstance(model, Freed):
        return model.nbytes
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


class StableDiffusion:
    """Stable Diffusion 1.x / 2.x (epsilon and v-prediction) and SD-Turbo on MLX; loads SDXL as StableDiffusionXL."""

    text_encoders = (("tokenizer", "text_encoder"),)  # (tokenizer, encoder) component names
    size_conditioning = False

    def __init__(self, components, scheduler_config, dtype=mx.float32, name="model", family="sd1", config=None):
        """`components`: tokenizer(s), text encoder(s), unet and vae by their model-folder names."""
        for key, value in components.items():
            setattr(self, key, value)
        self.scheduler_config = scheduler_config
        self.dtype = dtype
        self.name = name
        self.family = family  # sd1, sd2 or sdxl
        self.config = config or {}  # model_index.json
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.defaults = _defaults(self.unet.config, scheduler_config, self.vae_scale_factor)
        self.clip_layers = min(getattr(self, e).config.num_hidden_layers for _, e in self.text_encoders)
        self.low_memory = False
        self.lora_dir = None  # the folder of NAME.safetensors files that <lora:NAME:WEIGHT> prompt tags apply
        self._adapters = None  # mlx_sd.lora.Adapters, made on first use
        self._tag_loras = set()  # the LoRAs loaded for prompt tags (the others are the user's)
        self._source = None  # (folder, checkpoint, quantize, variant): from_pretrained's, to read freed models again

    @property
    def compute_dtype(self):
        """The dtype of the activations: `dtype`, but float32 on MLX's CPU backend (see activations.compute_dtype)."""
        return compute_dtype(self.dtype)

    @property
    def models(self):
        """The names of the model components: text encoder(s), unet, vae."""
        return [encoder for _, encoder in self.text_encoders] + ["unet", "vae"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unload()

    def unload(self):
        """Frees every model's weights; the pipeline cannot generate afterwards."""
        for name in self.models:
            setattr(self, name, None)
        self._source = self._adapters = None
        mx.clear_cache()

    def use_models(self, *names):
        """Makes the models `names` ready for the phase about to run, reading them again from the model folder where
        they were freed. In low_memory mode the other models are freed first, so that only the phase's are in
        memory: the text encoders while encoding prompts, the UNet while denoising, the VAE while encoding images
        and decoding (a pipeline made from components, with no folder to read them again from, keeps them all)."""
        if self.low_memory and self._source is not None:
            self.free(*(name for name in self.models if name not in names))
        self._ensure(*names)

    def free(self, *names):
        """Frees the weights of the models `names` (text_encoder, text_encoder_2, unet, vae); `use_models` reads
        them again from the model folder. Their configs stay (`Freed`)."""
        if self.unet is None:
            raise RuntimeError(UNLOADED)
        if self._source is None:
            raise RuntimeError("this pipeline was made from components: it has no model folder to read them again")
        for name in names:
            if self._loaded(name):
                setattr(self, name, Freed(getattr(self, name)))
        mx.clear_cache()

    def free_text_encoders(self):
        """Frees the text encoders; they are read again when a prompt needs encoding."""
        self.free(*(encoder for _, encoder in self.text_encoders))

    def _loaded(self, name):
        return getattr(self, name) is not None and not isinstance(getattr(self, name), Freed)

    def _ensure(self, *names):
        """Reads the freed models among `names` again (with their LoRAs and embeddings)."""
        if self.unet is None:
            raise RuntimeError(UNLOADED)
        missing = [name for name in names if not self._loaded(name)]
        for name in missing:
            setattr(self, name, self._read(name))
        if missing:
            self.attach_adapters()

    def _read(self, name):
        folder, checkpoint, quantize, variant = self._source
        if name == "vae":
            return load_vae(folder, self.dtype, checkpoint, variant)
        if name == "unet":
            return load_component(folder, "unet", self.dtype, quantize, checkpoint, variant)
        tokenizer = {encoder: tokenizer for tokenizer, encoder in self.text_encoders}[name]
        return load_text_encoder(folder, tokenizer, name, self.dtype, quantize, checkpoint, variant)[1]

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, low_memory=False, quantize=None, variant=None):
        """Loads a diffusers-format folder or Hub repo id (downloaded once into the Hugging Face cache), a folder
        written by `mlx-sd convert`, or a single-file `.safetensors` checkpoint of SD 1.x or SDXL (SD 2.x files
        need `mlx-sd convert --prediction-type`).

        dtype: "float32", "float16" or "bfloat16"; None picks float16 on a GPU and float32 on the CPU backend.
        quantize=4 or 8 quantizes the text encoders and the UNet while loading (see `mlx-sd convert -q`).
        variant: the weight files to read, "fp16" (`*.fp16.safetensors`) or "none" (the full-precision files); by
        default the fp16 files for float16 / bfloat16 where the model has them (diffusers' `variant="fp16"`).
        low_memory=True keeps in memory only the models of the phase that runs (`use_models`: the text encoders
        while encoding, the UNet while denoising, the VAE while decoding; each read again from the model folder
        when its phase comes, none kept after loading), runs the guidance's negative and positive halves as
        separate UNet calls (half the activations), and decodes images larger than 512 x 512 in tiles (`decode`).
        """
        dtype = _dtype(dtype)
        folder, checkpoint = open_model(name_or_path, dtype=dtype, variant=variant)
        variant = resolve_variant(dtype, variant)
        index = read_json(folder / "model_index.json")
        pipeline = PIPELINES.get(index.get("_class_name"))
        if pipeline is None:
            raise ModelLoadError(
                f"{name_or_path} is a {index.get('_class_name')}; mlx_sd supports {', '.join(PIPELINES)}"
            )
        # every model is read (and checked) now; low_memory frees each once read, for its phase to read it again
        keep = Freed if low_memory else (lambda model: model)
        components = {}
        for tokenizer, encoder in pipeline.text_encoders:
            components[tokenizer], text_encoder = load_text_encoder(
                folder, tokenizer, encoder, dtype, quantize, checkpoint, variant
            )
            components[encoder] = keep(text_encoder)
            del text_encoder
        unet, vae, scheduler_config = load_denoiser(folder, dtype, quantize, checkpoint, variant)
        components["unet"], components["vae"] = keep(unet), keep(vae)
        del unet, vae
        mx.clear_cache()
        model = pipeline(components, scheduler_config, dtype, str(name_or_path), model_family(folder), index)
        model.low_memory = bool(low_memory)
        model._source = (folder, checkpoint, quantize, variant)
        return model

    def parameters(self):
        """The parameters of the models in memory."""
        return [getattr(self, name).parameters() for name in self.models if self._loaded(name)]

    def limits(self):
        """What the settings are checked against (GenerationSettings.resolve)."""
        return ModelLimits(
            defaults=self.defaults,
            vae_scale_factor=self.vae_scale_factor,
            latent_channels=self.vae.config.latent_channels,
            clip_layers=self.clip_layers,
            scheduler_config=self.scheduler_config,
            size_conditioning=self.size_conditioning,
            image_size=lambda image: default_size(image, self.vae_scale_factor),
            prompt_chunks=lambda text: max(count_chunks(getattr(self, t), text) for t, _ in self.text_encoders),
            memory_needed=self.memory_needed,
        )

    # --- phases -------------------------------------------------------------------------------

    def encode_prompt(self, prompts, negative_prompts, guidance_scale, clip_skip=None, truncate=False):
        """CLIP embeddings of the prompts, with the negative prompts (None: empty) first when guidance is on.

        Prompts follow A1111: `(word:1.3)` weights, and prompts over 75 tokens are encoded in 75-token
        chunks and concatenated (every prompt of the batch padded to the same number of chunks);
        truncate=True keeps the first chunk only. clip_skip: A1111 numbering (1 = last layer).
        """
        self.use_models(*(encoder for _, encoder in self.text_encoders))
        guidance = guidance_scale > 1
        texts = [*(n or "" for n in negative_prompts), *prompts] if guidance else list(prompts)

        def select(out):
            if clip_skip is None or clip_skip <= 1:
                return out.last_hidden_state
            # the final layer norm still applies to an earlier layer (diffusers, A1111)
            return self.text_encoder.text_model.final_layer_norm(out.hidden_states[-clip_skip])

        chunks = chunk_texts(self.tokenizer, texts, truncate)
        embeds, _ = encode_chunks(self.text_encoder, chunks, select)
        return Conditioning(embeds.astype(self.compute_dtype), guidance)

    def denoise(
        self,
        conditioning,
        latents,
        scheduler,
        guidance_scale,
        seeds,
        timesteps=None,
        inpaint=None,
        controls=(),
        deep_cache=None,
    ):
        """Yields the latents after each sampler step; each step is evaluated before it is yielded.

        `timesteps`: a tail of scheduler.timesteps (image-to-image); `inpaint`: an Inpainting state;
        `controls`: ControlNets (controlnet.prepare_controls) whose residuals the UNet adds.
        `deep_cache`: N >= 2 runs the whole UNet on every N-th call only (unet.DeepCache), None or 1 on every call.
        Ancestral samplers draw their noise for image i from a stream seeded by seeds[i] (`step_noise`), so an
        image comes out the same whichever batch it is generated in.
        """
        self.use_models("unet")
        timesteps = scheduler.timesteps if timesteps is None else timesteps
        noises = step_noise(seeds, latents.shape[1:])
        double = (lambda a: mx.concatenate([a, a])) if conditioning.guidance else (lambda a: a)
        caches = [DeepCache(deep_cache) for _ in range(2)] if deep_cache and deep_cache > 1 else None
        for i, t in enumerate(timesteps):
            x = scheduler.scale_model_input(double(latents), t)
            residuals = control_residuals(controls, x.astype(self.compute_dtype), t, conditioning, i, len(timesteps))
            if inpaint is not None and inpaint.masked_latents is not None:
                # inpainting UNets take the mask and the masked image's latents as 5 more channels
                x = mx.concatenate([x, double(inpaint.mask), double(inpaint.masked_latents)], axis=-1)
            out = self.predict(x.astype(self.compute_dtype), t, conditioning, residuals, caches).astype(mx.float32)
            if conditioning.guidance:
                out_uncond, out_text = mx.split(out, 2)
                out = out_uncond + guidance_scale * (out_text - out_uncond)
            latents = scheduler.step(out, t, latents, noise=next(noises))
            if inpaint is not None and inpaint.masked_latents is None:
                # ordinary checkpoints: outside the mask, put back the image's latents noised to the next step
                known = inpaint.image_latents
                if i < len(timesteps) - 1:
                    known = scheduler.add_noise(known, inpaint.noise, timesteps[i + 1 : i + 2])
                latents = (1 - inpaint.mask) * known + inpaint.mask * latents
            mx.eval(latents)
            yield latents

    def predict(self, x, t, conditioning, residuals=None, caches=None):
        """The UNet's output for x (noise or v, as the model predicts); with guidance in low_memory mode, the
        negative and positive halves of the batch run as two evaluated calls, so that the UNet's activations are
        those of half the batch. `residuals`: ControlNet residuals (controlnet.control_residuals) for the UNet;
        `caches`: two DeepCaches (the second for the positive half in low_memory mode) or None."""
        residuals = residuals or {}
        caches = [{"cache": c} if c is not None else {} for c in caches or [None, None]]
        if not (self.low_memory and conditioning.guidance):
            return self.unet(x, t, conditioning.embeds, **conditioning.extra, **residuals, **caches[0])
        n = x.shape[0] // 2
        halves = []
        for part, cache in zip((slice(0, n), slice(n, 2 * n)), caches):
            extra = {k: v[part] for k, v in conditioning.extra.items()} | cache
            if residuals:
                down = [r[part] for r in residuals["down_residuals"]]
                extra.update(down_residuals=down, mid_residual=residuals["mid_residual"][part])
            halves.append(self.unet(x[part], t, conditioning.embeds[part], **extra))
            mx.eval(halves[-1])
        return mx.concatenate(halves)

    def add_size_conditioning(self, conditioning, settings):
        """SD 1.x / 2.x have no size conditioning (see StableDiffusionXL)."""
        return conditioning

    def decode(self, latents, tiled=False):
        """Latents (B, h, w, 4) -> images (B, 8h, 8w, 3) as float32 in [0, 1].

        tiled=True decodes latents larger than one VAE tile (64 x 64 latents: 512 x 512 pixels) tile by tile
        and image by image (`AutoencoderKL.decode_tiled`: seams blended over 128 pixels), so that the decoder's
        memory is that of one 512 x 512 tile; the result differs slightly from untiled decoding."""
        self.use_models("vae")
        z = latents / self.vae.config.scaling_factor
        if self.vae.config.shift_factor is not None:
            z = z + self.vae.config.shift_factor
        z = self._vae_input(z)
        if tiled and should_tile(z.shape[1], z.shape[2]):
            images = []
            for i in range(z.shape[0]):
                images.append(self.vae.decode_tiled(z[i : i + 1]).astype(mx.float32))
                mx.eval(images[-1])
            image = mx.concatenate(images)
        else:
            image = self.vae.decode(z).astype(mx.float32)
        return mx.clip(image / 2 + 0.5, 0, 1)

    # --- the API --------------------------------------------------------------------------------

    def generate(self, prompt=None, callback=None, cancel=None, **settings):
        """Generates images; returns them as an `Images` list (with `.seed`, `.settings`, `.parameters`).

        `prompt`: the prompt, or a GenerationSettings; the keyword arguments are GenerationSettings fields
        (negative_prompt, width, height, steps, guidance_scale, sampler, seed, num_images, clip_skip, image,
        strength, mask, mask_blur, controlnet, latents, image_noise, original_size, crops_coords_top_left,
        target_size, truncate_prompt, tiled_decode, ...; see settings.py), overriding the object's. Left out: the
        model's defaults. `controlnet`: ControlSpecs (mlx_sd.controlnet), each a ControlNet with its control image.
        `callback(step, total, latents)` is called after each step; setting the `cancel` event (e.g. a
        threading.Event, from another thread) stops at the next step with GenerationCancelled.
        """
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("cancelled before the first step")
        for item in self.stream(prompt, **settings):
            if item.images is not None:
                return item.images
            if callback is not None:
                callback(item.step, item.total, item.latents)
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled(f"cancelled before step {item.step + 1} of {item.total}")
        raise AssertionError("stream() ended without images")

    def stream(self, prompt=None, **settings):
        """Yields a Step after each sampler step, then a last Step carrying the images (`.images`).

        Arguments as generate(). Each step is computed when the next item is asked for: stopping the iteration
        (break, or closing the generator) cancels the generation."""
        clear_mlx_state_at_thread_exit()
        mx.reset_peak_memory()
        job = self.prepare(prompt, **settings)
        s, timings = job.settings, job.timings
        tic = time.perf_counter()
        total = len(job.timesteps)
        latents = job.latents
        steps = self.denoise(job.conditioning, latents, job.scheduler, s.guidance_scale, s.seeds, job.timesteps,
                             job.inpaint, job.controls, s.deep_cache)  # fmt: skip
        for step, latents in enumerate(steps, 1):
            yield Step(step, total, latents)
        timings["denoise"] = time.perf_counter() - tic
        tic = time.perf_counter()
        images = to_pil(self.decode(latents, self.low_memory if s.tiled_decode is None else s.tiled_decode))
        timings["vae"] = time.perf_counter() - tic
        images = Images(images, s, self.name, timings, mx.get_peak_memory(), self.adapter_infotext(s))
        yield Step(total, total, latents, images)

    def prepare(self, prompt=None, **settings):
        """A Job: the settings resolved and checked for this model, the starting latents and the conditioning."""
        if self.unet is None:
            raise RuntimeError(UNLOADED)
        s = as_settings(prompt, settings).validate()
        if s.image is not None:  # read each file once; a PIL mask keeps its mode (see preprocess_mask)
            s.image = load_image(s.image)
            s.mask = s.mask if s.mask is None or isinstance(s.mask, Image.Image) else load_image(s.mask)
            if s.mask is not None:
                check_image_and_mask(s.image, s.mask)
        s = s.resolve(self.limits())
        f = self.vae_scale_factor
        shape = (s.num_images, s.height // f, s.width // f, self.vae.config.latent_channels)
        noise = _noise_or(s.latents, shape, s.seeds)
        options = {} if s.eta is None else {"eta": s.eta}
        scheduler = make_scheduler(s.sampler, self.scheduler_config, s.schedule, s.timestep_spacing, **options)
        scheduler.set_timesteps(s.steps)
        guided = s.guidance_scale > 1
        controls = prepare_controls(s.controlnet or [], self.unet.config, s.width, s.height, s.num_images, guided,
                                    self.compute_dtype)  # fmt: skip
        timings, tic = {}, time.perf_counter()
        timesteps, inpaint = scheduler.timesteps, None
        if s.image is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            timesteps = _strength_timesteps(timesteps, s.steps, s.strength, scheduler.order)
            # the VAE posterior's standard normal draw, from a stream of its own per image
            seeds = [image_seed(seed, 2**32) for seed in s.seeds]
            image_noise = _noise_or(s.image_noise, shape, seeds)
            latents, inpaint = self.prepare_image(s, noise, image_noise, scheduler, timesteps)
            mx.eval(latents)
            timings["vae_encode"] = time.perf_counter() - tic
        tic = time.perf_counter()
        n, prompt = s.num_images, self.apply_prompt_loras(s.prompt)  # the infotext keeps the tags, as A1111's
        conditioning = self.encode_prompt(
            [prompt] * n, [s.negative_prompt] * n, s.guidance_scale, s.clip_skip, s.truncate_prompt
        )
        conditioning = self.add_size_conditioning(conditioning, s)
        mx.eval(conditioning.embeds, conditioning.extra)
        timings["text_encoder"] = time.perf_counter() - tic
        return Job(s, scheduler, timesteps, latents, conditioning, inpaint, controls, timings)

    def prepare_image(self, settings, noise, image_noise, scheduler, timesteps):
        """The starting latents of image-to-image / inpainting and the inpainting state (None for img2img).

        Follows diffusers' Img2Img and Inpaint pipelines: the image's VAE posterior sample (scaled) noised to
        the first remaining timestep; inpainting at strength 1 starts from pure noise.
        """
        s = settings
        pixels = preprocess_image(s.image, s.width, s.height)  # (1, H, W, 3) in [-1, 1]
        image_latents = self.encode_image(pixels, image_noise)
        if s.mask is None:
            return scheduler.add_noise(image_latents, noise, timesteps[:1]), None
        full_mask = preprocess_mask(s.mask, s.width, s.height, s.mask_blur)  # (1, H, W, 1) in {0, 1}
        f = self.vae_scale_factor
        latent_mask = mx.broadcast_to(full_mask[:, ::f, ::f], (*noise.shape[:3], 1))  # nearest, like F.interpolate
        masked_latents = None
        if self.unet.config.in_channels == noise.shape[-1] + 1 + noise.shape[-1]:  # an inpainting UNet
            masked_latents = self.encode_image(pixels * (full_mask < 0.5), image_noise)
        if s.strength == 1.0:
            x = noise * scheduler.init_noise_sigma
        else:
            x = scheduler.add_noise(image_latents, noise, timesteps[:1])
        return x, Inpainting(latent_mask, image_latents, masked_latents, noise)

    def encode_image(self, pixels, eps):
        """Pixels (1, H, W, 3) in [-1, 1] -> scaled latents of the VAE posterior sample mean + std * eps (N, ...)."""
        self.use_models("vae")
        mean, logvar = self.vae.encode(self._vae_input(pixels))
        sample = mean.astype(mx.float32) + mx.exp(0.5 * logvar.astype(mx.float32)) * eps
        if self.vae.config.shift_factor is not None:
            sample = sample - self.vae.config.shift_factor
        return sample * self.vae.config.scaling_factor

    def _vae_input(self, x):
        """x in the VAE's compute dtype: its weights' (float32 with force_upcast), float32 on the CPU backend."""
        return x.astype(compute_dtype(self.vae.decoder.conv_in.weight.dtype))

    def decode_preview(self, latents):
        """Cheap previews of latents (B, h, w, 4): a linear map to RGB, upscaled to the output size."""
        factors, bias = PREVIEW_FACTORS[self.family]
        rgb = latents.astype(mx.float32) @ mx.array(factors) + mx.array(bias)  # (B, h, w, 3) in about [-1, 1]
        images = to_pil(mx.clip(rgb / 2 + 0.5, 0, 1))
        size = (latents.shape[2] * self.vae_scale_factor, latents.shape[1] * self.vae_scale_factor)
        return [image.resize(size, Image.BILINEAR) for image in images]

    def memory_needed(self, settings):
        """A rough estimate of the peak bytes of a generation with these (resolved) settings: the weights, plus
        the larger of a UNet step's activations and the VAE decoder's. Used to refuse what cannot fit."""
        sizes = {name: model_bytes(getattr(self, name)) for name in self.models}
        weights = sum(sizes.values())
        if self.low_memory and self._source is not None:  # one phase's models at a time
            weights = max(sum(sizes[e] for _, e in self.text_encoders), sizes["unet"], sizes["vae"])
        guided = settings.guidance_scale > 1 and not self.low_memory
        batch = settings.num_images * (2 if guided else 1)
        pixels = settings.width * settings.height
        bytes_per_value = 2 if self.compute_dtype in (mx.float16, mx.bfloat16) else 4
        step = batch * pixels * 300 * bytes_per_value  # about 1.2 KB per pixel in float32 (SDXL, measured)
        if mx.default_device().type == mx.DeviceType.cpu:
            # the CPU backend's attention materialises the scores of the first attention level: heads x tokens^2
            level = next(i for i, kind in enumerate(self.unet.config.down_block_types) if "CrossAttn" in kind)
            tokens = pixels // (self.vae_scale_factor * 2**level) ** 2
            step += batch * self.unet.config.num_attention_heads[level] * tokens**2 * bytes_per_value
        tiled = self.low_memory if settings.tiled_decode is None else settings.tiled_decode
        decoded = min(pixels, 512 * 512) if tiled else pixels * settings.num_images
        return weights + max(step, decoded * 2048)  # the decoder: about 2 KB per output pixel at least

    # --- LoRAs and textual-inversion embeddings (mlx_sd.lora.Adapters) ----------------------------

    @property
    def adapters(self):
        """The pipeline's LoRAs and embeddings, created on first use (reading the text encoders back if freed)."""
        if self.unet is None:
            raise RuntimeError(UNLOADED)
        if self._adapters is None:
            self._ensure(*(name for name in self.models if name != "vae"))  # the layer tables of each
            self._adapters = Adapters(self.family)
            self.attach_adapters()
        return self._adapters

    def attach_adapters(self):
        """Applies the LoRAs and embeddings to the components in memory; call it after (re)loading a component."""
        if self._adapters is None:
            return
        for name in self.models:
            if name != "vae" and self._loaded(name):  # LoRAs apply to the UNet and text encoders
                self._adapters.attach(name, getattr(self, name))
        for tokenizer, encoder in self.text_encoders:
            self._adapters.attach_tokenizer(encoder, getattr(self, tokenizer))

    def load_lora(self, path, scale=1.0, name=None):
        """Applies a LoRA file (Kohya / A1111, diffusers / PEFT, LyCORIS LoHa / LoKr; .safetensors) at `scale`;
        returns its name (default: the file name without suffix). Float layers get the change merged into their
        weights, quantized layers a low-rank branch; unloading restores the original weights exactly."""
        return self.adapters.load_lora(path, scale, name)

    def set_lora_scale(self, name, scale):
        """Changes a loaded LoRA's scale (finite, |scale| <= 10; 0 turns it off); the model is not reloaded."""
        self.adapters.set_scale(name, scale)

    def unload_lora(self, name=None):
        """Removes the LoRA `name`, or all of them (None)."""
        self.adapters.unload_lora(name)

    @property
    def loras(self):
        """The loaded LoRAs: name -> scale."""
        return {} if self._adapters is None else self._adapters.scales

    def load_textual_inversion(self, path, token=None):
        """Loads a textual-inversion embedding (A1111, diffusers or SDXL .safetensors); returns its token, which
        used as a word in a prompt inserts its vectors (default: the stored token, else the file name)."""
        return self.adapters.load_embedding(path, token)

    def apply_prompt_loras(self, prompt):
        """The prompt without its A1111 `<lora:NAME:WEIGHT>` tags, once the LoRAs loaded for tags are exactly this
        prompt's: NAME.safetensors in `self.lora_dir` at WEIGHT (loaded, rescaled or unloaded; LoRAs loaded with
        load_lora are left alone)."""
        text, tags = extract_lora_tags(prompt)
        if not tags and not self._tag_loras:
            return text
        if tags and self.lora_dir is None:
            raise SettingsError(
                "the prompt has <lora:...> tags: give the folder of the LoRA files (lora_dir, --lora-dir)"
            )
        wanted = dict(tags)
        for name in wanted.keys() & (self.loras.keys() - self._tag_loras):
            raise SettingsError(f"the LoRA {name!r} is already loaded (load_lora / --lora): leave out its tag")
        for name in self._tag_loras - wanted.keys():
            self.unload_lora(name)
            self._tag_loras.discard(name)
        for name, scale in wanted.items():
            if name not in self._tag_loras:
                self.load_lora(find_lora(name, self.lora_dir), scale, name)
                self._tag_loras.add(name)
            elif self.loras[name] != scale:
                self.set_lora_scale(name, scale)
        return text

    def adapter_infotext(self, settings):
        """A1111's `Lora hashes` (the active LoRAs) and `TI hashes` (the embeddings the prompts use) entries."""
        if self._adapters is None:
            return []
        a = self._adapters
        loras = [f"{name.replace(':', '').replace(',', '')}: {lora_hash(lora.path)}" for name, lora in a.loras.items()
                 if lora.scale != 0]  # fmt: skip
        text = normalize(f"{settings.prompt} {settings.negative_prompt or ''}")
        used = [
            e for token, e in a.embeddings.items() if re.search(rf"(?<!\w){re.escape(normalize(token))}(?!\w)", text)
        ]
        embeddings = [f"{e.token.replace(':', '').replace(',', '')}: {embedding_hash(e.path)}" for e in used]
        return [(key, ", ".join(v)) for key, v in (("Lora hashes", loras), ("TI hashes", embeddings)) if v]

    def unload_textual_inversion(self, token=None):
        """Removes the embedding `token`, or all of them (None)."""
        self.adapters.unload_embedding(token)


class StableDiffusionXL(StableDiffusion):
    """SDXL base and SDXL-Turbo: two text encoders (CLIP ViT-L + OpenCLIP bigG) and size conditioning."""

    text_encoders = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    size_conditioning = True

    def encode_prompt(self, prompts, negative_prompts, guidance_scale, clip_skip=None, truncate=False):
        # diffusers' SDXL: penultimate hidden states of both encoders (no final norm) side by side, pooled from
        # the projected output of the second. clip_skip (A1111 numbering) counts back from the penultimate layer.
        self.use_models(*(encoder for _, encoder in self.text_encoders))
        guidance = guidance_scale > 1
        texts = [*(n or "" for n in negative_prompts), *prompts] if guidance else list(prompts)
        layer = -2 if clip_skip is None else -(clip_skip + 1)
        chunks = [chunk_texts(self.tokenizer, texts, truncate), chunk_texts(self.tokenizer_2, texts, truncate)]
        n = max(len(c) for c in chunks[0] + chunks[1])  # the two tokenizers differ on "!"
        hidden, _ = encode_chunks(self.text_encoder, chunks[0], lambda out: out.hidden_states[layer], n)
        hidden_2, pooled = encode_chunks(self.text_encoder_2, chunks[1], lambda out: out.hidden_states[layer], n)
        embeds = mx.concatenate([hidden, hidden_2], axis=-1)  # (B, 77 * n, 768 + 1280)
        if guidance and self.config.get("force_zeros_for_empty_prompt", True) and negative_prompts[0] is None:
            # no negative prompt: zero embeddings (diffusers' force_zeros_for_empty_prompt; "" is encoded as text)
            b = len(negative_prompts)
            embeds = mx.concatenate([mx.zeros_like(embeds[:b]), embeds[b:]])
            pooled = mx.concatenate([mx.zeros_like(pooled[:b]), pooled[b:]])
        dtype = self.compute_dtype
        return Conditioning(embeds.astype(dtype), guidance, {"text_embeds": pooled.astype(dtype)})

    def add_size_conditioning(self, conditioning, settings):
        """Adds SDXL's six time ids: original size, crop top-left, target size (each (height, width))."""
        size = (settings.height, settings.width)
        time_ids = [*(settings.original_size or size), *settings.crops_coords_top_left, *(settings.target_size or size)]
        batch = conditioning.embeds.shape[0]
        time_ids = mx.broadcast_to(mx.array(time_ids, dtype=self.compute_dtype), (batch, 6))
        return Conditioning(conditioning.embeds, conditioning.guidance, {**conditioning.extra, "time_ids": time_ids})


# model_index.json's `_class_name` -> the pipeline class that loads it
PIPELINES = {
    "StableDiffusionPipeline": StableDiffusion,
    "StableDiffusionXLPipeline": StableDiffusionXL,
    "StableDiffusionInpaintPipeline": StableDiffusion,
    "StableDiffusionXLInpaintPipeline": StableDiffusionXL,
}


def as_settings(prompt, overrides):
    """A GenerationSettings from generate()'s arguments: a settings object or a prompt, and field overrides."""
    unknown = sorted(overrides.keys() - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown generation setting(s): {', '.join(unknown)}")
    if isinstance(prompt, GenerationSettings):
        return prompt.replace(**overrides)
    if prompt is not None:
        overrides = {**overrides, "prompt": prompt}
    return GenerationSettings(**overrides)


def _noise_or(noise, shape, seeds):
    """`noise` (its shape checked by the settings) as float32, or standard normal noise drawn per image seed."""
    if noise is None:
        return mx.concatenate([mx.random.normal((1, *shape[1:]), key=mx.random.key(s)) for s in seeds])
    return mx.array(noise, dtype=mx.float32)


def step_noise(seeds, shape):
    """Yields the noise of each sampler step (ancestral and SDE samplers): (B, *shape), image i's part drawn from
    a stream seeded by seeds[i], so that an image comes out the same whichever batch it is generated in."""
    streams = [mx.random.split(mx.random.key(seed))[1] for seed in seeds]
    while True:
        keys = [mx.random.split(stream) for stream in streams]
        streams = [k[0] for k in keys]
        yield mx.concatenate([mx.random.normal((1, *shape), key=k[1]) for k in keys])


def _strength_timesteps(timesteps, steps, strength, order=1):
    """The last int(steps * strength) steps (diffusers' get_timesteps; the settings check that one is left).
    Second-order samplers (order 2) list two timesteps per step."""
    return timesteps[(steps - min(int(steps * strength), steps)) * order :]


def chunk_texts(tokenizer, texts, truncate):
    """A1111 chunks (75 tokens + BOS/EOS, with weights) of each text; truncate keeps the first 75 tokens."""
    # no comma backtrack when truncating, so that the kept part is what the tokenizer's truncation keeps
    return [chunk_prompt(tokenizer, text, truncate=truncate, comma_backtrack=0 if truncate else 20) for text in texts]


def encode_chunks(encoder, chunks, select, n=None):
    """Encodes texts chunk by chunk, weights each chunk (A1111) and joins the chunks along the tokens.

    Every text is padded to n chunks (default: the most any text has). Returns the joined hidden states
    (B, 77 * n, D) and the projected pooled output of each text's first chunk (None without projection).
    """
    n = n or max(len(c) for c in chunks)
    chunks = [pad_chunks(c, n) for c in chunks]
    out = encoder(mx.array(np.concatenate([c.ids for c in chunks])))  # B * n chunks of 77 ids
    hidden = select(out)
    B, L, D = len(chunks), hidden.shape[1], hidden.shape[2]
    weights = np.stack([c.weights for c in chunks])  # (B, n, 77)
    if not np.all(weights == 1):
        hidden = apply_weights(hidden.reshape(B, n, L, D), weights)
    hidden = hidden.reshape(B, n * L, D)
    pooled = None if out.text_embeds is None else out.text_embeds.reshape(B, n, -1)[:, 0]
    return hidden, pooled


def to_pil(images):
    """Float images (B, H, W, 3) in [0, 1] -> PIL images, rounded like diffusers' numpy_to_pil."""
    array = (np.array(images) * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def _defaults(unet_config, scheduler_config, vae_scale_factor):
    size = unet_config.sample_size * vae_scale_factor
    # Distilled (Turbo) checkpoints ship trailing spacing: 1 step without guidance, as their model cards use.
    if scheduler_config.get("timestep_spacing") == "trailing":
        return Defaults(size, size, 1, 0.0, default_sampler(scheduler_config))
    return Defaults(size, size, 30, 7.5, default_sampler(scheduler_config))


def _dtype(dtype):
    if dtype is None:
        dtype = default_dtype()
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]

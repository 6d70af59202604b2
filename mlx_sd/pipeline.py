"""The text-to-image pipeline: tokenizer -> CLIP -> UNet + sampler -> VAE, and the Python API."""

import random
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from PIL import Image

from .loading import load_denoiser, load_text_encoder
from .schedulers import SAMPLERS, default_sampler, make_scheduler
from .weights import ModelLoadError, read_json, resolve_model

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass
class Defaults:
    """Per-model generation defaults, read from the checkpoint's configs."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str


class Images(list):
    """The generated PIL images, with the seed of the first one (image i used seed + i) and the settings."""

    def __init__(self, images, seed, parameters, timings):
        super().__init__(images)
        self.seed = seed
        self.parameters = parameters
        self.timings = timings


@dataclass
class Conditioning:
    """Text-encoder outputs for one batch, computed once per generation."""

    embeds: mx.array  # (B or 2B, 77, D): [negative; positive] when guidance is on
    guidance: bool
    extra: dict = field(default_factory=dict)


class StableDiffusion:
    """Stable Diffusion 1.x / 2.x (epsilon and v-prediction) and SD-Turbo on MLX; loads SDXL as StableDiffusionXL."""

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler_config, dtype=mx.float16, name="model"):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler_config = scheduler_config
        self.dtype = dtype
        self.name = name
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.defaults = _defaults(unet.config, scheduler_config, self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype="float16"):
        """Loads a diffusers-format folder or Hub repo id (downloaded once into the Hugging Face cache)."""
        dtype = _dtype(dtype)
        folder = resolve_model(name_or_path)
        index = read_json(folder / "model_index.json")
        pipeline_cls = {"StableDiffusionPipeline": StableDiffusion, "StableDiffusionXLPipeline": StableDiffusionXL}
        if index.get("_class_name") not in pipeline_cls:
            raise ModelLoadError(
                f"{name_or_path} is a {index.get('_class_name')}; mlx_sd supports {', '.join(pipeline_cls)}"
            )
        return pipeline_cls[index["_class_name"]]._load(folder, index, dtype, str(name_or_path))

    @classmethod
    def _load(cls, folder, index, dtype, name):
        tokenizer, text_encoder = load_text_encoder(folder, "tokenizer", "text_encoder", dtype)
        unet, vae, scheduler_config = load_denoiser(folder, dtype)
        model = cls(tokenizer, text_encoder, unet, vae, scheduler_config, dtype, name=name)
        mx.eval(model.parameters())
        return model

    def parameters(self):
        return [m.parameters() for m in (self.text_encoder, self.unet, self.vae)]

    # --- phases -------------------------------------------------------------------------------

    def encode_prompt(self, prompts, negative_prompts, guidance_scale, clip_skip=None):
        """CLIP embeddings of the prompts, with the negative prompts first when guidance is on."""
        guidance = guidance_scale > 1
        texts = list(negative_prompts) + list(prompts) if guidance else list(prompts)
        ids = mx.array(self.tokenizer(texts))
        out = self.text_encoder(ids)
        if clip_skip is None or clip_skip <= 1:
            embeds = out.last_hidden_state
        else:
            # A1111 numbering: clip_skip=2 is the penultimate layer; the final layer norm still applies (diffusers).
            hidden = out.hidden_states[-clip_skip]
            embeds = self.text_encoder.text_model.final_layer_norm(hidden)
        return Conditioning(embeds.astype(self.dtype), guidance)

    def denoise(self, conditioning, latents, scheduler, guidance_scale, seed=0):
        """Yields the latents after each sampler step; each step is evaluated before it is yielded."""
        noise_key = mx.random.key(seed + 1)
        for t in scheduler.timesteps:
            x = mx.concatenate([latents, latents]) if conditioning.guidance else latents
            x = scheduler.scale_model_input(x, t).astype(self.dtype)
            eps = self.unet(x, t, conditioning.embeds, **conditioning.extra).astype(mx.float32)
            if conditioning.guidance:
                eps_uncond, eps_text = mx.split(eps, 2)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            noise_key, step_key = mx.random.split(noise_key)
            noise = mx.random.normal(latents.shape, key=step_key)
            latents = scheduler.step(eps, t, latents, noise=noise)
            mx.eval(latents)
            yield latents

    def add_size_conditioning(self, conditioning, size, original_size, crops_coords_top_left, target_size):
        """SD 1.x / 2.x have no size conditioning (see StableDiffusionXL)."""
        if original_size is not None or target_size is not None or tuple(crops_coords_top_left) != (0, 0):
            raise ValueError("original_size, crops_coords_top_left and target_size apply to SDXL models only")
        return conditioning

    def decode(self, latents):
        """Latents (B, h, w, 4) -> images (B, 8h, 8w, 3) as float32 in [0, 1]."""
        z = latents / self.vae.config.scaling_factor
        if self.vae.config.shift_factor is not None:
            z = z + self.vae.config.shift_factor
        image = self.vae.decode(z.astype(self.vae.decoder.conv_in.weight.dtype)).astype(mx.float32)
        return mx.clip(image / 2 + 0.5, 0, 1)

    # --- the API --------------------------------------------------------------------------------

    def generate(
        self,
        prompt,
        negative_prompt="",
        width=None,
        height=None,
        steps=None,
        guidance_scale=None,
        sampler=None,
        seed=None,
        num_images=1,
        latents=None,
        clip_skip=None,
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
    ):
        """Generates `num_images` PIL images for `prompt`; returns them as a list with `.seed` and `.parameters`.

        `latents`: optional initial noise (N, height/8, width/8, 4), standard normal; it is scaled by the
        sampler's initial sigma exactly as diffusers treats its `latents` argument. Image i uses seed + i.
        SDXL only: `original_size`, `crops_coords_top_left` and `target_size` ((height, width) pairs) set the
        size conditioning; they default to the output size and (0, 0).
        """
        d = self.defaults
        width = d.width if width is None else int(width)
        height = d.height if height is None else int(height)
        steps = d.steps if steps is None else int(steps)
        guidance_scale = d.guidance_scale if guidance_scale is None else float(guidance_scale)
        sampler = d.sampler if sampler is None else sampler
        seed = random.randint(0, 2**32 - 1) if seed is None else int(seed)
        self.check_settings(width, height, steps, guidance_scale, sampler, num_images)
        shape = (num_images, height // self.vae_scale_factor, width // self.vae_scale_factor, self.unet.config.in_channels)
        if latents is None:
            latents = mx.concatenate([mx.random.normal((1, *shape[1:]), key=mx.random.key(seed + i)) for i in range(num_images)])
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for {num_images} image(s) of {width}x{height}, got {tuple(latents.shape)}")

        timings = {}
        tic = time.perf_counter()
        conditioning = self.encode_prompt([prompt] * num_images, [negative_prompt] * num_images, guidance_scale, clip_skip)
        conditioning = self.add_size_conditioning(
            conditioning, (height, width), original_size, crops_coords_top_left, target_size
        )
        mx.eval(conditioning.embeds, conditioning.extra)
        timings["text_encoder"] = time.perf_counter() - tic

        tic = time.perf_counter()
        scheduler = make_scheduler(sampler, self.scheduler_config)
        scheduler.set_timesteps(steps)
        x = mx.array(latents, dtype=mx.float32) * scheduler.init_noise_sigma
        for x in self.denoise(conditioning, x, scheduler, guidance_scale, seed):
            pass
        timings["denoise"] = time.perf_counter() - tic

        tic = time.perf_counter()
        images = to_pil(self.decode(x))
        timings["vae"] = time.perf_counter() - tic
        parameters = dict(
            prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
            guidance_scale=guidance_scale, sampler=sampler, seed=seed, model=self.name, clip_skip=clip_skip,
        )
        return Images(images, seed, parameters, timings)

    def check_settings(self, width, height, steps, guidance_scale, sampler, num_images):
        """Raises ValueError with a one-line explanation for settings that cannot work."""
        m = self.vae_scale_factor
        if width <= 0 or height <= 0 or width % m or height % m:
            raise ValueError(f"width and height must be positive multiples of {m}, got {width}x{height}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {guidance_scale}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {num_images}")


class StableDiffusionXL(StableDiffusion):
    """SDXL base and SDXL-Turbo: two text encoders (CLIP ViT-L + OpenCLIP bigG) and size conditioning."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, unet, vae, scheduler_config,
                 dtype=mx.float16, name="model", force_zeros_for_empty_prompt=True):
        super().__init__(tokenizer, text_encoder, unet, vae, scheduler_config, dtype, name)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @classmethod
    def _load(cls, folder, index, dtype, name):
        tokenizer, text_encoder = load_text_encoder(folder, "tokenizer", "text_encoder", dtype)
        tokenizer_2, text_encoder_2 = load_text_encoder(folder, "tokenizer_2", "text_encoder_2", dtype)
        unet, vae, scheduler_config = load_denoiser(folder, dtype)
        model = cls(tokenizer, text_encoder, tokenizer_2, text_encoder_2, unet, vae, scheduler_config, dtype, name,
                    index.get("force_zeros_for_empty_prompt", True))
        mx.eval(model.parameters())
        return model

    def parameters(self):
        return super().parameters() + [self.text_encoder_2.parameters()]

    def _encode(self, texts, clip_skip):
        # diffusers' SDXL: penultimate hidden states of both encoders (no final norm) side by side, pooled from
        # the projected output of the second. clip_skip (A1111 numbering) counts back from the penultimate layer.
        layer = -2 if clip_skip is None else -(clip_skip + 1)
        hidden = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(mx.array(tokenizer(texts)))
            hidden.append(out.hidden_states[layer])
        return mx.concatenate(hidden, axis=-1), out.text_embeds  # (B, 77, 768 + 1280), (B, 1280)

    def encode_prompt(self, prompts, negative_prompts, guidance_scale, clip_skip=None):
        guidance = guidance_scale > 1
        embeds, pooled = self._encode(list(prompts), clip_skip)
        if guidance:
            if self.force_zeros_for_empty_prompt and not any(negative_prompts):
                # an empty negative prompt is zero embeddings (diffusers' force_zeros_for_empty_prompt)
                negative, negative_pooled = mx.zeros_like(embeds), mx.zeros_like(pooled)
            else:
                negative, negative_pooled = self._encode(list(negative_prompts), clip_skip)
            embeds = mx.concatenate([negative, embeds])
            pooled = mx.concatenate([negative_pooled, pooled])
        return Conditioning(embeds.astype(self.dtype), guidance, {"text_embeds": pooled.astype(self.dtype)})

    def add_size_conditioning(self, conditioning, size, original_size, crops_coords_top_left, target_size):
        """Adds SDXL's six time ids: original size, crop top-left, target size (each (height, width))."""
        time_ids = [*(original_size or size), *crops_coords_top_left, *(target_size or size)]
        batch = conditioning.embeds.shape[0]
        time_ids = mx.broadcast_to(mx.array(time_ids, dtype=self.dtype), (batch, 6))
        return Conditioning(conditioning.embeds, conditioning.guidance, {**conditioning.extra, "time_ids": time_ids})


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
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]

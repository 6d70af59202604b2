"""The text-to-image pipeline: tokenizer -> CLIP -> UNet + sampler -> VAE, and the Python API."""

import random
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from PIL import Image

from .images import check_image_and_mask, default_size, load_image, preprocess_image, preprocess_mask
from .loading import load_denoiser, load_text_encoder, model_family, open_model
from .lora import Adapters
from .prompts import apply_weights, chunk_prompt, pad_chunks
from .schedulers import default_sampler, make_scheduler, resolve_sampler
from .vae import should_tile
from .weights import ModelLoadError, read_json

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


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
    """The generated PIL images, with the seed of the first one (image i used seed + i) and the settings.

    `timings`: seconds per phase; `peak_memory`: the peak bytes MLX held during the generation.
    """

    def __init__(self, images, seed, parameters, timings, peak_memory):
        super().__init__(images)
        self.seed = seed
        self.parameters = parameters
        self.timings = timings
        self.peak_memory = peak_memory


@dataclass
class Inpainting:
    """What the denoising loop needs to inpaint."""

    mask: mx.array  # (B, h, w, 1) 1 = repaint, at latent size
    image_latents: mx.array  # (B, h, w, 4) scaled latents of the input image
    masked_latents: (
        mx.array
    )  # (B, h, w, 4) latents of the image with the mask's area blanked (inpainting UNets), or None
    noise: mx.array  # (B, h, w, 4) the noise the image latents are noised with


@dataclass
class Conditioning:
    """Text-encoder outputs for one batch, computed once per generation."""

    embeds: mx.array  # (B or 2B, 77, D): [negative; positive] when guidance is on
    guidance: bool
    extra: dict = field(default_factory=dict)


class StableDiffusion:
    """Stable Diffusion 1.x / 2.x (epsilon and v-prediction) and SD-Turbo on MLX; loads SDXL as StableDiffusionXL."""

    family = "sd1"  # sd1, sd2 or sdxl (loading.model_family); from_pretrained sets it from the model folder

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
        self.reload_text_encoders = None  # set by from_pretrained(low_memory=True)
        self.low_memory = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unload()

    def unload(self):
        """Frees every model's weights; the pipeline cannot generate afterwards."""
        for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
            if hasattr(self, name):
                setattr(self, name, None)
        self.reload_text_encoders = None
        mx.clear_cache()

    def free_text_encoders(self):
        """Frees the text encoders (low_memory mode); they are loaded again when a prompt needs encoding."""
        self.text_encoder = None
        if hasattr(self, "text_encoder_2"):
            self.text_encoder_2 = None
        mx.clear_cache()

    def _ensure_text_encoders(self):
        if self.text_encoder is None:
            if self.reload_text_encoders is None:
                raise RuntimeError("this pipeline was unloaded; load the model again with from_pretrained")
            self.reload_text_encoders(self)
            self.attach_adapters()

    @classmethod
    def from_pretrained(cls, name_or_path, dtype="float16", low_memory=False, quantize=None):
        """Loads a diffusers-format folder or Hub repo id (downloaded once into the Hugging Face cache), a folder
        written by `mlx-sd convert`, or a single-file `.safetensors` checkpoint of SD 1.x or SDXL (SD 2.x files
        need `mlx-sd convert --prediction-type`).

        quantize=4 or 8 quantizes the text encoders and the UNet while loading (see `mlx-sd convert -q`).

        low_memory=True frees the text encoders once the prompts are encoded (they are read again from
        the model folder for the next prompt), so that they and the UNet are never in memory together, runs
        the guidance's negative and positive halves as separate UNet calls (half the activations), and decodes
        images larger than 512 x 512 in tiles (see `decode`).
        """
        dtype = _dtype(dtype)
        folder, checkpoint = open_model(name_or_path)
        index = read_json(folder / "model_index.json")
        if index.get("_class_name") not in PIPELINES:
            raise ModelLoadError(
                f"{name_or_path} is a {index.get('_class_name')}; mlx_sd supports {', '.join(PIPELINES)}"
            )
        model = PIPELINES[index["_class_name"]]._load(folder, index, dtype, str(name_or_path), quantize, checkpoint)
        model.family = model_family(folder)
        model.low_memory = bool(low_memory)
        if low_memory:
            model.reload_text_encoders = lambda m: m._load_text_encoders(folder, dtype, quantize, checkpoint)
        return model

    @classmethod
    def _load(cls, folder, index, dtype, name, quantize=None, checkpoint=None):
        tokenizer, text_encoder = load_text_encoder(folder, "tokenizer", "text_encoder", dtype, quantize, checkpoint)
        unet, vae, scheduler_config = load_denoiser(folder, dtype, quantize, checkpoint)
        model = cls(tokenizer, text_encoder, unet, vae, scheduler_config, dtype, name=name)
        mx.eval(model.parameters())
        return model

    def _load_text_encoders(self, folder, dtype, quantize=None, checkpoint=None):
        _, self.text_encoder = load_text_encoder(folder, "tokenizer", "text_encoder", dtype, quantize, checkpoint)

    def parameters(self):
        return [m.parameters() for m in (self.text_encoder, self.unet, self.vae)]

    # --- phases -------------------------------------------------------------------------------

    def encode_prompt(self, prompts, negative_prompts, guidance_scale, clip_skip=None, truncate=False):
        """CLIP embeddings of the prompts, with the negative prompts first when guidance is on.

        Prompts follow A1111: `(word:1.3)` weights, and prompts over 75 tokens are encoded in 75-token
        chunks and concatenated (every prompt of the batch padded to the same number of chunks);
        truncate=True keeps the first chunk only. clip_skip: A1111 numbering (1 = last layer).
        """
        self._ensure_text_encoders()
        guidance = guidance_scale > 1
        texts = [*negative_prompts, *prompts] if guidance else list(prompts)

        def select(out):
            if clip_skip is None or clip_skip <= 1:
                return out.last_hidden_state
            # the final layer norm still applies to an earlier layer (diffusers, A1111)
            return self.text_encoder.text_model.final_layer_norm(out.hidden_states[-clip_skip])

        chunks = chunk_texts(self.tokenizer, texts, truncate)
        embeds, _ = encode_chunks(self.text_encoder, chunks, select)
        return Conditioning(embeds.astype(self.dtype), guidance)

    def denoise(self, conditioning, latents, scheduler, guidance_scale, seeds, timesteps=None, inpaint=None):
        """Yields the latents after each sampler step; each step is evaluated before it is yielded.

        `timesteps`: a tail of scheduler.timesteps (image-to-image); `inpaint`: an Inpainting state.
        Ancestral samplers draw their noise for image i from a stream seeded by seeds[i], so an image
        comes out the same whichever batch it is generated in.
        """
        timesteps = scheduler.timesteps if timesteps is None else timesteps
        noises = step_noise(seeds, latents.shape[1:])
        double = (lambda a: mx.concatenate([a, a])) if conditioning.guidance else (lambda a: a)
        for i, t in enumerate(timesteps):
            x = scheduler.scale_model_input(double(latents), t)
            if inpaint is not None and inpaint.masked_latents is not None:
                # inpainting UNets take the mask and the masked image's latents as 5 more channels
                x = mx.concatenate([x, double(inpaint.mask), double(inpaint.masked_latents)], axis=-1)
            eps = self.predict_noise(x.astype(self.dtype), t, conditioning).astype(mx.float32)
            if conditioning.guidance:
                eps_uncond, eps_text = mx.split(eps, 2)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            latents = scheduler.step(eps, t, latents, noise=next(noises))
            if inpaint is not None and inpaint.masked_latents is None:
                # ordinary checkpoints: outside the mask, put back the image's latents noised to the next step
                known = inpaint.image_latents
                if i < len(timesteps) - 1:
                    known = scheduler.add_noise(known, inpaint.noise, timesteps[i + 1 : i + 2])
                latents = (1 - inpaint.mask) * known + inpaint.mask * latents
            mx.eval(latents)
            yield latents

    def predict_noise(self, x, t, conditioning):
        """The UNet's output for x; with guidance in low_memory mode, the negative and positive halves of the
        batch run as two evaluated calls, so that the UNet's activations are those of half the batch."""
        if not (self.low_memory and conditioning.guidance):
            return self.unet(x, t, conditioning.embeds, **conditioning.extra)
        n = x.shape[0] // 2
        halves = []
        for part in (slice(0, n), slice(n, 2 * n)):
            extra = {k: v[part] for k, v in conditioning.extra.items()}
            halves.append(self.unet(x[part], t, conditioning.embeds[part], **extra))
            mx.eval(halves[-1])
        return mx.concatenate(halves)

    def add_size_conditioning(self, conditioning, size, original_size, crops_coords_top_left, target_size):
        """SD 1.x / 2.x have no size conditioning (see StableDiffusionXL)."""
        if original_size is not None or target_size is not None or tuple(crops_coords_top_left) != (0, 0):
            raise ValueError("original_size, crops_coords_top_left and target_size apply to SDXL models only")
        return conditioning

    def decode(self, latents, tiled=False):
        """Latents (B, h, w, 4) -> images (B, 8h, 8w, 3) as float32 in [0, 1].

        tiled=True decodes latents larger than one VAE tile (64 x 64 latents: 512 x 512 pixels) tile by tile
        and image by image (`AutoencoderKL.decode_tiled`: seams blended over 128 pixels), so that the decoder's
        memory is that of one 512 x 512 tile; the result differs slightly from untiled decoding."""
        z = latents / self.vae.config.scaling_factor
        if self.vae.config.shift_factor is not None:
            z = z + self.vae.config.shift_factor
        z = z.astype(self.vae.decoder.conv_in.weight.dtype)
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
        image=None,
        strength=None,
        mask=None,
        mask_blur=0,
        image_noise=None,
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
        truncate_prompt=False,
        tiled_decode=None,
        callback=None,
        cancel=None,
    ):
        """Generates `num_images` PIL images for `prompt`; returns them as a list with `.seed` and `.parameters`.

        `latents`: optional initial noise (N, height/8, width/8, 4), standard normal; it is scaled by the
        sampler's initial sigma exactly as diffusers treats its `latents` argument. Image i uses seed + i.
        `image` (PIL or path): image-to-image from it; `strength` (0..1, default 0.8; 1.0 with a mask) is the
        share of the schedule that runs (diffusers: the last int(steps * strength) steps), and `latents` is
        then the noise added to the image's latents. `mask` (PIL or path, white = repaint): inpainting, with
        inpainting checkpoints (9-channel UNet) or ordinary ones; `mask_blur` blurs the mask first (pixels).
        The size defaults to the image's, rounded down to multiples of 8. `image_noise` (N, h, w, 4): the
        standard normal draw of the VAE posterior sample (default: from the seed).
        SDXL only: `original_size`, `crops_coords_top_left` and `target_size` ((height, width) pairs) set the
        size conditioning; they default to the output size and (0, 0).
        `truncate_prompt=True` cuts prompts at 75 tokens instead of encoding them in chunks.
        `tiled_decode`: decode images larger than 512 x 512 in blended tiles (see `decode`); the default, None,
        tiles when the pipeline was loaded with low_memory=True.
        `callback(step, total, latents)` is called after each step; setting the `cancel` event (e.g. a
        threading.Event, from another thread) stops at the next step with GenerationCancelled.
        """
        if self.unet is None:
            raise RuntimeError("this pipeline was unloaded; load the model again with from_pretrained")
        if mask is not None and image is None:
            raise ValueError("a mask needs an image to inpaint (image=...)")
        d = self.defaults
        if image is not None:
            image = load_image(image)
            if mask is not None:
                if not isinstance(mask, Image.Image):
                    mask = load_image(mask)  # read the file once; a PIL mask keeps its mode (see preprocess_mask)
                check_image_and_mask(image, mask)
            if width is None and height is None:
                width, height = default_size(image, self.vae_scale_factor)
        width = d.width if width is None else int(width)
        height = d.height if height is None else int(height)
        steps = d.steps if steps is None else int(steps)
        guidance_scale = d.guidance_scale if guidance_scale is None else float(guidance_scale)
        sampler = d.sampler if sampler is None else resolve_sampler(sampler)
        seed = random.randint(0, 2**32 - 1) if seed is None else int(seed)
        strength = (1.0 if mask is not None else 0.8) if strength is None else float(strength)
        self.check_settings(width, height, steps, guidance_scale, num_images)
        shape = (
            num_images,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
            self.vae.config.latent_channels,
        )
        seeds = [seed + i for i in range(num_images)]
        latents = _noise_or(latents, shape, seeds, "latents", width, height)
        scheduler = make_scheduler(sampler, self.scheduler_config)
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps

        timings = {}
        mx.reset_peak_memory()
        tic = time.perf_counter()
        inpaint = None
        if image is None:
            x = latents * scheduler.init_noise_sigma
        else:
            timesteps = _strength_timesteps(timesteps, steps, strength)
            # the VAE posterior's standard normal draw, from a stream of its own per image
            image_noise = _noise_or(image_noise, shape, [s + 2**32 for s in seeds], "image_noise", width, height)
            x, inpaint = self.prepare_image(
                image, mask, mask_blur, width, height, strength, latents, image_noise, scheduler, timesteps
            )
            mx.eval(x)
            timings["vae_encode"] = time.perf_counter() - tic

        tic = time.perf_counter()
        conditioning = self.encode_prompt(
            [prompt] * num_images, [negative_prompt] * num_images, guidance_scale, clip_skip, truncate_prompt
        )
        conditioning = self.add_size_conditioning(
            conditioning, (height, width), original_size, crops_coords_top_left, target_size
        )
        mx.eval(conditioning.embeds, conditioning.extra)
        if self.low_memory:
            self.free_text_encoders()
        timings["text_encoder"] = time.perf_counter() - tic

        tic = time.perf_counter()
        total = len(timesteps)
        denoising = self.denoise(conditioning, x, scheduler, guidance_scale, seeds, timesteps, inpaint)
        for step in range(1, total + 1):
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled(f"cancelled before step {step} of {total}")
            x = next(denoising)
            if callback is not None:
                callback(step, total, x)
        timings["denoise"] = time.perf_counter() - tic

        tic = time.perf_counter()
        images = to_pil(self.decode(x, self.low_memory if tiled_decode is None else tiled_decode))
        timings["vae"] = time.perf_counter() - tic
        parameters = dict(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            seed=seed,
            model=self.name,
            clip_skip=clip_skip,
        )
        if image is not None:
            parameters.update(strength=strength, mask_blur=mask_blur if mask is not None else None)
        return Images(images, seed, parameters, timings, mx.get_peak_memory())

    def prepare_image(self, image, mask, mask_blur, width, height, strength, noise, image_noise, scheduler, timesteps):
        """The starting latents of image-to-image / inpainting and the inpainting state (None for img2img).

        Follows diffusers' Img2Img and Inpaint pipelines: the image's VAE posterior sample (scaled) noised to
        the first remaining timestep; inpainting at strength 1 starts from pure noise.
        """
        pixels = preprocess_image(image, width, height)  # (1, H, W, 3) in [-1, 1]
        image_latents = self.encode_image(pixels, image_noise)
        if mask is None:
            return scheduler.add_noise(image_latents, noise, timesteps[:1]), None
        full_mask = preprocess_mask(mask, width, height, mask_blur)  # (1, H, W, 1) in {0, 1}
        f = self.vae_scale_factor
        latent_mask = mx.broadcast_to(full_mask[:, ::f, ::f], (*noise.shape[:3], 1))  # nearest, like F.interpolate
        masked_latents = None
        if self.unet.config.in_channels == noise.shape[-1] + 1 + noise.shape[-1]:  # an inpainting UNet
            masked_latents = self.encode_image(pixels * (full_mask < 0.5), image_noise)
        if strength == 1.0:
            x = noise * scheduler.init_noise_sigma
        else:
            x = scheduler.add_noise(image_latents, noise, timesteps[:1])
        return x, Inpainting(latent_mask, image_latents, masked_latents, noise)

    def encode_image(self, pixels, eps):
        """Pixels (1, H, W, 3) in [-1, 1] -> scaled latents of the VAE posterior sample mean + std * eps (N, ...)."""
        mean, logvar = self.vae.encode(pixels.astype(self.vae.decoder.conv_in.weight.dtype))
        sample = mean.astype(mx.float32) + mx.exp(0.5 * logvar.astype(mx.float32)) * eps
        if self.vae.config.shift_factor is not None:
            sample = sample - self.vae.config.shift_factor
        return sample * self.vae.config.scaling_factor

    def decode_preview(self, latents):
        """Cheap previews of latents (B, h, w, 4): a linear map to RGB, upscaled to the output size."""
        factors, bias = PREVIEW_FACTORS[self.family]
        rgb = latents.astype(mx.float32) @ mx.array(factors) + mx.array(bias)  # (B, h, w, 3) in about [-1, 1]
        images = to_pil(mx.clip(rgb / 2 + 0.5, 0, 1))
        size = (latents.shape[2] * self.vae_scale_factor, latents.shape[1] * self.vae_scale_factor)
        return [image.resize(size, Image.BILINEAR) for image in images]

    def check_settings(self, width, height, steps, guidance_scale, num_images):
        """Raises ValueError with a one-line explanation for settings that cannot work."""
        m = self.vae_scale_factor
        if width <= 0 or height <= 0 or width % m or height % m:
            raise ValueError(f"width and height must be positive multiples of {m}, got {width}x{height}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {guidance_scale}")
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {num_images}")

    # --- LoRAs and textual-inversion embeddings (mlx_sd.lora.Adapters) ----------------------------

    _adapters = None
    ADAPTER_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # the models LoRAs apply to

    @property
    def adapters(self):
        """The pipeline's LoRAs and embeddings, created on first use (reading the text encoders back if freed)."""
        if self.unet is None:
            raise RuntimeError("this pipeline was unloaded; load the model again with from_pretrained")
        if self._adapters is None:
            self._ensure_text_encoders()
            self._adapters = Adapters(self.family)
            self.attach_adapters()
        return self._adapters

    def attach_adapters(self):
        """Applies the LoRAs and embeddings to the components in memory; call it after (re)loading a component."""
        if self._adapters is None:
            return
        for name in self.ADAPTER_COMPONENTS:
            if getattr(self, name, None) is not None:
                self._adapters.attach(name, getattr(self, name))
        for tokenizer, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            if hasattr(self, tokenizer):
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

    def unload_textual_inversion(self, token=None):
        """Removes the embedding `token`, or all of them (None)."""
        self.adapters.unload_embedding(token)


class StableDiffusionXL(StableDiffusion):
    """SDXL base and SDXL-Turbo: two text encoders (CLIP ViT-L + OpenCLIP bigG) and size conditioning."""

    family = "sdxl"

    def __init__(
        self,
        tokenizer,
        text_encoder,
        tokenizer_2,
        text_encoder_2,
        unet,
        vae,
        scheduler_config,
        dtype=mx.float16,
        name="model",
        force_zeros_for_empty_prompt=True,
    ):
        super().__init__(tokenizer, text_encoder, unet, vae, scheduler_config, dtype, name)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @classmethod
    def _load(cls, folder, index, dtype, name, quantize=None, checkpoint=None):
        tokenizer, text_encoder = load_text_encoder(folder, "tokenizer", "text_encoder", dtype, quantize, checkpoint)
        tokenizer_2, text_encoder_2 = load_text_encoder(
            folder, "tokenizer_2", "text_encoder_2", dtype, quantize, checkpoint
        )
        unet, vae, scheduler_config = load_denoiser(folder, dtype, quantize, checkpoint)
        model = cls(
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
            unet,
            vae,
            scheduler_config,
            dtype,
            name,
            index.get("force_zeros_for_empty_prompt", True),
        )
        mx.eval(model.parameters())
        return model

    def _load_text_encoders(self, folder, dtype, quantize=None, checkpoint=None):
        super()._load_text_encoders(folder, dtype, quantize, checkpoint)
        _, self.text_encoder_2 = load_text_encoder(folder, "tokenizer_2", "text_encoder_2", dtype, quantize, checkpoint)

    def parameters(self):
        return super().parameters() + [self.text_encoder_2.parameters()]

    def encode_prompt(self, prompts, negative_prompts, guidance_scale, clip_skip=None, truncate=False):
        # diffusers' SDXL: penultimate hidden states of both encoders (no final norm) side by side, pooled from
        # the projected output of the second. clip_skip (A1111 numbering) counts back from the penultimate layer.
        self._ensure_text_encoders()
        guidance = guidance_scale > 1
        texts = [*negative_prompts, *prompts] if guidance else list(prompts)
        layer = -2 if clip_skip is None else -(clip_skip + 1)
        chunks = [chunk_texts(self.tokenizer, texts, truncate), chunk_texts(self.tokenizer_2, texts, truncate)]
        n = max(len(c) for c in chunks[0] + chunks[1])  # the two tokenizers differ on "!"
        hidden, _ = encode_chunks(self.text_encoder, chunks[0], lambda out: out.hidden_states[layer], n)
        hidden_2, pooled = encode_chunks(self.text_encoder_2, chunks[1], lambda out: out.hidden_states[layer], n)
        embeds = mx.concatenate([hidden, hidden_2], axis=-1)  # (B, 77 * n, 768 + 1280)
        if guidance and self.force_zeros_for_empty_prompt and not any(negative_prompts):
            # an empty negative prompt is zero embeddings (diffusers' force_zeros_for_empty_prompt)
            b = len(negative_prompts)
            embeds = mx.concatenate([mx.zeros_like(embeds[:b]), embeds[b:]])
            pooled = mx.concatenate([mx.zeros_like(pooled[:b]), pooled[b:]])
        return Conditioning(embeds.astype(self.dtype), guidance, {"text_embeds": pooled.astype(self.dtype)})

    def add_size_conditioning(self, conditioning, size, original_size, crops_coords_top_left, target_size):
        """Adds SDXL's six time ids: original size, crop top-left, target size (each (height, width))."""
        time_ids = [*(original_size or size), *crops_coords_top_left, *(target_size or size)]
        batch = conditioning.embeds.shape[0]
        time_ids = mx.broadcast_to(mx.array(time_ids, dtype=self.dtype), (batch, 6))
        return Conditioning(conditioning.embeds, conditioning.guidance, {**conditioning.extra, "time_ids": time_ids})


# model_index.json's `_class_name` -> the pipeline class that loads it
PIPELINES = {
    "StableDiffusionPipeline": StableDiffusion,
    "StableDiffusionXLPipeline": StableDiffusionXL,
    "StableDiffusionInpaintPipeline": StableDiffusion,
    "StableDiffusionXLInpaintPipeline": StableDiffusionXL,
}


def _noise_or(noise, shape, seeds, name, width, height):
    """`noise` checked against `shape`, or standard normal noise drawn for each image from its seed."""
    if noise is None:
        return mx.concatenate([mx.random.normal((1, *shape[1:]), key=mx.random.key(s)) for s in seeds])
    if tuple(noise.shape) != shape:
        raise ValueError(
            f"{name} must have shape {shape} for {shape[0]} image(s) of {width}x{height}, got {tuple(noise.shape)}"
        )
    return mx.array(noise, dtype=mx.float32)


def step_noise(seeds, shape):
    """Yields the noise of each sampler step (ancestral and SDE samplers): (B, *shape), image i's part drawn from
    a stream seeded by seeds[i], so that an image comes out the same whichever batch it is generated in."""
    streams = [mx.random.split(mx.random.key(seed))[1] for seed in seeds]
    while True:
        keys = [mx.random.split(stream) for stream in streams]
        streams = [k[0] for k in keys]
        yield mx.concatenate([mx.random.normal((1, *shape), key=k[1]) for k in keys])


def _strength_timesteps(timesteps, steps, strength):
    """The last int(steps * strength) timesteps (diffusers' get_timesteps); ValueError when none is left."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be between 0 and 1, got {strength}")
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ValueError(
            f"strength {strength} leaves no step of {steps}: raise strength or steps "
            f"(steps * strength must be at least 1)"
        )
    return timesteps[steps - kept :]


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
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]

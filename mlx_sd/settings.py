"""The settings of one generation: one object that the API, the CLI, PNG metadata and the server build and check
the same way. Every bound lives here: `validate()` checks what needs no model, `resolve()` fills in the model's
defaults and checks what depends on it (sizes, layers, steps, memory)."""

import dataclasses
import math
import numbers
import os
import random
import unicodedata
from dataclasses import dataclass, field, fields

from .adapter_files import extract_lora_tags
from .controlnet import a1111_units, as_specs
from .infotext import format_infotext, parse_infotext
from .prompts import parse_prompt_attention
from .schedulers import SAMPLERS, SPACINGS, a1111_names, max_steps, parse_sampler, parse_schedule

SEED_MAX = 2**64 - 1  # seeds are unsigned 64-bit; image i uses (seed + i) mod 2**64
MAX_SIDE = 8192  # pixels per side
MAX_PIXELS = 4096 * 4096  # pixels per image
MAX_IMAGES = 10_000  # images per generation / per command
MAX_PROMPT_CHARS = 20_000  # characters per prompt
MAX_CHUNKS = 32  # 75-token chunks per prompt (2,400 tokens)
MAX_GUIDANCE = 100.0
MAX_DEEP_CACHE = 100  # DeepCache interval: UNet calls per full call
MAX_MASK_BLUR = 256.0  # pixels
MAX_SIZE_CONDITIONING = 4 * MAX_SIDE  # SDXL's original / target size and crop coordinates


class SettingsError(ValueError):
    """A generation setting that cannot work; the message names it and says what is allowed."""


@dataclass
class GenerationSettings:
    """Everything that decides the images of one generation (the model and how it is loaded are not in here).

    None means "the model's default" (size, steps, guidance, sampler), "random" (seed) or "none" (images). Build it
    with keyword arguments, `from_infotext(text)`, or `replace(**changes)`; `validate()` checks it on its own,
    `resolve(model)` completes it for a loaded pipeline.
    """

    prompt: str = ""
    negative_prompt: str | None = None  # None: no negative prompt (SDXL: zero embeddings, as diffusers)
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None  # a name of `mlx-sd samplers` or its A1111 name, maybe with a schedule appended
    schedule: str | None = None  # None (the model's), karras, exponential, beta, sgm_uniform (A1111's labels too)
    timestep_spacing: str | None = None  # None (the model's), leading, linspace or trailing
    eta: float | None = None  # tcd's stochasticity (default 0.3)
    seed: int | None = None  # None or -1 (A1111): random; image i uses (seed + i) mod 2**64
    num_images: int = 1
    clip_skip: int | None = None  # A1111 numbering: 1 = last layer
    deep_cache: int | None = None  # DeepCache: the whole UNet on every N-th call only (unet.DeepCache); None, 1: all
    image: object = None  # image-to-image: a path or a PIL image
    strength: float | None = None  # default 0.8, 1.0 with a mask
    mask: object = None  # inpainting (white = repaint): a path or a PIL image
    mask_blur: float = 0.0
    original_size: tuple | None = None  # SDXL size conditioning, (height, width)
    crops_coords_top_left: tuple = (0, 0)
    target_size: tuple | None = None
    truncate_prompt: bool = False
    tiled_decode: bool | None = None  # None: tile when the pipeline has low_memory
    controlnet: object = field(default=None, repr=False)  # ControlSpecs (mlx_sd.controlnet): ControlNets and images
    latents: object = field(default=None, repr=False)  # (N, h, w, 4) initial noise, standard normal
    image_noise: object = field(default=None, repr=False)  # (N, h, w, 4) the VAE posterior sample's draw

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def validate(self):
        """Checks every setting that needs no model; returns self with the sampler's canonical name.

        Raises SettingsError naming the setting."""
        check_text("prompt", self.prompt)
        _settings_error(extract_lora_tags, self.prompt)  # <lora:NAME:WEIGHT> tags: names and weights
        if self.negative_prompt is not None:
            check_text("negative prompt", self.negative_prompt)
        for name in ("width", "height"):
            check_int(name, getattr(self, name), 8, MAX_SIDE, optional=True)
            if getattr(self, name) is not None and getattr(self, name) % 8:
                raise SettingsError(f"{name} must be a multiple of 8, got {getattr(self, name)}")
        if self.width is not None and self.height is not None and self.width * self.height > MAX_PIXELS:
            raise SettingsError(f"{self.width}x{self.height} has more than {MAX_PIXELS:,} pixels")
        check_int("steps", self.steps, 1, 1000, optional=True)
        check_real("guidance scale", self.guidance_scale, 0.0, MAX_GUIDANCE, optional=True)
        check_int("num_images", self.num_images, 1, MAX_IMAGES)
        check_int("clip skip", self.clip_skip, 1, 1000, optional=True)
        check_int("DeepCache interval", self.deep_cache, 1, MAX_DEEP_CACHE, optional=True)
        self._validate_seed()
        self._validate_image_settings()
        self._validate_size_conditioning()
        for name in ("truncate_prompt", "tiled_decode"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (name == "tiled_decode" and value is None)):
                raise SettingsError(f"{name} must be True or False, got {value!r}")
        self._validate_sampler()
        self.controlnet = _settings_error(as_specs, self.controlnet) or None
        return self

    def _validate_sampler(self):
        """Our sampler and schedule names, the schedule split off a name that carries one ("DPM++ 2M Karras")."""
        for name in ("sampler", "schedule", "timestep_spacing"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise SettingsError(f"{name} must be a name, got {getattr(self, name)!r}")
        schedule = _settings_error(parse_schedule, self.schedule)
        if self.sampler is not None:
            self.sampler, named = _settings_error(parse_sampler, self.sampler)
            if named and schedule and named != schedule:
                raise SettingsError(f"the sampler names the {named} schedule, the schedule setting {schedule}")
            schedule = named or schedule
        self.schedule = schedule
        if self.timestep_spacing is not None and self.timestep_spacing not in SPACINGS:
            raise SettingsError(f"timestep spacing must be one of {', '.join(SPACINGS)}, got {self.timestep_spacing!r}")
        check_real("eta", self.eta, 0.0, 1.0, optional=True)

    def _validate_seed(self):
        if self.seed is None:
            return
        check_int("seed", self.seed, -1, SEED_MAX)
        if self.seed == -1:  # A1111: random
            self.seed = None

    def _validate_image_settings(self):
        if self.mask is not None and self.image is None:
            raise SettingsError("a mask needs an image to inpaint (image / --image)")
        if self.strength is not None and self.image is None:
            raise SettingsError("strength applies to image-to-image: give an image (image / --image) or leave it out")
        check_real("strength", self.strength, 0.0, 1.0, optional=True)
        check_real("mask blur", self.mask_blur, 0.0, MAX_MASK_BLUR)

    def _validate_size_conditioning(self):
        for name in ("original_size", "crops_coords_top_left", "target_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise SettingsError(f"{name} must be a (height, width) pair, got {value!r}")
            for v in value:
                check_int(name, v, 0 if name == "crops_coords_top_left" else 1, MAX_SIZE_CONDITIONING)

    def resolve(self, model):
        """A complete copy for a loaded pipeline (`model`: a ModelLimits): defaults filled in, a random seed
        drawn, and the checks that depend on the model. Images are loaded by the pipeline, not here."""
        s = dataclasses.replace(self).validate()
        d = model.defaults
        if s.width is None and s.height is None and (s.image is not None or s.controlnet):
            # the input image's size, else the first control image's (diffusers)
            s.width, s.height = model.image_size(s.image if s.image is not None else s.controlnet[0].image)
        s.width = d.width if s.width is None else s.width
        s.height = d.height if s.height is None else s.height
        s.steps = d.steps if s.steps is None else s.steps
        s.guidance_scale = d.guidance_scale if s.guidance_scale is None else float(s.guidance_scale)
        if s.sampler is None:  # the model's sampler, and its schedule unless one was asked for
            s.sampler, schedule = parse_sampler(d.sampler)
            s.schedule = s.schedule or schedule
        s.seed = random.randint(0, 2**32 - 1) if s.seed is None else s.seed
        if s.image is not None and s.strength is None:
            s.strength = 1.0 if s.mask is not None else 0.8
        s._check_for(model)
        return s

    def _check_for(self, model):
        for name, text in (("prompt", self.prompt), ("negative prompt", self.negative_prompt or "")):
            chunks = 1 if self.truncate_prompt else model.prompt_chunks(text)
            if chunks > MAX_CHUNKS:
                raise SettingsError(f"{name} is {chunks} chunks of 75 tokens long; at most {MAX_CHUNKS} are allowed")
        f = model.vae_scale_factor
        if self.width % f or self.height % f:
            raise SettingsError(f"width and height must be multiples of {f}, got {self.width}x{self.height}")
        if self.width * self.height > MAX_PIXELS:
            raise SettingsError(f"{self.width}x{self.height} has more than {MAX_PIXELS:,} pixels")
        if self.clip_skip is not None and self.clip_skip > model.clip_layers:
            raise SettingsError(f"clip skip must be at most {model.clip_layers} for this model, got {self.clip_skip}")
        if self.image is not None and int(self.steps * self.strength) < 1:
            raise SettingsError(
                f"strength {self.strength:g} leaves no step of {self.steps}: raise strength or steps "
                f"(steps * strength must be at least 1)"
            )
        self._check_noise(model)
        if self.eta is not None and "eta" not in SAMPLERS[self.sampler].cls.defaults:
            raise SettingsError(f"eta applies to the tcd sampler, not {self.sampler}")
        limit = _settings_error(max_steps, self.sampler, model.scheduler_config, self.schedule, self.timestep_spacing)
        if self.steps > limit:
            raise SettingsError(f"steps must be at most {limit} for the {self.sampler} sampler, got {self.steps}")
        sized = self.original_size is not None or self.target_size is not None
        if (sized or tuple(self.crops_coords_top_left) != (0, 0)) and not model.size_conditioning:
            raise SettingsError("original_size, crops_coords_top_left and target_size apply to SDXL models only")
        check_memory(model, self)

    def _check_noise(self, model):
        f = model.vae_scale_factor
        shape = (self.num_images, self.height // f, self.width // f, model.latent_channels)
        for name in ("latents", "image_noise"):
            value = getattr(self, name)
            if value is not None and tuple(getattr(value, "shape", ())) != shape:
                raise SettingsError(
                    f"{name} must have shape {shape} for {self.num_images} image(s) of {self.width}x{self.height}, "
                    f"got {getattr(value, 'shape', type(value).__name__)}"
                )

    @property
    def seeds(self):
        """The seed of each image: (seed + i) mod 2**64."""
        return [image_seed(self.seed, i) for i in range(self.num_images)]

    # --- A1111 infotext ---------------------------------------------------------------------------------------

    def to_infotext(self, model_name, extra=()):
        """The A1111 `parameters` text of these (resolved) settings, with `extra` [(key, value)] entries."""
        values = [(key, fmt(self, model_name)) for key, fmt, _ in INFOTEXT] + list(extra)
        values += list(a1111_units([spec.settings() for spec in self.controlnet or []]).items())
        return format_infotext(self.prompt, self.negative_prompt, [(k, v) for k, v in values if v is not None])

    @classmethod
    def from_infotext(cls, text, source="parameters"):
        """(settings, model name or None) from an A1111 `parameters` text; `source` names it in errors.

        The settings are not validated yet: a caller that drops some (an infotext's `Denoising strength` without
        the image it applied to) or adds its own validates them."""
        prompt, negative, values = parse_infotext(text)
        settings = {"prompt": prompt, "negative_prompt": negative}
        try:
            for key, _, parse in INFOTEXT:
                if key in values and parse is not None:
                    settings.update(parse(values[key], values))
        except (ValueError, TypeError) as e:
            raise SettingsError(f"{source}: unreadable parameters ({e})") from None
        return cls(**settings), values.get("Model")


def _parse_size(value, _):
    width, height = (int(v) for v in value.split("x"))
    return {"width": width, "height": height}


def _parse_sampler(value, values):
    """A1111 1.9+ writes the schedule separately ("Schedule type: Karras"); older infotexts in the name."""
    return {"sampler": value, "schedule": values.get("Schedule type")}


# A1111 infotext key, format(settings, model name) -> str or None (left out), parse(value, all values) -> fields;
# in A1111's order
INFOTEXT = [
    ("Steps", lambda s, _: str(s.steps), lambda v, _: {"steps": int(v)}),
    ("Sampler", lambda s, _: a1111_names(s.sampler, s.schedule)[0], _parse_sampler),
    ("Schedule type", lambda s, _: a1111_names(s.sampler, s.schedule)[1], None),
    ("Timestep spacing", lambda s, _: s.timestep_spacing, lambda v, _: {"timestep_spacing": v}),
    ("Eta", lambda s, _: None if s.eta is None else f"{s.eta:g}", lambda v, _: {"eta": float(v)}),
    ("CFG scale", lambda s, _: f"{s.guidance_scale:g}", lambda v, _: {"guidance_scale": float(v)}),
    ("Seed", lambda s, _: str(s.seed), lambda v, _: {"seed": int(v)}),
    ("Size", lambda s, _: f"{s.width}x{s.height}", _parse_size),
    ("Model", lambda _, model: model, None),
    ("Clip skip", lambda s, _: None if s.clip_skip is None else str(s.clip_skip), lambda v, _: {"clip_skip": int(v)}),
    (
        "DeepCache interval",
        lambda s, _: str(s.deep_cache) if s.deep_cache and s.deep_cache > 1 else None,
        lambda v, _: {"deep_cache": int(v)},
    ),
    (
        "Denoising strength",
        lambda s, _: None if s.image is None else f"{s.strength:g}",
        lambda v, _: {"strength": float(v)},
    ),
    (
        "Mask blur",
        lambda s, _: f"{s.mask_blur:g}" if s.mask is not None and s.mask_blur else None,
        lambda v, _: {"mask_blur": float(v)},
    ),
]
FIELDS = [f.name for f in fields(GenerationSettings)]


@dataclass
class ModelLimits:
    """What resolve() needs to know of a loaded pipeline."""

    defaults: object  # pipeline.Defaults
    vae_scale_factor: int
    latent_channels: int
    clip_layers: int  # hidden layers of the (smallest) text encoder: the largest clip skip
    scheduler_config: dict
    size_conditioning: bool  # SDXL
    image_size: object  # image -> (width, height) default output size
    prompt_chunks: object  # prompt -> the number of 75-token chunks it is encoded in
    memory_needed: object  # (settings) -> bytes a generation needs at its peak


def image_seed(seed, index):
    """The seed of image `index` of a generation: (seed + index) mod 2**64, so it stays a valid seed."""
    return (seed + index) % 2**64


def check_int(name, value, low, high, optional=False):
    """An int (not a bool, float or string) in [low, high]."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SettingsError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise SettingsError(f"{name} must be between {low} and {high}, got {value}")


def check_real(name, value, low, high, optional=False):
    """A finite real number (not a bool or string) in [low, high]."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingsError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        raise SettingsError(f"{name} must be a finite number between {low:g} and {high:g}, got {value}")


def check_text(name, text):
    """A prompt: a string of at most MAX_PROMPT_CHARS characters without control characters (newlines and tabs
    are allowed), whose attention weights are finite."""
    if not isinstance(text, str):
        raise SettingsError(f"{name} must be a string, got {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise SettingsError(f"{name} is {len(text):,} characters long; at most {MAX_PROMPT_CHARS:,} are allowed")
    for i, c in enumerate(text):
        if c not in "\t\n\r" and unicodedata.category(c) == "Cc":
            raise SettingsError(f"{name} contains the control character U+{ord(c):04X} at position {i}")
    _settings_error(parse_prompt_attention, text)


def check_memory(model, settings):
    """Refuses a generation that needs more memory than this machine has (a rough estimate, not a guarantee)."""
    needed = model.memory_needed(settings)
    available = physical_memory()
    if available and needed > available:
        raise SettingsError(
            f"{settings.width}x{settings.height} x {settings.num_images} image(s) needs about {needed / 2**30:.1f} "
            f"GiB; this machine has {available / 2**30:.1f} GiB (try a smaller size or batch, or low_memory)"
        )


def physical_memory():
    """Bytes of memory of this machine (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _settings_error(function, *args):
    """function(*args), with its ValueError turned into a SettingsError."""
    try:
        return function(*args)
    except SettingsError:
        raise
    except ValueError as e:
        raise SettingsError(str(e)) from None

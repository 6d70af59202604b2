"""diffusers' ControlNetModel (SD 1.x, SD 2.x, SDXL) in MLX, NHWC, and what a generation needs to use it.

The model reuses the UNet's down and mid blocks (mlx_sd/unet.py); its own parts are the conditioning embedding
(control image -> latent-size features), the zero convolutions on every skip (`controlnet_down_blocks`) and on the
mid block (`controlnet_mid_block`). Loading: diffusers folders, Hub ids, folders written by `convert_controlnet`,
and single `.safetensors` files with A1111/LDM keys (`control_model.input_blocks...`) or diffusers keys.

Reference: diffusers/models/controlnets/controlnet.py, pipelines/controlnet/pipeline_controlnet.py
(prepare_image, controlnet_keep, guess mode), models/controlnets/multicontrolnet.py (summed residuals) and
loaders/single_file_utils.py (convert_controlnet_checkpoint), diffusers 0.42.1.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .activations import silu
from .hub import resolve_model
from .images import RESAMPLE, load_image
from .quantize import QUANTIZE_BITS, quantize_model, rebuild_quantized
from .single_file import _unet as ldm_unet_to_diffusers
from .unet import TimestepEmbedding, UNetConfig, UNetMidBlock2DCrossAttn, down_blocks, timestep_embedding
from .unet import sanitize as sanitize_unet
from .weights import (
    MANIFEST,
    MLX_WEIGHTS,
    ModelLoadError,
    evaluate_one_by_one,
    is_converted,
    load_strict,
    read_converted,
    read_json,
    read_safetensors,
    refuse_pickle,
    safetensors_header,
)

CONFIGS = Path(__file__).parent / "assets" / "configs"  # <family>/controlnet/config.json for single files
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# A ControlNet repo or folder: its config and safetensors weights (diffusers or converted), nothing else.
HUB_PATTERNS = [
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model-*.safetensors",
    MANIFEST,
    MLX_WEIGHTS,
]
QUANTIZE_GROUP_SIZE = 64
PREPROCESSORS = ("none", "canny")
MAX_SCALE = 10.0


# --- the model ---------------------------------------------------------------------------------


@dataclass
class ControlNetConfig(UNetConfig):
    """The UNet fields the shared down/mid blocks read, plus the ControlNet's own."""

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False

    @classmethod
    def from_dict(cls, d):
        """Builds the config from the ControlNet's config.json; ValueError for what this model does not implement."""
        name = d.get("_class_name", "ControlNetModel")
        if name != "ControlNetModel" or "num_control_type" in d:
            raise ValueError(
                f"unsupported ControlNet class {name!r}{' (ControlNet-Union)' if 'num_control_type' in d else ''}: "
                "mlx_sd supports diffusers' ControlNetModel"
            )
        order = d.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise ValueError(f"unsupported ControlNet config: controlnet_conditioning_channel_order={order!r}")
        hint = d.get("conditioning_embedding_out_channels") or cls.conditioning_embedding_out_channels
        channels = d.get("conditioning_channels", 3)
        if not (
            hint and all(isinstance(c, int) and c > 0 for c in hint) and isinstance(channels, int) and channels > 0
        ):
            raise ValueError(f"unsupported ControlNet config: conditioning channels {channels!r}, embedding {hint!r}")
        # the shared UNet config wants up blocks, which a ControlNet has none of: mirror the down blocks
        down = d.get("down_block_types", UNetConfig().down_block_types)
        up = [t.replace("Down", "Up") for t in reversed(down)]
        base = UNetConfig.from_dict({**d, "up_block_types": up})
        return cls(
            **vars(base),
            conditioning_channels=channels,
            conditioning_embedding_out_channels=tuple(hint),
            controlnet_conditioning_channel_order=order,
            global_pool_conditions=bool(d.get("global_pool_conditions", False)),
        )


class ControlNetConditioningEmbedding(nn.Module):
    """Control image (B, H, W, C) -> features at latent size (B, H/8, W/8, block_out_channels[0])."""

    def __init__(self, out_channels, in_channels, channels):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1)

    def __call__(self, x):
        x = silu(self.conv_in(x))
        for block in self.blocks:
            x = silu(block(x))
        return self.conv_out(x)


def skip_channels(config):
    """The channels of the UNet's skip connections, in order: conv_in, then each down block's resnets and
    downsampler. A ControlNet gives one residual per skip."""
    channels = [config.block_out_channels[0]]
    n = len(config.block_out_channels)
    for i, c in enumerate(config.block_out_channels):
        channels += [c] * (config.layers_per_block[i] + (1 if i < n - 1 else 0))
    return channels


class ControlNetModel(nn.Module):
    """The UNet's encoder half with a control image added after conv_in; returns one residual per UNet skip
    connection and one for the mid block."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        temb_channels = 4 * channels[0]
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels)
        if config.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb_channels)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            channels[0], config.conditioning_channels, config.conditioning_embedding_out_channels
        )
        self.down_blocks = down_blocks(config, temb_channels)
        self.controlnet_down_blocks = [nn.Conv2d(c, c, kernel_size=1) for c in skip_channels(config)]
        self.mid_block = UNetMidBlock2DCrossAttn(config, temb_channels)
        self.controlnet_mid_block = nn.Conv2d(channels[-1], channels[-1], kernel_size=1)

    def embed_control(self, controlnet_cond):
        """The control image (B, 8h, 8w, C) in [0, 1] through the conditioning embedding: (B, h, w, channels).
        It depends on the image alone, so a generation makes it once (prepare_controls), not at every step: SD 1.5's
        at 512 x 512 took 1.1 s per guided step on the CPU (x86, 2 cores; 2.0 s with nn.silu)."""
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]
        return self.controlnet_cond_embedding(controlnet_cond)

    def _embedding(self, dtype, batch, timestep, text_embeds, time_ids):
        """The time embedding (+ SDXL's text_time embedding), as UNet2DConditionModel computes it."""
        config = self.config
        timesteps = mx.broadcast_to(mx.array(timestep).astype(mx.float32), (batch,))
        t_emb = timestep_embedding(timesteps, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
        emb = self.time_embedding(t_emb.astype(dtype))
        if config.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError(
                    "this ControlNet (addition_embed_type 'text_time', SDXL) needs text_embeds and time_ids"
                )
            time_embeds = timestep_embedding(
                time_ids.reshape(-1), config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift
            ).reshape(batch, -1)  # (B, 6 * addition_time_embed_dim)
            add_embeds = mx.concatenate([text_embeds, time_embeds], axis=-1).astype(emb.dtype)
            emb = emb + self.add_embedding(add_embeds)
        return emb

    def __call__(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        controlnet_cond,
        conditioning_scale=1.0,
        guess_mode=False,
        text_embeds=None,
        time_ids=None,
        cond_features=None,
    ):
        """sample (B, h, w, 4), controlnet_cond (B, 8h, 8w, C) in [0, 1] -> (residuals per skip, mid residual).

        guess_mode scales the residuals from 0.1 (first skip) to 1.0 (mid block) on a log scale; a
        global_pool_conditions ControlNet (shuffle) averages them over height and width. cond_features:
        embed_control(controlnet_cond) where already made (then controlnet_cond is not read)."""
        config = self.config
        emb = self._embedding(sample.dtype, sample.shape[0], timestep, text_embeds, time_ids)
        if cond_features is None:
            cond_features = self.embed_control(controlnet_cond)
        x = self.conv_in(sample) + cond_features
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, emb, encoder_hidden_states)
            skips.extend(states)
        x = self.mid_block(x, emb, encoder_hidden_states)

        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        if guess_mode and not config.global_pool_conditions:
            # torch.logspace(-1, 0, len(down) + 1) * conditioning_scale
            scales = (10.0 ** np.linspace(-1, 0, len(down) + 1)).astype(np.float32) * np.float32(conditioning_scale)
            down = [d * float(s) for d, s in zip(down, scales)]
            mid = mid * float(scales[-1])
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if config.global_pool_conditions:
            down = [mx.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid = mx.mean(mid, axis=(1, 2), keepdims=True)
        return down, mid


def sanitize(weights):
    """diffusers ControlNet weights -> this model's layout: conv kernels OIHW -> OHWI, as the UNet's."""
    return sanitize_unet(weights)


def controlnet_family(config):
    """ "sd1", "sd2" or "sdxl" for a UNet or ControlNet config (cross-attention width, SDXL's text_time), else None."""
    width = config.cross_attention_dim[0]
    if config.addition_embed_type == "text_time":
        return "sdxl" if width == 2048 else None
    return {768: "sd1", 1024: "sd2"}.get(width)


def check_compatible(model, unet_config, name="ControlNet"):
    """ModelLoadError unless `model`'s residuals fit the UNet of `unet_config` (same family and layout)."""
    cn, unet = model.config, unet_config

    def describe(c):
        text_time = ", text_time" if c.addition_embed_type == "text_time" else ""
        return f"{controlnet_family(c) or 'an unknown family'} (cross-attention {c.cross_attention_dim[0]}{text_time})"

    if (cn.cross_attention_dim[0], cn.addition_embed_type) != (unet.cross_attention_dim[0], unet.addition_embed_type):
        raise ModelLoadError(
            f"{name} is for {describe(cn)} but the model is {describe(unet)}: use a ControlNet made for the model"
        )
    if skip_channels(cn) != skip_channels(unet):
        raise ModelLoadError(
            f"{name} does not fit the model's UNet: its residuals have channels {skip_channels(cn)}, "
            f"the UNet's skip connections {skip_channels(unet)}"
        )


# --- single-file checkpoints ---------------------------------------------------------------------

LDM_PREFIX = "control_model."
UNION_KEYS = ("task_embedding", "control_add_embedding", "transformer_layes", "spatial_ch_projs")


def ldm_to_diffusers(weights):
    """A1111/LDM ControlNet keys (convert_controlnet_checkpoint) -> diffusers keys, PyTorch layouts kept.

    With the `control_model.` prefix (the A1111 files) the keys without it are ignored, as diffusers does; every
    key under it must map. The UNet-like part (input_blocks, middle_block, time_embed, label_emb) is mapped as
    the UNet's; input_hint_block (convs at even indices), zero_convs and middle_block_out are the ControlNet's."""
    prefix = LDM_PREFIX if any(k.startswith(LDM_PREFIX) for k in weights) else ""
    weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    hint = sorted({int(m[1]) for k in weights if (m := re.match(r"input_hint_block\.(\d+)\.", k))})
    own, rest, unknown = {}, {}, []
    for key, value in weights.items():
        module, _, param = key.rpartition(".")
        if m := re.fullmatch(r"input_hint_block\.(\d+)", module):
            new = _hint_module(int(m[1]), hint[-1])
        elif m := re.fullmatch(r"zero_convs\.(\d+)\.0", module):
            new = f"controlnet_down_blocks.{m[1]}"
        elif module == "middle_block_out.0":
            new = "controlnet_mid_block"
        else:
            rest[key] = value
            continue
        if new is None or param not in ("weight", "bias"):
            unknown.append(key)
        else:
            own[f"{new}.{param}"] = value
    unet, rejected = ldm_unet_to_diffusers(rest, None)
    unknown += rejected
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ValueError(f"unrecognised ControlNet keys: {', '.join(prefix + k for k in sorted(unknown)[:5])}{more}")
    return {**unet, **own}


def _hint_module(i, last):
    """input_hint_block.i (Conv2d, SiLU, Conv2d, SiLU, ..., Conv2d) -> the conditioning embedding's conv."""
    if i == 0:
        return "controlnet_cond_embedding.conv_in"
    if i == last:
        return "controlnet_cond_embedding.conv_out"
    return f"controlnet_cond_embedding.blocks.{i // 2 - 1}" if i % 2 == 0 else None


def single_file_config(weights):
    """The bundled config of the family of diffusers-named ControlNet `weights`, with the counts that differ between
    the ControlNets of one family read from the weights (the SDXL full / mid / small transformer depths, the
    conditioning channels); strict loading checks the rest."""
    attn = next((v for k, v in weights.items() if k.endswith("attn2.to_k.weight")), None)
    width = None if attn is None else attn.shape[-1]
    xl = "add_embedding.linear_1.weight" in weights
    family = "sdxl" if xl and width == 2048 else None if xl else {768: "sd1", 1024: "sd2"}.get(width)
    if family is None:
        raise ValueError(
            f"a ControlNet with cross-attention width {width}{' and SDXL embeddings' if xl else ''}: not for SD 1.x "
            "(768), SD 2.x (1024) or SDXL (2048); pass its diffusers folder instead"
        )
    config = read_json(CONFIGS / family / "controlnet" / "config.json")
    depths = list(ControlNetConfig.from_dict(config).transformer_layers_per_block)
    for i in range(len(depths)):
        blocks = [
            int(m[1])
            for k in weights
            if (m := re.match(rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.", k))
        ]
        if any(k.startswith(f"down_blocks.{i}.attentions.0.") for k in weights):
            depths[i] = max(blocks, default=-1) + 1
    conv_in = weights["controlnet_cond_embedding.conv_in.weight"]  # (out, in, 3, 3)
    strided = {
        int(m[1]): v
        for k, v in weights.items()
        if (m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight", k))
    }
    config.update(
        transformer_layers_per_block=depths,
        conditioning_channels=conv_in.shape[1],
        # the out channels of conv_in and of each stride-2 conv (the odd blocks)
        conditioning_embedding_out_channels=[conv_in.shape[0]]
        + [strided[i].shape[0] for i in sorted(strided) if i % 2],
    )
    return config


def read_single_file(path):
    """The diffusers-named weights of a single-file ControlNet with A1111/LDM or diffusers keys."""
    try:
        weights = mx.load(str(path), format="safetensors")
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not read {path}: not a valid safetensors file ({reason})") from None
    try:
        if any(k.startswith(UNION_KEYS) for k in weights):
            raise ValueError("a ControlNet-Union checkpoint: mlx_sd supports diffusers' ControlNetModel only")
        if "controlnet_cond_embedding.conv_in.weight" not in weights:
            if not any(re.match(r"(control_model\.)?input_hint_block\.0\.weight$", k) for k in weights):
                found = ", ".join(sorted({k.split(".")[0] for k in weights})[:8]) or "nothing"
                raise ValueError(
                    "not a ControlNet checkpoint: expected control_model.* (A1111/LDM) or controlnet_cond_embedding.* "
                    f"(diffusers) keys; found top-level names {found}"
                )
            weights = ldm_to_diffusers(weights)
        return weights
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None


# --- loading and converting --------------------------------------------------------------------------


def _dtype(dtype):
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _folder(name_or_path, patterns):
    """The folder holding a ControlNet's config.json: a folder, Hub id, or a ControlNet pipeline's controlnet/."""
    folder = resolve_model(name_or_path, patterns)
    if (folder / "controlnet" / "config.json").is_file():
        folder = folder / "controlnet"
    if not (folder / "config.json").is_file():
        what = "a pipeline without a controlnet/" if (folder / "model_index.json").is_file() else "no config.json"
        raise ModelLoadError(f"{name_or_path} is not a ControlNet: {what}")
    return folder


def _open(name_or_path, config=None):
    """(config dict, weights in MLX layout, quantization entry or None) of a ControlNet file, folder or Hub id;
    `config` (a config.json, or a folder or Hub id holding one) gives a single file's config."""
    path = Path(name_or_path).expanduser()
    refuse_pickle(path)
    if path.suffix.lower() == ".safetensors" and not path.is_dir():
        if not path.is_file():
            raise ModelLoadError(f"ControlNet {name_or_path}: no such file")
        weights = read_single_file(path)
        if config is None:
            try:
                return single_file_config(weights), sanitize(weights), None
            except ValueError as e:
                raise ModelLoadError(f"{path}: {e}") from None
        json_file = Path(config).expanduser()
        if json_file.suffix.lower() != ".json":
            json_file = _folder(config, ["config.json"]) / "config.json"
        return read_json(json_file), sanitize(weights), None
    if config is not None:
        raise ValueError("config= applies to single-file ControlNets only; a ControlNet folder has its config")
    folder = _folder(name_or_path, HUB_PATTERNS)
    config = read_json(folder / "config.json")
    if is_converted(folder):
        return config, read_converted(folder), config.get("quantization")
    return config, sanitize(read_safetensors(folder)), None


def load_controlnet(name_or_path, dtype="float16", quantize=None, config=None):
    """A ControlNetModel from a diffusers folder or Hub repo id (config.json + diffusion_pytorch_model.safetensors),
    a folder written by `mlx-sd convert`, or a single `.safetensors` file (A1111/LDM or diffusers keys) whose
    config is `config` (a config.json, or a diffusers ControlNet folder or Hub id) or else the bundled one of its
    family. Weights load strictly in `dtype`; quantize=4 or 8 quantizes the Linear layers while loading.
    `model.name` is the source's name (for metadata)."""
    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise ValueError(f"quantize must be one of {QUANTIZE_BITS} (bits), got {quantize!r}")
    model, _, quantization = open_controlnet(name_or_path, _dtype(dtype), config)
    if quantization and quantize:
        raise ModelLoadError(f"{name_or_path} is already quantized; load it without quantize")
    if quantize:
        quantize_model(model, quantize, QUANTIZE_GROUP_SIZE)
        mx.eval(model.parameters())
    return model


def open_controlnet(name_or_path, dtype, config=None):
    """(model, its config dict without a quantization entry, the quantization it was stored with or None)."""
    config, weights, quantization = _open(name_or_path, config)
    model = _build(config, weights, quantization, dtype, name_or_path)
    return model, {k: v for k, v in config.items() if k != "quantization"}, quantization


def _build(config, weights, quantization, dtype, name):
    """The model of `config` with `weights` loaded strictly (quantized layers rebuilt first), evaluated."""
    try:
        model = ControlNetModel(ControlNetConfig.from_dict(config))
    except ValueError as e:
        raise ModelLoadError(f"ControlNet {name}: {e}") from None
    if quantization:
        rebuild_quantized(model, weights, quantization, "controlnet")
    load_strict(model, weights, "controlnet", dtype)
    del weights
    evaluate_one_by_one(model)
    model.name = Path(str(name)).stem if str(name).lower().endswith(".safetensors") else str(name)
    return model


CONTROLNET_PROBE = ["config.json", "model_index.json", MANIFEST]  # what is_controlnet fetches of a Hub id


def is_controlnet(source):
    """True when `source` (file, folder or Hub id) is a ControlNet rather than a Stable Diffusion pipeline: a
    config.json of class ControlNetModel, or a single file with ControlNet keys. A Hub id costs the download of its
    config files only (CONTROLNET_PROBE); anything else, or what cannot be read, is not a ControlNet (the caller
    reports what is wrong with it)."""
    path = Path(source).expanduser()
    refuse_pickle(path)
    if path.suffix.lower() == ".safetensors" and path.is_file():
        keys = safetensors_header(path).keys()  # the header only, bounded and checked
        return any(re.match(r"(control_model\.)?input_hint_block\.|controlnet_cond_embedding\.", k) for k in keys)
    if path.exists() and not path.is_dir():
        return False
    try:
        folder = path if path.is_dir() else resolve_model(source, CONTROLNET_PROBE)
    except ModelLoadError:
        return False
    config = folder / "config.json"
    return config.is_file() and read_json(config).get("_class_name") == "ControlNetModel"


# --- using ControlNets in a generation ---------------------------------------------------------------


@dataclass
class ControlSpec:
    """One ControlNet for generate(controlnet=[...]): the model, its control image (PIL or path), the scale of its
    residuals (diffusers' controlnet_conditioning_scale), and the share of the steps it acts on, from `start` to
    `end` (control_guidance_start / _end). guess_mode: the ControlNet sees the positive prompt's half of the batch
    only and its residuals are scaled 0.1 -> 1.0 from the first skip to the mid block (diffusers' guess_mode).
    preprocess="canny" turns the image into its Canny edges first (thresholds: low, high; needs opencv)."""

    model: ControlNetModel
    image: object
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    preprocess: str = "none"
    thresholds: tuple = (100, 200)

    def __post_init__(self):
        if not isinstance(self.model, ControlNetModel):
            raise ValueError(f"ControlSpec.model must be a ControlNetModel (load_controlnet), got {type(self.model)}")
        self.scale, self.start, self.end = float(self.scale), float(self.start), float(self.end)
        if not (math.isfinite(self.scale) and 0 <= self.scale <= MAX_SCALE):
            raise ValueError(f"control scale must be between 0 and {MAX_SCALE:g}, got {self.scale}")
        if not (0 <= self.start < self.end <= 1):
            raise ValueError(f"control start and end must satisfy 0 <= start < end <= 1, got {self.start}, {self.end}")
        self.preprocess = self.preprocess or "none"
        if self.preprocess not in PREPROCESSORS:
            raise ValueError(
                f"unknown control preprocessor {self.preprocess!r}; choose one of: {', '.join(PREPROCESSORS)}"
            )
        low, high = self.thresholds
        if not (0 <= low <= high <= 255):
            raise ValueError(f"canny thresholds must satisfy 0 <= low <= high <= 255, got {low}, {high}")

    def settings(self):
        """The spec's settings for generation metadata."""
        settings = dict(model=self.model.name, scale=self.scale, start=self.start, end=self.end)
        if self.guess_mode:
            settings["guess_mode"] = True
        if self.preprocess != "none":
            settings.update(preprocess=self.preprocess, thresholds=list(self.thresholds))
        return settings


@dataclass
class Control:
    """A ControlSpec prepared for one generation: its control image's features as the batch the ControlNet takes."""

    model: ControlNetModel
    features: mx.array  # the control image through model.embed_control, (B or 2B, h, w, channels): 2B (negative,
    # positive) with guidance, unless guess_mode
    scale: float
    start: float
    end: float
    guess_mode: bool


def canny(image, low=100, high=200):
    """The Canny edges of `image` (PIL or path) as a white-on-black RGB PIL image (cv2.Canny, as diffusers' and
    A1111's canny preprocessors). Needs opencv: pip install "mlx_sd[controlnet]"."""
    try:
        import cv2
    except ImportError:
        raise ImportError('the canny preprocessor needs opencv: pip install "mlx_sd[controlnet]"') from None
    from PIL import Image

    edges = cv2.Canny(np.asarray(load_image(image)), int(low), int(high))  # (H, W) uint8, 0 or 255
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def preprocess_control(image, width, height):
    """PIL image or path -> (1, height, width, 3) float32 in [0, 1]: diffusers' control image processor
    (VaeImageProcessor(do_convert_rgb=True, do_normalize=False)): RGB, Lanczos resize to the output size."""
    image = load_image(image).resize((width, height), resample=RESAMPLE)
    return mx.array(np.asarray(image).astype(np.float32)[None] / 255.0)


def as_specs(controlnet):
    """generate()'s `controlnet` argument (None, a ControlSpec or a list of them) as a list of ControlSpecs."""
    specs = [] if controlnet is None else [controlnet] if isinstance(controlnet, ControlSpec) else list(controlnet)
    for spec in specs:
        if not isinstance(spec, ControlSpec):
            raise ValueError(f"controlnet entries must be ControlSpec objects, got {type(spec).__name__}")
    return specs


def prepare_controls(specs, unet_config, width, height, num_images, guidance, dtype):
    """The Controls of `specs` (ControlSpecs) for a generation of `num_images` images of width x height: each
    ControlNet checked against the pipeline's UNet, its image preprocessed, resized and repeated for the batch
    (StableDiffusionControlNetPipeline.prepare_image), through the conditioning embedding once (embed_control) and
    repeated."""
    controls = []
    for i, spec in enumerate(specs):
        check_compatible(spec.model, unet_config, f"ControlNet {i + 1} ({spec.model.name})")
        image = spec.image
        if spec.preprocess == "canny":
            image = canny(image, *spec.thresholds)
        pixels = preprocess_control(image, width, height).astype(dtype)  # (1, H, W, 3)
        guess = spec.guess_mode or spec.model.config.global_pool_conditions
        features = mx.repeat(spec.model.embed_control(pixels), num_images * (2 if guidance and not guess else 1), 0)
        mx.eval(features)
        controls.append(Control(spec.model, features, spec.scale, spec.start, spec.end, guess))
    return controls


def control_residuals(controls, x, t, conditioning, step, total):
    """The UNet's extra arguments for one call: the residuals of every ControlNet active at `step` (0-based) of
    `total`, summed (MultiControlNetModel), as {"down_residuals": [...], "mid_residual": ...}; {} when none is.

    x: the UNet's scaled latent input (2B with guidance: negative half first), without inpainting channels;
    conditioning: the pipeline's Conditioning (embeds, guidance, SDXL's text_embeds / time_ids). A ControlNet acts
    where diffusers' controlnet_keep is 1: not before `start` nor after `end` of the steps."""
    down, mid = None, None
    for c in controls:
        keep = not (step / total < c.start or (step + 1) / total > c.end)
        if not keep or c.scale == 0:  # diffusers runs it with scale 0: its residuals would add exact zeros
            continue
        sample, embeds, extra = x, conditioning.embeds, conditioning.extra
        halve = c.guess_mode and conditioning.guidance
        if halve:  # the positive prompt's half only; the negative half gets zeros
            n = x.shape[0] // 2
            sample, embeds, extra = x[n:], embeds[n:], {k: v[n:] for k, v in extra.items()}
        d, m = c.model(sample, t, embeds, None, c.scale, c.guess_mode, **extra, cond_features=c.features)
        if halve:
            d, m = [mx.concatenate([mx.zeros_like(r), r]) for r in d], mx.concatenate([mx.zeros_like(m), m])
        down = d if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    if down is None:
        return {}
    # evaluated before the UNet runs, so that the ControlNets' activations are freed before the UNet's are made:
    # lazily, both would be alive together (measured: 1.03 GiB more peak at 512 x 512 for SD 1.5, float32)
    mx.eval(down, mid)
    return {"down_residuals": down, "mid_residual": mid}


def a1111_units(settings):
    """A1111 ControlNet extension infotext entries for generate()'s parameters["controlnet"] (ControlSpec.settings
    dicts): {"ControlNet 0": "Module: canny, Model: ..., Weight: 1, ...", ...}. The control image is stretched to
    the output size (A1111's "Just Resize"); guess mode is written as "ControlNet is more important", the
    extension's nearest control mode."""
    units = {}
    for i, s in enumerate(settings):
        fields = [f"Module: {s.get('preprocess', 'none')}", f"Model: {s['model']}", f"Weight: {s['scale']:g}"]
        fields += ["Resize Mode: Just Resize", "Low Vram: False"]
        if s.get("preprocess") == "canny":
            fields += [f"Threshold A: {s['thresholds'][0]:g}", f"Threshold B: {s['thresholds'][1]:g}"]
        mode = "ControlNet is more important" if s.get("guess_mode") else "Balanced"
        fields += [f"Guidance Start: {s['start']:g}", f"Guidance End: {s['end']:g}", "Pixel Perfect: False"]
        units[f"ControlNet {i}"] = ", ".join([*fields, f"Control Mode: {mode}"])
    return units


def pair_control_options(models, images, scales=(), starts=(), ends=(), preprocess=(), **shared):
    """The keyword arguments of one ControlSpec per ControlNet from repeated command-line options: `images` pairs
    with `models` one to one; scales, starts, ends and preprocess give one value for all or one per ControlNet;
    `shared` (guess_mode, thresholds) applies to all. ValueError when the counts do not pair."""
    if len(images) != len(models):
        raise ValueError(
            f"give one --control-image per --controlnet: {len(models)} ControlNet(s), {len(images)} image(s)"
        )
    per = {"scale": scales, "start": starts, "end": ends, "preprocess": preprocess}
    for name, values in per.items():
        if len(values) not in (0, 1, len(models)):
            raise ValueError(f"give --control-{name} once, or once per --controlnet ({len(models)}), not {len(values)}")
    return [
        {
            "model": model,
            "image": image,
            **shared,
            **{k: v[i] if len(v) > 1 else v[0] for k, v in per.items() if v},
        }  # fmt: skip
        for i, (model, image) in enumerate(zip(models, images))
    ]

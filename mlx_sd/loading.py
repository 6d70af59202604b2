"""Building the pipeline's models from a model folder."""

import mlx.core as mx

from .clip import CLIPTextConfig, CLIPTextModel
from .clip import sanitize as sanitize_clip
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel, UNetConfig
from .unet import sanitize as sanitize_unet
from .vae import AutoencoderConfig, AutoencoderKL
from .vae import sanitize as sanitize_vae
from .weights import load_strict, read_json, read_safetensors


def load_text_encoder(folder, tokenizer_name, encoder_name, dtype):
    """The tokenizer and CLIP text encoder stored under `folder/tokenizer_name` and `folder/encoder_name`."""
    tokenizer = CLIPTokenizer.from_folder(folder / tokenizer_name)
    encoder = CLIPTextModel(CLIPTextConfig.from_dict(read_json(folder / encoder_name / "config.json")))
    load_strict(encoder, sanitize_clip(read_safetensors(folder / encoder_name)), encoder_name, dtype)
    return tokenizer, encoder


def load_denoiser(folder, dtype):
    """The UNet, the VAE and the scheduler config of a diffusers-format folder."""
    unet = UNet2DConditionModel(UNetConfig.from_dict(read_json(folder / "unet" / "config.json")))
    load_strict(unet, sanitize_unet(read_safetensors(folder / "unet")), "unet", dtype)
    vae_config = AutoencoderConfig.from_dict(read_json(folder / "vae" / "config.json"))
    vae = AutoencoderKL(vae_config)
    # diffusers' force_upcast: the float16 VAE overflows, so it runs in float32 (bfloat16 does not overflow).
    vae_dtype = mx.float32 if dtype == mx.float16 and vae_config.force_upcast else dtype
    load_strict(vae, sanitize_vae(read_safetensors(folder / "vae")), "vae", vae_dtype)
    return unet, vae, read_json(folder / "scheduler" / "scheduler_config.json")

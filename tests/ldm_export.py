"""Test helper: diffusers/transformers state dicts -> one single-file checkpoint in the original LDM layout.

The inverse of mlx_sd/single_file.py, written independently in the diffusers -> LDM direction; the tests prove it
by loading its files with diffusers' own `from_single_file`. The files carry what real A1111/Civitai files carry
besides the weights (noise schedule buffers, an EMA copy, position_ids, logit_scale, SD 2.x's unused last
OpenCLIP layer and text projection) so that the loader's deliberate drops are exercised too.
"""

import re

import torch
from safetensors.torch import save_file

UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def unet_to_ldm(sd):
    """diffusers UNet2DConditionModel state dict -> LDM keys (without the model.diffusion_model. prefix)."""
    layers = 1 + max(int(m[1]) for k in sd if (m := re.match(r"down_blocks\.\d+\.resnets\.(\d+)\.", k)))
    per_level = layers + 1  # LDM gives each down level `layers` blocks + a downsampler, each up level `layers + 1`
    up_attention = {m[1] for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        if module in UNET_FIXED:
            new = UNET_FIXED[module]
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
            side, block, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            index = 1 + block * per_level + layer if side == "down" else block * per_level + layer
            where = "input_blocks" if side == "down" else "output_blocks"
            new = f"{where}.{index}.0.{UNET_RESNET[rest]}" if kind == "resnets" else f"{where}.{index}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            new = f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            new = f"output_blocks.{(int(m[1]) + 1) * per_level - 1}.{2 if m[1] in up_attention else 1}.conv"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", module):
            new = f"middle_block.{2 * int(m[1])}.{UNET_RESNET[m[2]]}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
            new = f"middle_block.1.{m[1]}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out[f"{new}.{param}"] = value
    return out


def vae_to_ldm(sd):
    """diffusers AutoencoderKL state dict -> LDM keys (without the first_stage_model. prefix)."""
    num_up = len({m[1] for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    out = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.block.", new
        )
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.upsample.",
            new,
        )
        new = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
            if value.ndim == 2:
                value = value[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[new] = value
    return out


def text_model_key(key):
    """transformers 5 `CLIPTextModel` drops the `text_model.` prefix; Hub checkpoints and LDM files keep it."""
    return key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"


def text_model_keys(sd):
    return {text_model_key(k): v for k, v in sd.items() if not k.endswith("position_ids")}


def clip_to_ldm(sd):
    """CLIPTextModel state dict -> HF-like LDM keys (without the cond_stage_model.transformer. prefix)."""
    out = text_model_keys(sd)
    positions = out["text_model.embeddings.position_embedding.weight"].shape[0]
    out["text_model.embeddings.position_ids"] = torch.arange(positions)[None]  # (1, 77) int64 buffer
    return out


def open_clip_to_ldm(sd, extra_layer=False, generator=None):
    """CLIPTextModel[WithProjection] state dict -> OpenCLIP keys (without the ...model. prefix).

    `extra_layer` appends the random last resblock and text projection that SD 2.x files carry unused."""
    sd = text_model_keys(sd)
    out = {
        "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": sd.pop("text_model.final_layer_norm.bias"),
        "logit_scale": torch.tensor(4.6052),
    }
    hidden = out["token_embedding.weight"].shape[1]
    if "text_projection.weight" in sd:
        out["text_projection"] = sd.pop("text_projection.weight").T.contiguous()  # (hidden, projection)
    num_layers = 1 + max(int(m[1]) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)))
    for i in range(num_layers):
        base = f"text_model.encoder.layers.{i}"
        for param in ("weight", "bias"):
            qkv = [sd.pop(f"{base}.self_attn.{n}_proj.{param}") for n in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(qkv)  # (3 * hidden, ...)
            for name, ldm in OPEN_CLIP_LAYER.items():
                out[f"transformer.resblocks.{i}.{ldm}.{param}"] = sd.pop(f"{base}.{name}.{param}")
    if sd:
        raise KeyError(f"no OpenCLIP name for text encoder keys {sorted(sd)}")
    if extra_layer:
        layer = {k: v for k, v in out.items() if k.startswith("transformer.resblocks.0.")}
        for k, v in layer.items():
            out[k.replace(".0.", f".{num_layers}.", 1)] = torch.randn(v.shape, generator=generator)
        out["text_projection"] = torch.randn(hidden, hidden, generator=generator)
    return out


def ldm_extras(unet_ldm, sgm=False):
    """Non-weight entries of real files: sgm's sigmas, or LDM's DDPM schedule buffers and EMA bookkeeping."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    if sgm:
        return {"denoiser.sigmas": ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()}
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
    }
    out = {k: v.float() for k, v in buffers.items()}
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    # LDM's EMA copy flattens the module path: model_ema.diffusion_modelinput_blocks00weight.
    out["model_ema.diffusion_modelinput_blocks00weight"] = unet_ldm["input_blocks.0.0.weight"].clone()
    return out


def export_ldm(path, family, unet, vae, text_encoder, text_encoder_2=None, sgm=False, seed=0):
    """Writes one LDM single-file `.safetensors` from diffusers/transformers state dicts.

    family: "sd1" (CLIP-L), "sd2" (OpenCLIP ViT-H; `sgm` puts it under conditioner.embedders.0 as SD-Turbo's
    files do) or "sdxl" (CLIP-L + OpenCLIP bigG)."""
    generator = torch.Generator().manual_seed(seed)
    unet_ldm = unet_to_ldm(unet)
    parts = [("model.diffusion_model.", unet_ldm), ("first_stage_model.", vae_to_ldm(vae))]
    if family == "sd1":
        parts.append(("cond_stage_model.transformer.", clip_to_ldm(text_encoder)))
    elif family == "sd2":
        prefix = "conditioner.embedders.0.model." if sgm else "cond_stage_model.model."
        parts.append((prefix, open_clip_to_ldm(text_encoder, extra_layer=True, generator=generator)))
    elif family == "sdxl":
        parts.append(("conditioner.embedders.0.transformer.", clip_to_ldm(text_encoder)))
        parts.append(("conditioner.embedders.1.model.", open_clip_to_ldm(text_encoder_2)))
        sgm = True
    else:
        raise ValueError(f"unknown family {family}")
    parts.append(("", ldm_extras(unet_ldm, sgm)))
    state = {prefix + k: v.contiguous() for prefix, part in parts for k, v in part.items()}
    save_file(state, str(path))
    return path


def controlnet_to_ldm(sd, prefix="control_model."):
    """diffusers ControlNetModel state dict -> A1111/LDM ControlNet keys (cldm.ControlNet: the UNet-like encoder,
    input_hint_block with its convs at even indices, zero_convs, middle_block_out), under `prefix`."""
    blocks = sum(1 for k in sd if re.fullmatch(r"controlnet_cond_embedding\.blocks\.\d+\.weight", k))
    own, unet = {}, {}
    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        if module == "controlnet_cond_embedding.conv_in":
            new = "input_hint_block.0"
        elif m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module):
            new = f"input_hint_block.{2 * (int(m[1]) + 1)}"  # Conv2d, SiLU, Conv2d, SiLU, ...
        elif module == "controlnet_cond_embedding.conv_out":
            new = f"input_hint_block.{2 * (blocks + 1)}"
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
            new = f"zero_convs.{m[1]}.0"
        elif module == "controlnet_mid_block":
            new = "middle_block_out.0"
        else:
            unet[key] = value
            continue
        own[f"{new}.{param}"] = value
    return {prefix + k: v.contiguous() for k, v in {**unet_to_ldm(unet), **own}.items()}

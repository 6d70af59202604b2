"""Single-file checkpoints in the original LDM/CompVis layout (A1111, ComfyUI, Civitai): SD 1.x, 2.x and XL.

`load_single_file(path)` reads one `.safetensors` file and splits it into the state dicts that diffusers'
`from_single_file` builds, with diffusers/transformers key names and PyTorch layouts (OIHW convs); each
component's own `sanitize` then does the MLX layout work. Reference: diffusers/loaders/single_file_utils.py
(convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint,
convert_open_clip_checkpoint, infer_diffusers_model_type).

Keys dropped on purpose: the training noise schedule (betas, alphas_cumprod, posterior_* ...), the EMA copy
(model_ema.*), sgm's denoiser.sigmas, CLIP's position_ids buffer, OpenCLIP's logit_scale and, for SD 2.x, the
OpenCLIP text_projection and last resblock (SD 2.x conditions on the penultimate layer, so diffusers' text
encoder has 23 of the 24 layers and no projection).
"""

import re
from pathlib import Path

import mlx.core as mx

from .weights import ModelLoadError, refuse_pickle, safetensors_header

FAMILIES = ("sd1", "sd2", "sdxl")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
# Text encoder prefixes per family: component -> LDM prefixes (the first one present is used).
# SD 2.x files saved by Stability's sgm code (SD-Turbo) keep OpenCLIP under conditioner.embedders.0.
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.",)},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "conditioner.embedders.0.model.")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.",),
        "text_encoder_2": ("conditioner.embedders.1.model.",),
    },
}
DROPPED = re.compile(
    r"betas|alphas_cumprod(_prev)?|sqrt_(one_minus_)?alphas_cumprod|sqrt_recip(m1)?_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|posterior_(variance|log_variance_clipped|mean_coef[12])|logvar"
    r"|model_ema\..+|denoiser\.(log_)?sigmas|.+\.embeddings\.position_ids|.+\.model\.logit_scale"
)

# UNet (convert_ldm_unet_checkpoint). Keys are `module.weight` / `module.bias`; these tables map modules.
UNET_FIXED = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",  # SDXL
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# Transformer2DModel modules have the same names in both layouts (SD 1.x proj_in/proj_out are 1x1 convs in
# both, SD 2.x/XL ones linear in both), so they are only checked.
UNET_TRANSFORMER = re.compile(
    r"norm|proj_in|proj_out|transformer_blocks\.\d+\.(norm[123]|attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2))"
)

# VAE (convert_ldm_vae_checkpoint).
VAE_FIXED = {
    "encoder.norm_out": "encoder.conv_norm_out",
    "decoder.norm_out": "decoder.conv_norm_out",
    **{
        m: m
        for m in (
            "encoder.conv_in",
            "encoder.conv_out",
            "decoder.conv_in",
            "decoder.conv_out",
            "quant_conv",
            "post_quant_conv",
        )
    },
}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

# Text encoders (convert_ldm_clip_checkpoint, convert_open_clip_checkpoint).
CLIP_KEY = re.compile(
    r"text_model\.(embeddings\.(token|position)_embedding\.weight|final_layer_norm\.(weight|bias)"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias))"
)
OPEN_CLIP_FIXED = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def detect_family(weights: dict) -> str:
    """ "sd1", "sd2" or "sdxl", from the text encoder keys (else the UNet's cross-attention width)."""
    keys = weights.keys()

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    conv_in = weights.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        found = ", ".join(sorted({k.split(".")[0] for k in keys})[:8]) or "nothing"
        raise ValueError(
            "not a Stable Diffusion checkpoint in the original LDM layout: expected model.diffusion_model.* (UNet) "
            "with cond_stage_model.transformer.* (SD 1.x), cond_stage_model.model.* (SD 2.x) or "
            f"conditioner.embedders.* (SDXL); found top-level names {found}"
        )
    if conv_in.shape[1] != 4:
        raise ValueError(
            f"the UNet takes {conv_in.shape[1]} input channels (an inpainting or other special checkpoint); "
            "only 4-channel text-to-image SD 1.x, 2.x and XL checkpoints are supported"
        )
    if has("conditioner.embedders.0.transformer.") and has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model.") and has(UNET + "label_emb."):
        raise ValueError("this is an SDXL refiner checkpoint (OpenCLIP bigG only); only SDXL base is supported")
    if has("cond_stage_model.model.") or has("conditioner.embedders.0.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    context = next((v.shape[-1] for k, v in weights.items() if k.endswith("attn2.to_k.weight")), None)
    by_context = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
    if context in by_context:
        return by_context[context]
    raise ValueError(
        "no text encoder keys (cond_stage_model.* or conditioner.embedders.*) and a UNet cross-attention width of "
        f"{context}, not 768 (SD 1.x), 1024 (SD 2.x) or 2048 (SDXL): unrecognised checkpoint"
    )


def split_components(weights: dict, family: str) -> dict[str, dict[str, mx.array]]:
    """LDM single-file weights -> {"unet", "vae", "text_encoder"[, "text_encoder_2"]: diffusers state dict}.

    Every key is used or dropped on purpose (see the module docstring); any other key is a ValueError."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    prefixes = {"unet": UNET, "vae": VAE}
    for name, candidates in TEXT_ENCODERS[family].items():
        prefixes[name] = next((p for p in candidates if any(k.startswith(p) for k in weights)), candidates[0])
    converters = {"unet": _unet, "vae": _vae, "text_encoder": _clip, "text_encoder_2": _open_clip}
    if family == "sd2":
        converters["text_encoder"] = _open_clip

    parts = {name: {} for name in prefixes}
    unknown = []
    for key, value in weights.items():
        if DROPPED.fullmatch(key):
            continue
        name = next((n for n, p in prefixes.items() if key.startswith(p)), None)
        if name is None:
            unknown.append(key)
        else:
            parts[name][key[len(prefixes[name]) :]] = value

    components = {}
    for name, part in parts.items():
        if not part:
            raise ValueError(f"the {family} checkpoint has no {name} weights ({prefixes[name]}*)")
        components[name], rejected = converters[name](part, family)
        unknown += [prefixes[name] + k for k in rejected]
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ValueError(f"unrecognised keys in the {family} checkpoint: {', '.join(sorted(unknown)[:5])}{more}")
    return components


def load_single_file(path) -> tuple[str, dict[str, dict[str, mx.array]]]:
    """Reads an LDM-layout `.safetensors` checkpoint: (family, split_components(...)). Never unpickles."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        safetensors_header(path)  # a bounded, consistent header and every tensor's bytes present
    except ModelLoadError as e:
        raise ValueError(str(e)) from None
    try:
        weights = mx.load(str(path), format="safetensors")
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not read {path}: not a valid safetensors file ({reason})") from None
    family = detect_family(weights)
    return family, split_components(weights, family)


def _rename(part, rename):
    """Applies `rename(key, value) -> [(key, value), ...] | None (unknown)` to every entry of `part`."""
    out, unknown = {}, []
    for key, value in part.items():
        pairs = rename(key, value)
        if pairs is None:
            unknown.append(key)
        else:
            out.update(pairs)
    return out, unknown


def _by_module(rename_module):
    """A `rename` for `module.weight` / `module.bias` keys, from a module-path mapping."""

    def rename(key, value):
        module, _, param = key.rpartition(".")
        new = rename_module(module) if param in ("weight", "bias") else None
        return None if new is None else [(f"{new}.{param}", value)]

    return rename


def _unet(part, family):
    # Input block i > 0 is layer (i - 1) % per_level of down block (i - 1) // per_level, output block i is layer
    # i % per_level of up block i // per_level, where per_level = layers_per_block + 1 (the first downsampler's index).
    ops = [int(m[1]) for k in part if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.weight", k))]
    outputs = {k.split(".")[1] for k in part if k.startswith("output_blocks.")}
    per_level = min(ops) if ops else max(len(outputs), 1)

    def sub_module(base, layer, attention, rest):
        if attention:
            return f"{base}.attentions.{layer}.{rest}" if UNET_TRANSFORMER.fullmatch(rest) else None
        return f"{base}.resnets.{layer}.{UNET_RESNET[rest]}" if rest in UNET_RESNET else None

    def module(name):
        if name in UNET_FIXED:
            return UNET_FIXED[name]
        if m := re.fullmatch(r"input_blocks\.([1-9]\d*)\.([01])\.(.+)", name):
            block, layer = divmod(int(m[1]) - 1, per_level)
            if m[2] == "0" and m[3] == "op":
                return f"down_blocks.{block}.downsamplers.0.conv"
            return sub_module(f"down_blocks.{block}", layer, m[2] == "1", m[3])
        if m := re.fullmatch(r"middle_block\.([012])\.(.+)", name):  # resnet, transformer, resnet
            return sub_module("mid_block", int(m[1]) // 2, m[1] == "1", m[2])
        if m := re.fullmatch(r"output_blocks\.(\d+)\.([012])\.(.+)", name):
            block, layer = divmod(int(m[1]), per_level)
            if m[2] != "0" and m[3] == "conv":  # .1.conv, or .2.conv after a transformer
                return f"up_blocks.{block}.upsamplers.0.conv"
            return None if m[2] == "2" else sub_module(f"up_blocks.{block}", layer, m[2] == "1", m[3])
        return None

    return _rename(part, _by_module(module))


def _vae(part, family):
    num_up = len({k.split(".")[2] for k in part if k.startswith("decoder.up.")})

    def resnet(base, rest):
        return f"{base}.{VAE_RESNET[rest]}" if rest in VAE_RESNET else None

    def module(name):
        if name in VAE_FIXED:
            return VAE_FIXED[name]
        if m := re.fullmatch(r"encoder\.down\.(\d+)\.(block\.(\d+)\.(\w+)|downsample\.conv)", name):
            if m[3] is None:
                return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv"
            return resnet(f"encoder.down_blocks.{m[1]}.resnets.{m[3]}", m[4])
        if m := re.fullmatch(r"decoder\.up\.(\d+)\.(block\.(\d+)\.(\w+)|upsample\.conv)", name):
            block = num_up - 1 - int(m[1])  # LDM numbers the decoder levels from the lowest resolution up
            if m[3] is None:
                return f"decoder.up_blocks.{block}.upsamplers.0.conv"
            return resnet(f"decoder.up_blocks.{block}.resnets.{m[3]}", m[4])
        if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)", name):
            return resnet(f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}", m[3])
        if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)", name):
            return f"{m[1]}.mid_block.attentions.0.{VAE_ATTENTION[m[2]]}" if m[2] in VAE_ATTENTION else None
        return None

    rename = _by_module(module)

    def rename_attention(key, value):
        pairs = rename(key, value)
        if pairs and ".attentions." in pairs[0][0] and value.ndim == 4:
            pairs = [(pairs[0][0], value.reshape(value.shape[:2]))]  # 1x1 conv (C, C, 1, 1) -> Linear (C, C)
        return pairs

    return _rename(part, rename_attention)


def _clip(part, family):
    return _rename(part, lambda key, value: [(key, value)] if CLIP_KEY.fullmatch(key) else None)


def _open_clip(part, family):
    layers = [int(m[1]) for k in part if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))]
    dropped_layer = max(layers, default=None) if family == "sd2" else None

    def rename(key, value):
        if key in OPEN_CLIP_FIXED:
            return [(OPEN_CLIP_FIXED[key], value)]
        if key == "text_projection":  # stored (hidden, projection); SD 2.x's CLIPTextModel has none
            return [] if family == "sd2" else [("text_projection.weight", value.T)]
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
        m = m or re.fullmatch(r"transformer\.resblocks\.(\d+)\.(attn\.in_proj)_(weight|bias)", key)
        if m is None:
            return None
        if int(m[1]) == dropped_layer:
            return []
        base = f"text_model.encoder.layers.{m[1]}"
        if m[2] == "attn.in_proj":  # fused (3 * hidden, ...) -> q, k, v
            return [(f"{base}.self_attn.{n}_proj.{m[3]}", x) for n, x in zip("qkv", mx.split(value, 3, axis=0))]
        return [(f"{base}.{OPEN_CLIP_LAYER[m[2]]}.{m[3]}", value)] if m[2] in OPEN_CLIP_LAYER else None

    return _rename(part, rename)

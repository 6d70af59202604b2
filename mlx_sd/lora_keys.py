"""Where the layers of a LoRA file go: Kohya names (`lora_unet_down_blocks_0_..._to_q`, LDM block names such as
`lora_unet_input_blocks_4_1_...` in SDXL files, `lora_te1_text_model_...`), diffusers / PEFT module paths
(`unet.down_blocks.0...`, `text_encoder.text_model...`, old `...processor.to_q_lora`) -> (component, our module path).
Our module paths are diffusers' (unet.py, clip.py), so names are built from them instead of renamed one by one.

Reference: diffusers/loaders/lora_conversion_utils.py (`_maybe_map_sgm_blocks_to_diffusers`,
`_convert_unet_lora_key`, `_convert_text_encoder_lora_key`), utils/state_dict_utils.py; single_file.py for the LDM
layout, which `ldm_unet_paths` runs backwards.
"""

import re

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.", "add_embedding.")
OLD_TEXT_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# diffusers UNet module -> LDM (sgm) module, for Kohya SDXL files (diffusers' _maybe_map_sgm_blocks_to_diffusers)
LDM_FIXED = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
LDM_RESNET = {
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def guess_family(lora):
    """ "sd1", "sd2", "sdxl" or None, from the second text encoder's keys or the widths of cross-attention and
    text-encoder layers (768 / 1024 / 2048); only used to explain a LoRA that does not fit."""
    keys = lora.patches.keys()
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl"
    for key, patch in lora.patches.items():
        shape = patch.shape2d
        if shape is None:
            continue
        if re.search(r"attn2[._](processor[._])?to_[kv]", key):
            width = shape[1]
            return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width)
        if re.search(r"self_attn[._](q_proj|to_q)", key) and shape[1] == 1024:
            return "sd2"
    return None


def module_names(component, paths):
    """The names a layer of our `component` (its module paths) has in LoRA files -> the path: Kohya names from
    diffusers paths (and LDM block names for the UNet), and text-encoder paths with and without `text_model.`."""
    names = {}
    for path in paths:
        aliases = [path]
        if component.startswith("text_encoder") and path.startswith("text_model."):
            aliases.append(path[len("text_model.") :])  # transformers 5's CLIPTextModel has no text_model level
        for alias in aliases:
            names[alias] = path
            names[alias.replace(".", "_")] = path
    if component == "unet":
        for path, ldm in ldm_unet_paths(paths).items():
            names[ldm.replace(".", "_")] = path
    return names


def ldm_unet_paths(paths):
    """diffusers UNet module paths -> LDM paths (input_blocks.4.1..., single_file.py's mapping run backwards)."""

    down, up = _block_layout(paths, "down"), _block_layout(paths, "up")
    out = {}
    for path in paths:
        if path in LDM_FIXED:
            out[path] = LDM_FIXED[path]
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", path):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            start = 1 + sum(d["resnets"] + d["sampler"] for d in down[:b])
            if kind == "downsamplers":
                out[path] = f"input_blocks.{start + down[b]['resnets']}.0.op"
            else:
                out[path] = _ldm_layer(f"input_blocks.{start + j}", kind, rest)
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", path):
            index = 1 if m[1] == "attentions" else 2 * int(m[2])
            out[path] = _ldm_layer(f"middle_block.{index}", m[1], m[3], inner=False)
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", path):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            start = sum(u["resnets"] for u in up[:b])
            if kind == "upsamplers":
                out[path] = f"output_blocks.{start + up[b]['resnets'] - 1}.{2 if up[b]['attentions'] else 1}.conv"
            else:
                out[path] = _ldm_layer(f"output_blocks.{start + j}", kind, rest)
    return {k: v for k, v in out.items() if v is not None}


def _block_layout(paths, kind):
    """Per down / up block: its number of resnets, whether it has attentions and a down- or upsampler."""
    found = {}
    for path in paths:
        if m := re.match(rf"{kind}_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.", path):
            block = found.setdefault(int(m[1]), {"resnets": 0, "attentions": False, "sampler": False})
            if m[2] == "resnets":
                block["resnets"] = max(block["resnets"], int(m[3]) + 1)
            block["attentions"] |= m[2] == "attentions"
            block["sampler"] |= m[2] in ("downsamplers", "upsamplers")
    empty = {"resnets": 0, "attentions": False, "sampler": False}
    return [found.get(i, empty) for i in range(max(found, default=-1) + 1)]


def _ldm_layer(block, kind, rest, inner=True):
    if kind == "attentions":
        return f"{block}.1.{rest}" if inner else f"{block}.{rest}"
    if rest not in LDM_RESNET:
        return None
    return f"{block}.0.{LDM_RESNET[rest]}" if inner else f"{block}.{LDM_RESNET[rest]}"


def target(key, layout, names):
    """(component, module path) of a file's layer name, or None; `names` maps component -> module_names(...)."""
    if layout == "kohya":
        prefix = next(p for p in KOHYA_PREFIXES if key.startswith(p))
        component = KOHYA_PREFIXES[prefix]
        path = names.get(component, {}).get(key[len(prefix) :])
        return None if path is None else (component, path)
    prefix = next((p for p in PEFT_PREFIXES if key.startswith(p)), None)
    if prefix is None and not key.startswith(UNET_ROOTS):
        return None
    component = PEFT_PREFIXES.get(prefix, "unet")
    module = key[len(prefix or "") :].replace(".processor.", ".")
    head, _, last = module.rpartition(".")
    if component == "unet" and last == "to_out":
        module = f"{head}.to_out.0"
    elif component != "unet" and last in OLD_TEXT_NAMES:
        module = f"{head}.{OLD_TEXT_NAMES[last]}"
    path = names.get(component, {}).get(module)
    return None if path is None else (component, path)

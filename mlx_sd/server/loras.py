"""`<lora:NAME:WEIGHT>` prompt tags: the one place where the server applies LoRAs to its pipeline.

This is the seam to mlx_sd's LoRA API (`pipe.load_lora(path, scale, name)`, `pipe.set_lora_scale(name, scale)`,
`pipe.unload_lora(name)`, `pipe.loras`); a pipeline without that API refuses prompts with tags. The tag syntax is
A1111's (modules/extra_networks.py): the tags are removed from the prompt before it is encoded.
"""

import math
import re
from pathlib import Path

from .catalog import lora_names
from .payloads import RequestError

LORA_TAG = re.compile(r"<lora:([^<>]*)>")


def extract_lora_tags(prompt):
    """(prompt without its `<lora:NAME>` / `<lora:NAME:WEIGHT>` tags, [(NAME, weight), ...])."""
    tags = []
    for match in LORA_TAG.finditer(prompt):
        name, _, weight = match[1].partition(":")
        try:
            scale = float(weight) if weight.strip() else 1.0
        except ValueError:
            scale = math.nan
        if not math.isfinite(scale):
            raise RequestError(f"prompt: {match[0]!r} has no valid weight (use <lora:NAME:0.8>)", "prompt")
        tags.append((name.strip(), scale))
    return LORA_TAG.sub("", prompt), tags


def apply_prompt_loras(pipe, prompt, lora_dir):
    """The prompt without its LoRA tags, once the pipeline's LoRAs are exactly the tags' (each NAME.safetensors
    in `lora_dir`, at its weight; the others unloaded). RequestError for a name not in the folder."""
    prompt, tags = extract_lora_tags(prompt)
    offered = lora_names(lora_dir)
    wanted = {}
    for name, scale in tags:
        if name not in offered:
            raise RequestError(f"prompt: unknown LoRA {name[:200]!r}; see /sdapi/v1/loras", "prompt")
        wanted[name] = (Path(lora_dir) / f"{name}.safetensors", scale)
    loaded = dict(getattr(pipe, "loras", {}))
    if not wanted and not loaded:
        return prompt
    if not hasattr(pipe, "load_lora"):
        raise RequestError("prompt: <lora:...> tags need mlx_sd's LoRA support, which this build lacks", "prompt")
    for name in [n for n in loaded if n not in wanted]:
        pipe.unload_lora(name)
    for name, (path, scale) in wanted.items():
        if name not in loaded:
            pipe.load_lora(path, scale, name)
        elif loaded[name] != scale:
            pipe.set_lora_scale(name, scale)
    return prompt

"""A1111's infotext: the `parameters` text of a PNG (prompt, `Negative prompt:` line, `Key: value` settings)."""

import json
import re

from .schedulers import DISPLAY_NAMES


def a1111_parameters(p):
    """The A1111 `parameters` text: prompt, `Negative prompt:` line, then `Key: value` settings."""
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    settings = [
        f"Steps: {p['steps']}",
        f"Sampler: {DISPLAY_NAMES.get(p['sampler'], p['sampler'])}",
        f"CFG scale: {p['guidance_scale']:g}",
        f"Seed: {p['seed']}",
        f"Size: {p['width']}x{p['height']}",
        f"Model: {_quote(p['model'])}",
    ]
    if p.get("clip_skip"):
        settings.append(f"Clip skip: {p['clip_skip']}")
    if p.get("strength") is not None:
        settings.append(f"Denoising strength: {p['strength']:g}")
    if p.get("mask_blur"):
        settings.append(f"Mask blur: {p['mask_blur']:g}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def _quote(value):
    """A1111 quotes setting values that contain a comma, colon or quote."""
    value = str(value)
    return json.dumps(value) if any(c in value for c in ',:"') else value


def parse_a1111_parameters(text):
    """The settings of an A1111 `parameters` text: prompt, negative_prompt and every `Key: value` setting."""
    lines = text.strip().split("\n")
    settings_line = lines.pop() if lines and re.match(r"^\s*Steps: ", lines[-1]) else ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    # "Key: value" pairs separated by commas; values may be quoted (A1111 quotes values with commas)
    for key, value in re.findall(r'\s*([\w ][\w /-]*): ("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', settings_line):
        result[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return result

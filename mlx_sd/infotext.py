"""A1111's infotext: the `parameters` text of a PNG (prompt, `Negative prompt:` line, `Key: value` settings).

Format (AUTOMATIC1111 modules/infotext_utils.py `parse_generation_parameters`, processing.py
`create_infotext`): the prompt's lines, then `Negative prompt: ...` and its further lines, then one line of
`Key: value` pairs separated by commas, values with a comma, colon or quote JSON-quoted. A1111 reads a line that
starts with `Negative prompt:` as the negative prompt, so a prompt line starting so is written with a lowercase
`n` (the CLIP tokenizer lowercases every prompt, so the image is the same; only that letter changes).
"""

import json
import re

NEGATIVE = "Negative prompt:"
SETTINGS_LINE = re.compile(r"^\s*Steps: ")
# "Key: value" pairs separated by commas; values may be JSON-quoted
PAIR = re.compile(r'\s*([\w ][\w /-]*): ("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def format_infotext(prompt, negative_prompt, values):
    """The text for a prompt, a negative prompt (None: no line) and [(key, value), ...] settings."""
    lines = [_escape(prompt)]
    if negative_prompt is not None:
        lines.append(f"{NEGATIVE} {_escape(negative_prompt)}".rstrip(" "))
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in values))
    return "\n".join(lines)


def parse_infotext(text):
    """(prompt, negative prompt or None, {key: value}) of an A1111 `parameters` text."""
    lines = text.strip().split("\n")
    settings_line = lines.pop() if lines and SETTINGS_LINE.match(lines[-1]) else ""
    prompt, negative = [], None
    for line in lines:
        if negative is None and line.strip().startswith(NEGATIVE):
            negative = [line.strip()[len(NEGATIVE) :].strip()]
        else:
            (prompt if negative is None else negative).append(line)
    values = {}
    for key, value in PAIR.findall(settings_line):
        values[key.strip()] = _unquote(value)
    return "\n".join(prompt), None if negative is None else "\n".join(negative), values


def parse_a1111_parameters(text):
    """{prompt, negative_prompt, every `Key: value`} of an A1111 `parameters` text (for display)."""
    prompt, negative, values = parse_infotext(text)
    return {"prompt": prompt, "negative_prompt": negative or "", **values}


def _escape(text):
    """Lines that A1111 would read as the negative prompt's start get a lowercase `n`."""
    return "\n".join(
        line.replace(NEGATIVE, NEGATIVE.lower(), 1) if line.strip().startswith(NEGATIVE) else line
        for line in text.split("\n")
    )


def _quote(value):
    """A1111 quotes setting values that contain a comma, colon or quote."""
    value = str(value)
    return json.dumps(value) if any(c in value for c in ',:"') else value


def _unquote(value):
    if value.startswith('"'):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value.strip()

"""Output file names of `mlx-sd generate`: a .png file, a folder, or a pattern with {seed} and {index}.

A pattern's fields are `{seed}` and `{index}`, each optionally zero-padded to a width of 1 to 12 digits
(`{seed:05}` or `{index:03d}`); `{{` and `}}` are literal braces. Fields may appear in the file name only.
Anything else (`{0}`, `{seed.real}`, `{seed:>9}`, an unclosed `{`) is a usage error.

Names are chosen before the model loads (existing files are skipped) and claimed when each image is saved:
`claim` links the finished temporary file to its name, which fails if the name appeared meanwhile, and then
moves on to the next numbered name. Without `overwrite` an existing file is never replaced.
"""

import errno
import os
import re
import tempfile
from pathlib import Path

import click

from .settings import MAX_IMAGES  # the most images one command names (and numbered names tried per file)

MAX_WIDTH = 12  # the widest zero-padding of a field
FIELDS = ("seed", "index")
TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")  # literal braces, a field, or a stray brace
FIELD = re.compile(r"(seed|index)(?::0(\d{1,2})d?)?")
PATTERN_HELP = "use {seed} and {index}, zero-padded as {seed:05} or {index:03d} (width 1-12)"
# link() fails with these where the file system has no hard links (FAT, exFAT, some network shares).
NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def parse_pattern(name):
    """A file name pattern -> its parts: literal strings and (field, width) pairs (width 0: no padding)."""
    parts, end = [], 0
    for match in TOKEN.finditer(name):
        parts.append(name[end : match.start()])
        end = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            parts.append(token[0])
            continue
        field = FIELD.fullmatch(match.group(1) or "") if token.startswith("{") and token.endswith("}") else None
        width = int(field.group(2) or 0) if field else 0
        if field is None or (field.group(2) is not None and not 1 <= width <= MAX_WIDTH):
            raise click.BadParameter(
                f"unknown field {token[:40]!r} in {name[:80]!r}: {PATTERN_HELP}", param_hint="-o/--output"
            )
        parts.append((field.group(1), width))
    parts.append(name[end:])
    return parts


def format_pattern(parts, seed, index):
    values = {"seed": seed, "index": index}
    return "".join(p if isinstance(p, str) else f"{values[p[0]]:0{p[1]}d}" for p in parts)


def numbered(path, n):
    """`path` with `-n` added to its stem: out.png -> out-1.png."""
    path = Path(path)
    return path.with_name(f"{path.stem}-{n}{path.suffix}")


def check_writable(folder):
    """Raises click.BadParameter unless a file can be created in `folder` (tried with an unnamed temporary file)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise click.BadParameter(
            f"cannot write to folder {folder}: {e.strerror or e}", param_hint="-o/--output"
        ) from None


def output_paths(output, seeds, overwrite=False):
    """One path per image. `output` is a .png file, a pattern with {seed} and {index}, or a folder.

    Existing files are kept: a numbered name (`out-1.png`, ...) is used instead unless `overwrite`. The folder
    must exist and be writable. Linear in the number of images (at most MAX_IMAGES).
    """
    if len(seeds) > MAX_IMAGES:
        raise click.BadParameter(f"at most {MAX_IMAGES} images, got {len(seeds)}", param_hint="-n/--num-images")
    output = Path(output)
    if output.is_dir() or str(output).endswith(("/", "\\")):
        output = output / "{seed}.png"
    if TOKEN.search(str(output.parent)):
        raise click.BadParameter(f"fields may appear in the file name only: {output}", param_hint="-o/--output")
    parts = parse_pattern(output.name)
    if output.suffix.lower() != ".png":
        raise click.BadParameter(f"output must be a .png file or a folder, got {output}", param_hint="-o/--output")
    if not output.parent.is_dir():
        raise click.BadParameter(f"folder {output.parent} does not exist", param_hint="-o/--output")
    check_writable(output.parent)
    fixed = len(parts) == 1  # no field: images after the first are numbered
    paths, taken, counters = [], set(), {}
    for index, seed in enumerate(seeds):
        base = output.parent / format_pattern(parts, seed, index)
        path = base
        if (fixed and index > 0) or path in taken or (os.path.lexists(path) and not overwrite):
            n = counters.get(base, 0)
            while True:  # each base's counter only grows: linear over all images
                n += 1
                path = numbered(base, n)
                if path not in taken and (overwrite or not os.path.lexists(path)):
                    break
            counters[base] = n
        taken.add(path)
        paths.append(path)
    return paths


def claim(tmp, path, overwrite=False):
    """Gives the finished file `tmp` the name `path` (or, if that exists, the first free `numbered` one) and
    returns the name used. An existing file is replaced only with `overwrite`, and only if the user may write
    it. `tmp` is left for the caller to remove (it is a second link to the file, or gone after a replace)."""
    path = Path(path)
    if overwrite:
        if os.path.lexists(path) and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only: not replaced (make it writable to replace it)")
        os.replace(tmp, path)
        return path
    for n in range(MAX_IMAGES + 1):
        candidate = numbered(path, n) if n else path
        try:
            os.link(tmp, candidate)  # fails if candidate exists: a name is never taken twice
            return candidate
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno not in NO_LINKS:
                raise
        try:  # no hard links here: create the name exclusively, then move the file onto it
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        os.replace(tmp, candidate)
        return candidate
    raise FileExistsError(f"{path} and its {MAX_IMAGES} numbered names all exist")

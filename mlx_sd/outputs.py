"""Output file names of `mlx-sd generate`: a .png file, a folder, or a pattern with {seed} and {index}."""

import string
from pathlib import Path

import click


def output_paths(output, seeds, overwrite=False):
    """One path per image. `output` is a .png file, a pattern with {seed} and {index}, or a folder.

    Existing files are kept: a numbered name (`out-1.png`, ...) is used instead unless `overwrite`.
    """
    output = Path(output)
    if output.is_dir() or str(output).endswith(("/", "\\")):
        output = output / "{seed}.png"
    fields = {name for _, name, _, _ in string.Formatter().parse(str(output)) if name is not None}
    if fields - {"seed", "index"}:
        raise click.BadParameter(
            f"unknown field(s) {', '.join(sorted(fields - {'seed', 'index'}))}: use {{seed}} and {{index}}",
            param_hint="-o/--output",
        )
    if output.suffix.lower() != ".png":
        raise click.BadParameter(f"output must be a .png file or a folder, got {output}", param_hint="-o/--output")
    if not output.parent.is_dir():
        raise click.BadParameter(f"folder {output.parent} does not exist", param_hint="-o/--output")
    paths = []
    for index, seed in enumerate(seeds):
        path = base = Path(str(output).format(seed=seed, index=index))
        n = 0
        while path in paths or (path.exists() and not overwrite) or (not fields and index > 0 and n == 0):
            n += 1
            path = base.with_name(f"{base.stem}-{n}{base.suffix}")
        paths.append(path)
    return paths

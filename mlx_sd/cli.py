"""The `mlx-sd` command line: a thin layer over mlx_sd's Python API."""

import sys
from pathlib import Path

import click

from .pipeline import DTYPES
from .schedulers import SAMPLERS


def _multiple_of_8(ctx, param, value):
    if value is not None and (value <= 0 or value % 8):
        raise click.BadParameter(f"must be a positive multiple of 8, got {value}")
    return value


def _at_least(minimum):
    def check(ctx, param, value):
        if value is not None and value < minimum:
            raise click.BadParameter(f"must be at least {minimum}, got {value}")
        return value

    return check


def _output_paths(output, count):
    """File names for `count` images: `out.png`, then `out-1.png`, ...; never an existing file."""
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise click.BadParameter(f"output must be a .png file, got {output}", param_hint="-o/--output")
    if not output.parent.is_dir():
        raise click.BadParameter(f"folder {output.parent} does not exist", param_hint="-o/--output")
    paths, n = [], 0
    while len(paths) < count:
        candidate = output if n == 0 else output.with_name(f"{output.stem}-{n}{output.suffix}")
        if not candidate.exists():
            paths.append(candidate)
        n += 1
    return paths


@click.group()
def cli():
    """Stable Diffusion on Apple silicon with MLX."""


@cli.command()
@click.argument("prompt")
@click.option("--model", default="stabilityai/sd-turbo", show_default=True, help="Hub repo id or diffusers-format folder.")
@click.option("--negative-prompt", default="", help="What the image should not show.")
@click.option("-W", "--width", type=int, callback=_multiple_of_8, help="Image width (multiple of 8; default: the model's).")
@click.option("-H", "--height", type=int, callback=_multiple_of_8, help="Image height (multiple of 8; default: the model's).")
@click.option("--steps", type=int, callback=_at_least(1), help="Sampler steps (default: the model's).")
@click.option("--cfg", "--guidance-scale", "guidance_scale", type=float, callback=_at_least(0), help="Classifier-free guidance scale; <= 1 turns it off.")
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), help="Sampler (default: the model's scheduler).")
@click.option("--seed", type=int, help="Random seed (default: a random one, printed).")
@click.option("-n", "--num-images", type=int, default=1, callback=_at_least(1), show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="float16", show_default=True)
@click.option("--clip-skip", type=int, callback=_at_least(1), help="CLIP layer to use, A1111 numbering (1 = last).")
@click.option("-o", "--output", default="out.png", show_default=True, help="Output .png; numbered names are used instead of overwriting.")
def generate(prompt, model, negative_prompt, width, height, steps, guidance_scale, sampler, seed, num_images, dtype, clip_skip, output):
    """Generate images from PROMPT."""
    from .pipeline import StableDiffusion
    from .png import save_png
    from .weights import ModelLoadError

    paths = _output_paths(output, num_images)
    try:
        pipe = StableDiffusion.from_pretrained(model, dtype=dtype)
        images = pipe.generate(
            prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
            guidance_scale=guidance_scale, sampler=sampler, seed=seed, num_images=num_images, clip_skip=clip_skip,
        )
    except (ModelLoadError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    for i, (image, path) in enumerate(zip(images, paths)):
        save_png(image, path, {**images.parameters, "seed": images.seed + i})
        click.echo(f"seed {images.seed + i}: {path}")


def main():
    cli(prog_name="mlx-sd")


if __name__ == "__main__":
    sys.exit(main())

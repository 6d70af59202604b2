"""The `mlx-sd` command line: a thin layer over mlx_sd's Python API."""

import random
import sys
import time
import warnings

import click
from click.core import ParameterSource

from .convert import convert_command
from .outputs import output_paths
from .pipeline import DTYPES
from .schedulers import resolve_sampler, sampler_lines


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


def _sampler(ctx, param, value):
    if value is None:
        return None
    try:
        return resolve_sampler(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


class Progress:
    """A one-line progress bar on stderr: image, steps, step rate and ETA."""

    def __init__(self, enabled, images):
        self.enabled, self.images, self.image = enabled, images, 0

    def start_image(self):
        self.image += 1
        self.started = time.perf_counter()

    def __call__(self, step, total, latents):
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        rate = step / elapsed if elapsed > 0 else 0.0
        eta = (total - step) / rate if rate > 0 else 0.0
        bar = "#" * (20 * step // total) + "-" * (20 - 20 * step // total)
        click.echo(
            f"\rimage {self.image}/{self.images} [{bar}] {step}/{total} {rate:.2f} it/s ETA {eta:.0f}s",
            err=True,
            nl=step == total,
        )


@click.group()
@click.version_option(package_name="mlx_sd")
def cli():
    """Stable Diffusion on Apple silicon with MLX."""


@cli.command()
@click.argument("prompt", required=False)
@click.option(
    "--model",
    default="stabilityai/sd-turbo",
    show_default=True,
    help="Hub repo id, diffusers-format folder, converted MLX folder or single-file .safetensors.",
)
@click.option("--negative-prompt", default="", help="What the image should not show.")
@click.option(
    "-W", "--width", type=int, callback=_multiple_of_8, help="Image width (multiple of 8; default: the model's)."
)
@click.option(
    "-H", "--height", type=int, callback=_multiple_of_8, help="Image height (multiple of 8; default: the model's)."
)
@click.option("--steps", type=int, callback=_at_least(1), help="Sampler steps (default: the model's).")
@click.option(
    "--cfg",
    "--guidance-scale",
    "guidance_scale",
    type=float,
    callback=_at_least(0),
    help="Classifier-free guidance scale; <= 1 turns it off (default: the model's).",
)
@click.option("--sampler", callback=_sampler, help="Sampler: a name from `mlx-sd samplers` or its A1111 name.")
@click.option("--seed", type=int, help="Random seed (default: a random one, printed); image i uses seed + i.")
@click.option("-n", "--num-images", type=int, default=1, callback=_at_least(1), show_default=True)
@click.option("--batch-size", type=int, default=1, callback=_at_least(1), show_default=True, help="Images per batch.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="float16", show_default=True)
@click.option(
    "-q", "--quantize", type=click.Choice(["4", "8"]), help="Quantize the text encoders and UNet while loading."
)
@click.option("--image", type=click.Path(dir_okay=False), help="Image-to-image: start from this image.")
@click.option(
    "--strength",
    type=click.FloatRange(0, 1),
    help="Share of the schedule run on --image (default 0.8, 1.0 with --mask).",
)
@click.option("--mask", type=click.Path(dir_okay=False), help="Inpainting: white marks the area to repaint.")
@click.option("--mask-blur", type=float, default=0, callback=_at_least(0), help="Blur radius of the mask, in pixels.")
@click.option("--clip-skip", type=int, callback=_at_least(1), help="CLIP layer to use, A1111 numbering (1 = last).")
@click.option("--truncate", is_flag=True, help="Cut prompts at 75 tokens instead of encoding them in chunks.")
@click.option(
    "--low-memory",
    is_flag=True,
    help="Free the text encoders before the UNet runs, run guidance as two UNet calls, decode in tiles.",
)
@click.option(
    "--tiled-decode/--no-tiled-decode",
    default=None,
    help="Decode images over 512x512 in blended tiles (less memory; default: with --low-memory).",
)
@click.option(
    "-o",
    "--output",
    default="out.png",
    show_default=True,
    help="Output .png, folder, or pattern with {seed} and {index}.",
)
@click.option("--overwrite", is_flag=True, help="Replace existing files instead of numbering new names.")
@click.option("--grid", is_flag=True, help="Save all images as one contact sheet.")
@click.option("--preview", is_flag=True, help="Write a cheap preview of each step to <output>.preview.png.")
@click.option(
    "--from-png",
    type=click.Path(exists=True, dir_okay=False),
    help="Take the prompt and settings from a PNG's parameters; options given here override them.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--verbose", is_flag=True, help="Print timings per phase and peak memory.")
@click.pass_context
def generate(
    ctx,
    prompt,
    model,
    negative_prompt,
    width,
    height,
    steps,
    guidance_scale,
    sampler,
    seed,
    num_images,
    batch_size,
    dtype,
    quantize,
    image,
    strength,
    mask,
    mask_blur,
    clip_skip,
    truncate,
    low_memory,
    tiled_decode,
    output,
    overwrite,
    grid,
    preview,
    from_png,
    quiet,
    verbose,
):
    """Generate images from PROMPT."""
    settings = dict(
        prompt=prompt,
        model=model,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance_scale,
        sampler=sampler,
        seed=seed,
        clip_skip=clip_skip,
        image=image,
        strength=strength,
        mask=mask,
        mask_blur=mask_blur,
    )
    if mask is not None and image is None:
        raise click.UsageError("--mask needs --image (the image to inpaint)")
    if from_png:
        given = {k for k in settings if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
        given |= {"prompt"} if prompt is not None else set()
        settings.update({k: v for k, v in settings_from_png(from_png).items() if k not in given})
    if settings["prompt"] is None:
        raise click.UsageError("give a PROMPT (or --from-png FILE)")
    seed = settings["seed"] if settings["seed"] is not None else random.randint(0, 2**32 - 1)
    seeds = [seed + i for i in range(num_images)]
    paths = output_paths(output, seeds[:1] if grid else seeds, overwrite)
    progress = Progress(not quiet and sys.stderr.isatty(), num_images)
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: click.echo(f"warning: {message}", err=True)
        options = dict(
            num_images=num_images,
            batch_size=batch_size,
            dtype=dtype,
            quantize=quantize,
            truncate=truncate,
            low_memory=low_memory,
            tiled_decode=tiled_decode,
            grid=grid,
            preview=preview,
            verbose=verbose,
        )
        _generate(settings, seed, seeds, paths, progress, **options)


def _generate(
    settings,
    seed,
    seeds,
    paths,
    progress,
    num_images,
    batch_size,
    dtype,
    quantize,
    truncate,
    low_memory,
    tiled_decode,
    grid,
    preview,
    verbose,
):
    from .pipeline import GenerationCancelled, StableDiffusion
    from .png import save_png
    from .weights import ModelLoadError

    try:
        tic = time.perf_counter()
        pipe = StableDiffusion.from_pretrained(
            settings["model"], dtype=dtype, low_memory=low_memory, quantize=int(quantize) if quantize else None
        )
        load_time = time.perf_counter() - tic
        images = []
        for start in range(0, num_images, batch_size):
            count = min(batch_size, num_images - start)
            progress.start_image()

            def on_step(step, total, latents):
                progress(step, total, latents)
                if preview:
                    save_png(pipe.decode_preview(latents)[0], paths[0].with_suffix(".preview.png"))

            batch = pipe.generate(
                settings["prompt"],
                negative_prompt=settings["negative_prompt"],
                width=settings["width"],
                height=settings["height"],
                steps=settings["steps"],
                guidance_scale=settings["guidance_scale"],
                sampler=settings["sampler"],
                seed=seed + start,
                num_images=count,
                clip_skip=settings["clip_skip"],
                image=settings["image"],
                strength=settings["strength"],
                mask=settings["mask"],
                mask_blur=settings["mask_blur"],
                truncate_prompt=truncate,
                tiled_decode=tiled_decode,
                callback=on_step,
            )
            for i, image in enumerate(batch):
                images.append((image, {**batch.parameters, "seed": seed + start + i}))
                if not grid:
                    save_png(image, paths[start + i], images[-1][1])
                    click.echo(f"seed {seed + start + i}: {paths[start + i]}")
            if verbose:
                timings = ", ".join(f"{k} {v:.2f}s" for k, v in batch.timings.items())
                click.echo(
                    f"load {load_time:.2f}s, {timings}, peak memory {batch.peak_memory / 2**30:.2f} GiB", err=True
                )
        if grid:
            save_png(contact_sheet([image for image, _ in images]), paths[0], images[0][1])
            click.echo(f"seeds {seeds[0]}-{seeds[-1]}: {paths[0]}")
    except KeyboardInterrupt:
        click.echo("\ninterrupted; no partial file was written", err=True)
        sys.exit(130)
    except (ModelLoadError, ValueError, OSError, GenerationCancelled) as e:
        raise click.ClickException(str(e)) from None


# A1111 parameter name -> generate setting, type
PNG_SETTINGS = [
    ("Steps", "steps", int),
    ("CFG scale", "guidance_scale", float),
    ("Seed", "seed", int),
    ("Clip skip", "clip_skip", int),
    ("Denoising strength", "strength", float),
    ("Mask blur", "mask_blur", float),
]


def settings_from_png(path):
    """generate()'s settings from the A1111 `parameters` text of a PNG."""
    from PIL import Image

    from .infotext import parse_a1111_parameters

    with Image.open(path) as image:
        text = getattr(image, "text", {}).get("parameters")
    if not text:
        raise click.BadParameter(f"{path} has no generation parameters", param_hint="--from-png")
    p = parse_a1111_parameters(text)
    sampler = p.get("Sampler")
    if sampler and p.get("Schedule type", "").lower() == "karras" and "karras" not in sampler.lower():
        sampler += " Karras"  # A1111 1.9+ writes the schedule separately
    settings = {"prompt": p["prompt"], "negative_prompt": p["negative_prompt"]}
    try:
        for key, setting, cast in PNG_SETTINGS:
            if key in p:
                settings[setting] = cast(p[key])
        if "Size" in p:
            settings["width"], settings["height"] = (int(v) for v in p["Size"].split("x"))
        if sampler:
            settings["sampler"] = resolve_sampler(sampler)
    except ValueError as e:
        raise click.BadParameter(f"{path}: unreadable parameters ({e})", param_hint="--from-png") from None
    if "Model" in p:
        settings["model"] = p["Model"]
    return settings


def contact_sheet(images):
    """The images on one sheet, in a near-square grid."""
    from PIL import Image

    columns = 1
    while columns * columns < len(images):
        columns += 1
    rows = -(-len(images) // columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    return sheet


@cli.command()
def samplers():
    """List the samplers and schedules (A1111 names work too)."""
    for line in sampler_lines():
        click.echo(line)


@cli.command()
@click.argument("path", type=click.Path(exists=True))
def info(path):
    """Describe a model folder, a .safetensors checkpoint, or a PNG's generation parameters."""
    from .info import describe

    try:
        for line in describe(path):
            click.echo(line)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None


cli.add_command(convert_command)


def main():
    cli(prog_name="mlx-sd")


if __name__ == "__main__":
    sys.exit(main())

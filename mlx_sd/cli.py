"""The `mlx-sd` command line: a thin layer over mlx_sd's Python API."""

import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import click

from .adapter_files import DEFAULT_EMBEDDINGS_DIR, DEFAULT_LORA_DIR, embeddings_in_prompts
from .controlnet import pair_control_options
from .convert import convert_command
from .hub import DEFAULT_MODEL
from .lora import parse_lora_option
from .outputs import output_paths
from .pipeline import DTYPES
from .png import read_png_parameters, save_png
from .schedulers import sampler_lines
from .settings import MAX_IMAGES, GenerationSettings, SettingsError, check_int, image_seed

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


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
    "--model", help=f"Hub repo id, diffusers or converted MLX folder, or .safetensors file [{DEFAULT_MODEL}]."
)
@click.option("--negative-prompt", help="What the image should not show (default: none).")
@click.option("-W", "--width", type=int, help="Image width, a multiple of 8 (default: the model's).")
@click.option("-H", "--height", type=int, help="Image height, a multiple of 8 (default: the model's).")
@click.option("--steps", type=int, help="Sampler steps (default: the model's).")
@click.option("--cfg", "--guidance-scale", "guidance_scale", type=float, help="Guidance scale; <= 1 turns it off.")
@click.option("--sampler", help="Sampler: a name from `mlx-sd samplers` or its A1111 name.")
@click.option("--schedule", help="default, karras, exponential, beta or sgm_uniform (A1111's schedule types).")
@click.option("--timestep-spacing", help="leading, linspace or trailing (default: the model's scheduler config).")
@click.option("--eta", type=float, help="The tcd sampler's eta, 0 to 1 (default 0.3).")
@click.option("--seed", type=int, help="Seed, 0 to 2**64-1 (default or -1: random); image i uses seed + i.")
@click.option("-n", "--num-images", type=int, default=1, show_default=True, help=f"Images (at most {MAX_IMAGES}).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Images generated together.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), help="Default: float16 on a GPU, float32 on the CPU.")
@click.option("-q", "--quantize", type=click.Choice(["4", "8"]), help="Quantize the text encoders and UNet.")
@click.option("--variant", help="Weight files: fp16 or none (default: fp16 files for float16/bfloat16 if present).")
@click.option("--image", type=click.Path(dir_okay=False), help="Image-to-image: start from this image.")
@click.option("--strength", type=float, help="Share of the schedule run on --image (0.8; 1.0 with --mask).")
@click.option("--mask", type=click.Path(dir_okay=False), help="Inpainting: white marks the area to repaint.")
@click.option("--mask-blur", type=float, help="Blur radius of the mask, in pixels (default 0).")
@click.option("--clip-skip", type=int, help="CLIP layer to use, A1111 numbering (1 = last).")
@click.option("--deep-cache", type=int, help="DeepCache: run the whole UNet every N steps only (2-5 typical).")
@click.option("--lora", "loras", multiple=True, help="PATH[:SCALE]: a LoRA file at a scale (default 1; repeatable).")
@click.option("--embedding", "embeddings", multiple=True, help="A textual-inversion embedding file (repeatable).")
@click.option("--lora-dir", default=DEFAULT_LORA_DIR, show_default=True, help="Where <lora:NAME:W> tags find NAME.")
@click.option("--embeddings-dir", default=DEFAULT_EMBEDDINGS_DIR, show_default=True,
              help="Embeddings NAME.safetensors used when NAME is a word of the prompts.")  # fmt: skip
@click.option("--controlnet", "controlnets", multiple=True, help="A ControlNet (folder, Hub id, .safetensors).")
@click.option("--control-image", "control_images", multiple=True, type=click.Path(dir_okay=False),
              help="Its control image (one per --controlnet, in order).")  # fmt: skip
@click.option("--control-scale", "control_scales", multiple=True, type=float, help="Residual scale (1.0).")
@click.option("--control-start", "control_starts", multiple=True, type=float, help="Share of steps to start at.")
@click.option("--control-end", "control_ends", multiple=True, type=float, help="Share of steps to end at (1.0).")
@click.option("--control-preprocess", multiple=True, type=click.Choice(["none", "canny"]), help="Edges first?")
@click.option("--canny-low", type=int, default=100, show_default=True, help="Canny's lower threshold.")
@click.option("--canny-high", type=int, default=200, show_default=True, help="Canny's upper threshold.")
@click.option("--guess-mode", is_flag=True, help="ControlNets see the positive prompt only (diffusers' guess_mode).")
@click.option("--truncate", "truncate_prompt", is_flag=True, default=None, help="Cut prompts at 75 tokens.")
@click.option("--low-memory", is_flag=True, help="One phase's models in memory, halve guidance, decode in tiles.")
@click.option("--tiled-decode/--no-tiled-decode", default=None, help="Decode in blended 512px tiles.")
@click.option("-o", "--output", default="out.png", show_default=True, help="A .png, a folder, or a pattern.")
@click.option("--overwrite", is_flag=True, help="Replace existing files instead of numbering new names.")
@click.option("--grid", is_flag=True, help="Save all images as one contact sheet.")
@click.option("--preview", is_flag=True, help="Write a cheap preview of each step to <output>.preview.png.")
@click.option("--from-png", type=click.Path(exists=True, dir_okay=False), help="Settings from a PNG's parameters.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--verbose", is_flag=True, help="Print the dtype, timings per phase and peak memory.")
def generate(prompt, model, num_images, batch_size, dtype, quantize, variant, low_memory, output, overwrite, grid,
             preview, from_png, quiet, verbose, **options):  # fmt: skip
    """Generate images from PROMPT."""
    try:
        controls, adapters = _control_options(options), _adapter_options(options)
        settings, model = _generation_settings(prompt, model, from_png, options)
        check_int("-n/--num-images", num_images, 1, MAX_IMAGES)
        check_int("--batch-size", batch_size, 1, MAX_IMAGES)
    except ValueError as e:  # SettingsError, or an unreadable --from-png
        raise UsageError(str(e)) from None
    seed = settings.seed if settings.seed is not None else random.randint(0, 2**32 - 1)
    seeds = [image_seed(seed, i) for i in range(num_images)]
    paths = output_paths(output, seeds[:1] if grid else seeds, overwrite)
    run = Run(settings.replace(seed=seed), paths, Progress(not quiet and sys.stderr.isatty(), num_images), grid,
              preview, verbose, overwrite, controls, adapters)  # fmt: skip
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: click.echo(f"warning: {message}", err=True)
        loading = dict(
            dtype=dtype, low_memory=low_memory, quantize=int(quantize) if quantize else None, variant=variant
        )
        _run(run, model, num_images, batch_size, loading)


class UsageError(click.ClickException):
    """A bad setting: one line on stderr and exit code 2 (click's UsageError also prints the usage)."""

    exit_code = 2


def _control_options(options):
    """ControlSpec arguments from the --controlnet / --control-* options (taken out of `options`)."""
    names = ("controlnets", "control_images", "control_scales", "control_starts", "control_ends", "control_preprocess")
    models, images, scales, starts, ends, preprocess = (options.pop(name) for name in names)
    thresholds, guess_mode = (options.pop("canny_low"), options.pop("canny_high")), options.pop("guess_mode")
    return pair_control_options(models, images, scales, starts, ends, preprocess, thresholds=thresholds,
                                guess_mode=guess_mode)  # fmt: skip


def _adapter_options(options):
    """The --lora (PATH[:SCALE], scale checked), --embedding, --lora-dir and --embeddings-dir options (taken out
    of `options`)."""
    loras = [parse_lora_option(option) for option in options.pop("loras")]
    names = ("embeddings", "lora_dir", "embeddings_dir")
    return dict(loras=loras, **{name: options.pop(name) for name in names})


def _load_adapters(pipe, settings, loras, embeddings, lora_dir, embeddings_dir):
    """Applies --lora and --embedding files, the embeddings of --embeddings-dir that the prompts name, and the
    LoRA folder of prompt tags."""
    pipe.lora_dir = Path(lora_dir).expanduser()
    for path, scale in loras:
        pipe.load_lora(path, scale)
    named = embeddings_in_prompts(embeddings_dir, [settings.prompt, settings.negative_prompt or ""])
    for path in [*embeddings, *named]:
        pipe.load_textual_inversion(path)


def _with_controlnets(settings, controls, dtype, quantize):
    """The settings with the ControlNets loaded (in the pipeline's dtype) and their specs checked."""
    if not controls:
        return settings
    from .controlnet import ControlSpec, load_controlnet

    specs = []
    for arguments in controls:
        model = load_controlnet(arguments["model"], dtype, quantize)
        try:
            specs.append(ControlSpec(**{**arguments, "model": model}))
        except ValueError as e:
            raise SettingsError(str(e)) from None
    return settings.replace(controlnet=specs).validate()


def _generation_settings(prompt, model, from_png, options):
    """(validated GenerationSettings, model) from the command line and, for what it leaves out, --from-png."""
    given = {k: v for k, v in options.items() if v is not None}
    if prompt is not None:
        given["prompt"] = prompt
    if from_png:
        settings, png_model = GenerationSettings.from_infotext(read_png_parameters(from_png), source=from_png)
        if "image" not in given:  # the PNG's strength and mask blur applied to an image it does not carry
            settings = settings.replace(strength=None, mask_blur=0.0)
        settings = settings.replace(**given)
        if model is None and png_model:
            model = png_model
            click.echo(f"model: {model} (from {from_png}; --model overrides)", err=True)
    elif "prompt" not in given:
        raise SettingsError("give a PROMPT (or --from-png FILE)")
    else:
        settings = GenerationSettings(**given)
    return settings.validate(), model or DEFAULT_MODEL


@dataclass
class Run:
    """One `mlx-sd generate` command: its settings (with the seed chosen), output paths and display options."""

    settings: GenerationSettings
    paths: list
    progress: Progress
    grid: bool
    preview: bool
    verbose: bool
    overwrite: bool
    controls: list  # ControlSpec arguments (controlnet.pair_control_options), the model a name until loaded
    adapters: dict  # loras [(path, scale)], embeddings [path], lora_dir, embeddings_dir
    previews: list = field(default_factory=list)  # the preview's name, claimed by its first save


def _run(run, model, num_images, batch_size, loading):
    """Loads the model and generates the images batch by batch, saving each as soon as it is made."""
    from .pipeline import GenerationCancelled, StableDiffusion
    from .weights import ModelLoadError

    try:
        tic = time.perf_counter()
        pipe = StableDiffusion.from_pretrained(model, **loading)
        run.settings = _with_controlnets(run.settings, run.controls, pipe.dtype, loading["quantize"])
        _load_adapters(pipe, run.settings, **run.adapters)
        if run.verbose:
            chosen = "" if loading["dtype"] else " (the default on this backend)"
            click.echo(f"{model}: {pipe.family}, dtype {DTYPE_NAMES[pipe.dtype]}{chosen}", err=True)
        load_time = time.perf_counter() - tic
        sheet = []
        for start in range(0, num_images, batch_size):
            batch = _batch(pipe, run, start, min(batch_size, num_images - start))
            sheet += _save(run, batch, start)
            if run.verbose:
                timings = ", ".join(f"{k} {v:.2f}s" for k, v in batch.timings.items())
                peak = batch.peak_memory / 2**30
                click.echo(f"load {load_time:.2f}s, {timings}, peak memory {peak:.2f} GiB", err=True)
        if run.grid:
            path = save_png(contact_sheet([image for image, _ in sheet]), run.paths[0], sheet[0][1], run.overwrite)
            click.echo(f"seeds {run.settings.seed}-{image_seed(run.settings.seed, num_images - 1)}: {path}")
    except KeyboardInterrupt:
        click.echo("\ninterrupted; no partial file was written", err=True)
        sys.exit(130)
    except SettingsError as e:
        raise UsageError(str(e)) from None
    except (ModelLoadError, ValueError, OSError, GenerationCancelled) as e:
        raise click.ClickException(str(e)) from None


def _batch(pipe, run, start, count):
    """Generates images start .. start + count - 1 of the run."""
    run.progress.start_image()

    def on_step(step, total, latents):
        run.progress(step, total, latents)
        if run.preview:
            target = run.previews[0] if run.previews else run.paths[0].with_suffix(".preview.png")
            run.previews[:] = [save_png(pipe.decode_preview(latents)[0], target, overwrite=bool(run.previews))]

    settings = run.settings.replace(seed=image_seed(run.settings.seed, start), num_images=count)
    return pipe.generate(settings, callback=on_step)


def _save(run, batch, start):
    """Saves a batch's images (unless they go on one sheet); returns [(image, infotext), ...]."""
    saved = [(image, batch.infotext(i)) for i, image in enumerate(batch)]
    for i, (image, infotext) in enumerate(saved if not run.grid else []):
        path = save_png(image, run.paths[start + i], infotext, run.overwrite)
        click.echo(f"seed {image_seed(batch.seed, i)}: {path}")
    return saved


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


def _interrupt(signum, frame):
    """SIGTERM and SIGHUP act as Ctrl-C (temporary files and work folders removed, exit 130); repeats are
    ignored, so that the clean-up finishes."""
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise KeyboardInterrupt


def install_signal_handlers():
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _interrupt)


# --- mlx-sd serve ---------------------------------------------------------------------------------------------------


@cli.command()
@click.option("--model", help="Starting model: a name in --models-dir, a path or a Hub id [the folder's first].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=7860, show_default=True, help="Port (A1111's default).")
@click.option("--models-dir", type=click.Path(file_okay=False), help="Models clients may switch to.")
@click.option("--lora-dir", type=click.Path(file_okay=False), help="LoRAs (NAME.safetensors) for <lora:NAME:w>.")
@click.option("--max-queue", type=int, default=16, show_default=True, help="Requests waiting; more get 503.")
@click.option("--max-body-mb", type=int, default=64, show_default=True, help="Largest request body; more get 413.")
@click.option("--api-key", help="Require `Authorization: Bearer KEY` (OpenAI clients).")
@click.option("--api-auth", help="Require basic auth USER:PASS (A1111 clients).")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without authentication.")
@click.option("--allow-hub", is_flag=True, help="Let requests name Hugging Face Hub ids as models.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), help="Default: float16 on a GPU, float32 on the CPU.")
@click.option("--low-memory", is_flag=True, help="One phase's models in memory, halve guidance, decode in tiles.")
def serve(max_body_mb, **options):
    """Serve the A1111 and OpenAI image APIs and a web page at http://HOST:PORT/."""
    try:
        from .server import ServerConfig
        from .server import serve as run_server
    except ImportError as e:
        missing = f"the server needs its extra ({e.name} is missing)"
        raise click.ClickException(f'{missing}: pip install "mlx_sd[server]"') from None
    from .weights import ModelLoadError

    try:
        check_int("--max-body-mb", max_body_mb, 1, 2**20)
        config = ServerConfig(max_body_bytes=max_body_mb * 2**20, **options).check()
        click.echo(f"loading the model; then serving on http://{config.host}:{config.port}/", err=True)
        run_server(config)
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except ModelLoadError as e:
        raise click.ClickException(str(e)) from None


def main():
    install_signal_handlers()
    cli(prog_name="mlx-sd")


if __name__ == "__main__":
    sys.exit(main())

"""`mlx-sd convert`: a Hub repo id, a diffusers folder or a single-file checkpoint -> an MLX model folder.

The output is a diffusers-shaped folder that `StableDiffusion.from_pretrained` loads directly:
`model_index.json`, `scheduler/`, `tokenizer*/` (complete, vocabulary included), and per model component
`config.json` + `mlx_model.safetensors` (weights in MLX layout, in `dtype`, maybe quantized; the config's
`quantization` entry says how), plus the manifest `mlx_sd.json` (source, family, dtype, quantization, version).
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import click
import mlx.core as mx
from mlx.utils import tree_flatten

from . import __version__
from .hub import CONFIG_PATTERNS, resolve_model
from .loading import MODELS, PREDICTION_TYPES, bundled_config, load_component, model_family, single_file_components
from .pipeline import DTYPES, PIPELINES
from .quantize import QUANTIZE_BITS, QUANTIZE_GROUP_SIZES, quantize_model
from .tokenizer import ASSETS as TOKENIZER_ASSETS
from .weights import MANIFEST, MLX_WEIGHTS, ModelLoadError, is_converted, read_json, refuse_pickle


def convert(
    source,
    output_dir,
    dtype="float16",
    quantize=None,
    q_group_size=64,
    quantize_vae=False,
    quantize_convolutions=False,
    prediction_type=None,
    config=None,
    force=False,
):
    """Converts `source` into the MLX model folder `output_dir`; returns its path.

    source: Hub repo id, diffusers (or converted) folder, or single-file `.safetensors` checkpoint (SD 1.x, 2.x,
    XL in the original LDM layout; its configs come from `config`, a diffusers folder or repo id, else from the
    bundled ones of its family, which for SD 2.x need `prediction_type`). quantize: None, 4 or 8 bits for the
    text encoders and the UNet (and the VAE with quantize_vae), in groups of `q_group_size`: their Linear layers,
    and with quantize_convolutions the UNet's convolutions too (but conv_in and conv_out).

    One component is converted at a time. Everything is written to a temporary folder next to `output_dir`
    and renamed at the end: a failed or interrupted conversion leaves nothing behind. An existing
    `output_dir` is replaced only with force=True.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise ValueError(f"quantize must be one of {QUANTIZE_BITS} (bits), got {quantize!r}")
    if q_group_size not in QUANTIZE_GROUP_SIZES:
        raise ValueError(f"the quantization group size must be one of {QUANTIZE_GROUP_SIZES}, got {q_group_size!r}")
    if (quantize_vae or quantize_convolutions) and quantize is None:
        raise ValueError("quantize_vae and quantize_convolutions need quantize (4 or 8 bits)")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of: {', '.join(PREDICTION_TYPES)}")
    output = Path(output_dir).expanduser()
    _check_output(output, force)

    folder, checkpoint, family = _open_source(source, prediction_type, config)
    for used in (folder, checkpoint):
        if used is not None and force and Path(used).resolve().is_relative_to(output.resolve()):
            raise ValueError(f"refusing to replace {output}: the model being converted is in it")
    index = read_json(folder / "model_index.json")
    if index.get("_class_name") not in PIPELINES:
        raise ModelLoadError(f"{source} is a {index.get('_class_name')}; mlx_sd converts {', '.join(PIPELINES)}")
    components = [name for name in MODELS if name in index]
    quantized = [name for name in components if quantize and (name != "vae" or quantize_vae)]

    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.converting-", dir=output.parent))
    try:
        for name in components:
            _convert_component(
                folder,
                name,
                work,
                DTYPES[dtype],
                quantize if name in quantized else None,
                q_group_size,
                checkpoint,
                quantize_convolutions and name == "unet",
            )
        _copy_configs(folder, work, index, prediction_type)
        scheduler = read_json(work / "scheduler" / "scheduler_config.json")
        manifest = {
            "format": "mlx_sd",
            "format_version": 1,
            "mlx_sd_version": __version__,
            "source": str(source),
            "family": family,
            "dtype": dtype,
            "prediction_type": scheduler.get("prediction_type", "epsilon"),
            "quantization": quantize
            and {
                "bits": quantize,
                "group_size": q_group_size,
                "components": quantized,
                "convolutions": quantize_convolutions,
            },
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace(work, output)
    except BaseException:  # KeyboardInterrupt included: nothing half-written is left behind
        shutil.rmtree(work, ignore_errors=True)
        raise
    return output


def _check_output(output, force):
    if not output.parent.is_dir():
        raise FileNotFoundError(f"folder {output.parent} does not exist")
    if (output.exists() or output.is_symlink()) and not force:
        raise FileExistsError(f"{output} already exists; pass --force (force=True) to replace it")


def _open_source(source, prediction_type, config):
    """(folder with configs [and weights], single-file checkpoint or None, family)."""
    path = Path(source).expanduser()
    refuse_pickle(path)
    if path.is_file() or (path.suffix.lower() == ".safetensors" and not path.is_dir()):
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"{source}: expected a single-file .safetensors checkpoint or a model folder")
        family, _ = single_file_components(path)
        if config is None:
            return bundled_config(family, prediction_type), path, family
        return resolve_model(config, CONFIG_PATTERNS), path, family
    if config is not None:
        raise ValueError("--config (config=) applies to single-file checkpoints only; a model folder has its configs")
    folder = resolve_model(source)
    if is_converted(folder) and read_json(folder / MANIFEST).get("quantization"):
        raise ValueError(f"{source} is already quantized; convert the original model instead")
    return folder, None, model_family(folder)


def _convert_component(folder, name, work, dtype, bits, group_size, checkpoint, convolutions=False):
    """Loads one component strictly, quantizes it if asked, and saves it in MLX layout; then it is freed."""
    try:
        model = load_component(folder, name, dtype, checkpoint=checkpoint)
    except ModelLoadError as e:
        if checkpoint is None:
            raise
        raise ModelLoadError(
            f"{e} (the configs in {folder} do not fit {checkpoint.name}; pass --config with its diffusers configs)"
        ) from None
    config = read_json(folder / name / "config.json")
    if bits:
        config["quantization"] = quantize_model(model, bits, group_size, convolutions)
        mx.eval(model.parameters())
    (work / name).mkdir()
    mx.save_safetensors(
        str(work / name / MLX_WEIGHTS), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"}
    )
    (work / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _copy_configs(folder, work, index, prediction_type):
    """model_index.json, the scheduler config (with `prediction_type` if given) and complete tokenizer folders."""
    (work / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    if prediction_type is not None:
        scheduler["prediction_type"] = prediction_type
    (work / "scheduler").mkdir()
    (work / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    for name in (n for n in index if n.startswith("tokenizer")):
        (work / name).mkdir()
        for f in (folder / name).iterdir():
            if f.is_file():
                shutil.copyfile(f, work / name / f.name)
        for f in TOKENIZER_ASSETS.iterdir():  # single-file configs leave out the standard CLIP vocabulary
            if not (work / name / f.name).exists():
                shutil.copyfile(f, work / name / f.name)


def _replace(work, output):
    """Renames the finished `work` folder to `output`, replacing what was there only once `work` is complete."""
    if not (output.exists() or output.is_symlink()):
        work.rename(output)
        return
    old = output.with_name(f".{output.name}.replaced-{os.getpid()}")
    output.rename(old)
    work.rename(output)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def _folder_size(folder):
    size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


@click.command("convert")
@click.argument("source")
@click.argument("output_dir")
@click.option(
    "--dtype",
    type=click.Choice(list(DTYPES)),
    default="float16",
    show_default=True,
    help="Float type of the saved weights.",
)
@click.option("-q", "--quantize", is_flag=True, help="Quantize the text encoders and the UNet (Linear layers).")
@click.option("--q-bits", type=click.Choice(["4", "8"]), help="Bits per quantized weight (default 8).")
@click.option("--q-group-size", type=click.Choice(["32", "64", "128"]), help="Quantization group size (default 64).")
@click.option("--quantize-vae", is_flag=True, help="Quantize the VAE's Linear layers too (its attention only).")
@click.option(
    "--q-convs",
    is_flag=True,
    help="Quantize the UNet's convolutions too (not conv_in/conv_out): smaller SD 1.x/2.x UNets.",
)
@click.option(
    "--prediction-type",
    type=click.Choice(list(PREDICTION_TYPES)),
    help="What the model predicts; needed for SD 2.x single files (epsilon: 2.x base, v_prediction: 768).",
)
@click.option("--config", help="Diffusers folder or Hub repo id whose configs fit a single-file checkpoint.")
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
def convert_command(
    source, output_dir, dtype, quantize, q_bits, q_group_size, quantize_vae, q_convs, prediction_type, config, force
):
    """Convert SOURCE (Hub repo id, diffusers folder or single-file .safetensors) into the MLX model OUTPUT_DIR."""
    if (q_bits or q_group_size or quantize_vae or q_convs) and not quantize:
        raise click.UsageError("--q-bits, --q-group-size, --quantize-vae and --q-convs need -q/--quantize")
    bits = int(q_bits or 8) if quantize else None
    try:
        output = convert(
            source,
            output_dir,
            dtype=dtype,
            quantize=bits,
            q_group_size=int(q_group_size or 64),
            quantize_vae=quantize_vae,
            quantize_convolutions=q_convs,
            prediction_type=prediction_type,
            config=config,
            force=force,
        )
    except (ModelLoadError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    manifest = read_json(output / MANIFEST)
    kind = f"{bits}-bit, group size {manifest['quantization']['group_size']}" if bits else dtype
    kind += ", convolutions quantized" if q_convs else ""
    click.echo(f"{output}: {manifest['family']} ({kind}), {_folder_size(output)}")

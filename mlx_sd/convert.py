"""`mlx-sd convert`: a Hub repo id, a diffusers folder or a single-file checkpoint -> an MLX model folder.

The output is a diffusers-shaped folder that `StableDiffusion.from_pretrained` loads directly:
`model_index.json`, `scheduler/`, `tokenizer*/` (complete, vocabulary included), and per model component
`config.json` + `mlx_model.safetensors` (weights in MLX layout, in `dtype`, maybe quantized; the config's
`quantization` entry says how), plus the manifest `mlx_sd.json` (source, family, dtype, quantization, version).
"""

import errno
import fcntl
import json
import math
import os
import secrets
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import click
import mlx.core as mx
from mlx.utils import tree_flatten

from . import __version__
from .adapter_files import lora_hash
from .controlnet import controlnet_family, is_controlnet, open_controlnet
from .hub import CONFIG_PATTERNS, resolve_model, resolve_variant
from .loading import MODELS, PREDICTION_TYPES, bundled_config, load_component, model_family, single_file_components
from .lora import bake_loras, parse_lora_option
from .pipeline import DTYPES, PIPELINES
from .quantize import QUANTIZE_BITS, QUANTIZE_GROUP_SIZES, quantize_model
from .tokenizer import ASSETS as TOKENIZER_ASSETS
from .weights import (
    MANIFEST,
    MLX_WEIGHTS,
    ModelLoadError,
    is_converted,
    read_json,
    read_safetensors_headers,
    refuse_pickle,
)


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
    variant=None,
    loras=(),
):
    """Converts `source` into the MLX model folder `output_dir`; returns its path.

    source: Hub repo id, diffusers (or converted) folder, or single-file `.safetensors` checkpoint (SD 1.x, 2.x,
    XL in the original LDM layout; its configs come from `config`, a diffusers folder or repo id, else from the
    bundled ones of its family, which for SD 2.x need `prediction_type`). quantize: None, 4 or 8 bits for the
    text encoders and the UNet (and the VAE with quantize_vae), in groups of `q_group_size`: their Linear layers,
    and with quantize_convolutions the UNet's convolutions too (but conv_in and conv_out). variant: the source
    weights to read (hub.resolve_variant): by default fp16 files where a repo or folder has them and `dtype` is
    float16 or bfloat16 (half the download), "none" for the full-precision files. loras: [(path, scale)] LoRA
    files merged into the float weights for good, before quantizing (the UNet and text encoders are then loaded
    together).

    One component is converted at a time. Everything is written to a work folder next to `output_dir`
    (`.NAME.converting-PID-*`) and renamed at the end: a failed or interrupted conversion leaves nothing
    behind. An existing `output_dir` is replaced only with force=True, and only if it is empty or was written
    by `mlx-sd convert` (it holds `mlx_sd.json`). A lock (`.NAME.lock`) keeps a second conversion into the same
    folder out. Work folders of conversions that died (killed, power loss) are removed by the next one, and
    an interrupted replacement is finished (or undone, if the new folder was incomplete).
    """
    _check_arguments(dtype, quantize, q_group_size, quantize_vae or quantize_convolutions, prediction_type)
    if is_controlnet(source):
        if loras:
            raise ValueError(f"{source} is a ControlNet: LoRAs bake into Stable Diffusion models only")
        return convert_controlnet(
            source, output_dir, dtype, quantize, q_group_size, quantize_convolutions, config, force
        )
    chosen = resolve_variant(dtype, variant)
    output = Path(output_dir).expanduser()
    with _writing(output, force) as job:
        folder, checkpoint, family = _open_source(source, prediction_type, config, dtype, variant)
        _check_not_inside(output, force, folder, checkpoint)
        index = read_json(folder / "model_index.json")
        if index.get("_class_name") not in PIPELINES:
            raise ModelLoadError(f"{source} is a {index.get('_class_name')}; mlx_sd converts {', '.join(PIPELINES)}")
        components = [name for name in MODELS if name in index]
        quantized = [name for name in components if quantize and (name != "vae" or quantize_vae)]
        quantization = quantize and {
            "bits": quantize,
            "group_size": q_group_size,
            "components": quantized,
            "convolutions": quantize_convolutions,
        }
        job.needed = lambda: _estimated_size(folder, components, checkpoint, DTYPES[dtype], chosen)
        baked = _baked(folder, components, DTYPES[dtype], checkpoint, chosen, loras, family) if loras else {}
        for name in components:
            bits = quantize if name in quantized else None
            convolutions = quantize_convolutions and name == "unet"
            _convert_component(folder, name, job.work, DTYPES[dtype], bits, q_group_size, checkpoint, convolutions,
                               chosen, baked.pop(name, None))  # fmt: skip
        _copy_configs(folder, job.work, index, prediction_type)
        manifest = _manifest(source, family, dtype, read_json(job.work / "scheduler" / "scheduler_config.json"))
        if loras:  # what was baked in, with A1111's hashes
            manifest["loras"] = [{"file": Path(p).name, "scale": s, "hash": lora_hash(p)} for p, s in loras]
        (job.work / MANIFEST).write_text(json.dumps({**manifest, "quantization": quantization}, indent=2) + "\n")
    return output


def convert_controlnet(
    source, output_dir, dtype="float16", quantize=None, q_group_size=64, quantize_convolutions=False, config=None,
    force=False,
):  # fmt: skip
    """Converts a ControlNet (anything controlnet.load_controlnet reads) into an MLX folder: config.json (with its
    `quantization` entry), mlx_model.safetensors (MLX layout, `dtype`, maybe quantized: Linear layers, and with
    quantize_convolutions the convolutions but conv_in / conv_out) and the manifest mlx_sd.json (kind
    "controlnet"), with the same safety as convert(). `config`: a single file's config, as for load_controlnet."""
    _check_arguments(dtype, quantize, q_group_size, quantize_convolutions, None)
    output = Path(output_dir).expanduser()
    with _writing(output, force) as job:
        path = Path(source).expanduser()
        _check_not_inside(output, force, path if path.exists() else None)
        model, config, quantization = open_controlnet(source, DTYPES[dtype], config)
        if quantization:
            raise ValueError(f"{source} is already quantized; convert the original ControlNet instead")
        job.needed = lambda: sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        if quantize:
            config["quantization"] = quantize_model(model, quantize, q_group_size, quantize_convolutions)
            mx.eval(model.parameters())
        mx.save_safetensors(str(job.work / MLX_WEIGHTS), dict(tree_flatten(model.parameters())),
                            metadata={"format": "mlx"})  # fmt: skip
        (job.work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        manifest = {**_manifest(source, controlnet_family(model.config), dtype, {}), "kind": "controlnet"}
        manifest.pop("prediction_type")
        quantization = quantize and {
            "bits": quantize,
            "group_size": q_group_size,
            "convolutions": quantize_convolutions,
        }
        (job.work / MANIFEST).write_text(json.dumps({**manifest, "quantization": quantization}, indent=2) + "\n")
    return output


class _Job:
    """The work folder of one conversion and, for a disk-full message, how many bytes it needs."""

    def __init__(self, work):
        self.work, self.needed = work, lambda: 0


@contextmanager
def _writing(output, force):
    """Yields a _Job whose work folder (next to `output`) becomes `output` when the block ends. Holds the lock
    of `output`, finishes what a dead conversion left (_recover), refuses an `output` that cannot be replaced; on
    any error or interrupt the work folder is removed, and a full disk is one line with the space needed."""
    if not output.parent.is_dir():
        raise FileNotFoundError(f"folder {output.parent} does not exist")
    with _lock(output):
        _recover(output)
        _check_output(output, force)
        job = _Job(_work_folder(output))
        try:
            yield job
            _replace(job.work, output, force)
        except BaseException as e:  # KeyboardInterrupt (and SIGTERM/SIGHUP in the CLI) included
            shutil.rmtree(job.work, ignore_errors=True)
            if _disk_full(e):
                raise _disk_full_error(output, job.needed()) from None
            raise


def _check_not_inside(output, force, *sources):
    for used in sources:
        if used is not None and force and Path(used).resolve().is_relative_to(output.resolve()):
            raise ValueError(f"refusing to replace {output}: the model being converted is in it")


def _check_arguments(dtype, quantize, q_group_size, quantize_more, prediction_type):
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise ValueError(f"quantize must be one of {QUANTIZE_BITS} (bits), got {quantize!r}")
    if q_group_size not in QUANTIZE_GROUP_SIZES:
        raise ValueError(f"the quantization group size must be one of {QUANTIZE_GROUP_SIZES}, got {q_group_size!r}")
    if quantize_more and quantize is None:
        raise ValueError("quantize_vae and quantize_convolutions need quantize (4 or 8 bits)")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of: {', '.join(PREDICTION_TYPES)}")


def _disk_full_error(output, needed):
    free = shutil.disk_usage(output.parent).free
    return OSError(
        f"not enough space in {output.parent} to write {output.name}: the conversion needs up to about "
        f"{_gib(needed)}, {_gib(free)} are free (nothing was written)"
    )


def _manifest(source, family, dtype, scheduler):
    return {
        "format": "mlx_sd",
        "format_version": 1,
        "mlx_sd_version": __version__,
        "source": str(source),
        "family": family,
        "dtype": dtype,
        "prediction_type": scheduler.get("prediction_type", "epsilon"),
    }


def _check_output(output, force):
    if not (output.exists() or output.is_symlink()):
        return
    if not force:
        raise FileExistsError(f"{output} already exists; pass --force (force=True) to replace it")
    if not _replaceable(output):
        raise FileExistsError(
            f"refusing to replace {output}: --force replaces only an empty folder or one written by mlx-sd convert "
            f"(holding {MANIFEST})"
        )


def _replaceable(output):
    """True for an empty folder or one holding an mlx_sd manifest (not a symlink, not a file)."""
    if output.is_symlink() or not output.is_dir():
        return False
    return (output / MANIFEST).is_file() or not any(output.iterdir())


def _open_source(source, prediction_type, config, dtype, variant):
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
    folder = resolve_model(source, dtype=dtype, variant=variant)
    if is_converted(folder) and read_json(folder / MANIFEST).get("quantization"):
        raise ValueError(f"{source} is already quantized; convert the original model instead")
    return folder, None, model_family(folder)


def _load_component(folder, name, dtype, checkpoint, variant):
    try:
        return load_component(folder, name, dtype, checkpoint=checkpoint, variant=variant)
    except ModelLoadError as e:
        if checkpoint is None:
            raise
        raise ModelLoadError(
            f"{e} (the configs in {folder} do not fit {checkpoint.name}; pass --config with its diffusers configs)"
        ) from None


def _baked(folder, components, dtype, checkpoint, variant, loras, family):
    """{component: model} of the UNet and text encoders with the LoRAs [(path, scale)] merged for good (all loaded
    at once: a LoRA's keys span them)."""
    models = {name: _load_component(folder, name, dtype, checkpoint, variant) for name in components if name != "vae"}
    bake_loras(models, loras, family)
    return models


def _convert_component(folder, name, work, dtype, bits, group_size, checkpoint, convolutions=False, variant=None,
                       model=None):  # fmt: skip
    """Loads one component strictly (or takes `model`), quantizes it if asked, and saves it in MLX layout."""
    model = model or _load_component(folder, name, dtype, checkpoint, variant)
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


def _replace(work, output, force):
    """Renames the finished `work` folder to `output`. An existing `output` is first renamed aside to
    `.NAME.replaced-PID` and removed once `work` has its name; if the process dies in between, the next
    conversion into `output` finishes the swap (_recover)."""
    if not (output.exists() or output.is_symlink()):
        work.rename(output)
        return
    _check_output(output, force)  # it may have appeared or changed while converting
    old = output.with_name(f".{output.name}.replaced-{os.getpid()}")
    output.rename(old)
    try:
        _install(work, output)
    except BaseException:
        old.rename(output)
        raise
    shutil.rmtree(old)


def _install(work, output):
    work.rename(output)


def _work_folder(output):
    """A new, empty `.NAME.converting-PID-XXXXXXXX` folder next to `output`, with mkdir's modes (umask)."""
    for _ in range(100):
        work = output.with_name(f".{output.name}.converting-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            work.mkdir()
            return work
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a work folder next to {output}")


@contextmanager
def _lock(output):
    """Holds `.NAME.lock` next to `output` (flock) for one conversion; a second one fails at once."""
    path = output.with_name(f".{output.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 20).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FileExistsError(
                f"another conversion into {output} is running (pid {holder}); wait for it or choose another folder"
            ) from None
        if _same_file(fd, path):  # not a lock file that its previous holder removed meanwhile
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def _same_file(fd, path):
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _recover(output):
    """Under the lock: finishes (or undoes) a replacement whose process died between its two renames, then
    removes the work folders of dead conversions into `output`."""
    prefix = f".{output.name}."
    entries = [p for p in output.parent.iterdir() if p.name.startswith(prefix)]
    work = {p: _pid(p.name, prefix + "converting-") for p in entries}
    work = {p: pid for p, pid in work.items() if pid is not None and _dead(pid)}
    for old in entries:
        pid = _pid(old.name, prefix + "replaced-", last=True)
        if pid is None or not _dead(pid) or not old.is_dir():
            continue
        if not (output.exists() or output.is_symlink()):
            finished = [p for p, p_pid in work.items() if p_pid == pid and _complete(p)]
            if finished:
                finished[0].rename(output)
                warnings.warn(
                    f"{output}: finished the replacement that an interrupted conversion (pid {pid}) began", stacklevel=3
                )
            else:
                old.rename(output)
                warnings.warn(
                    f"{output}: restored the folder that an interrupted conversion (pid {pid}) set aside", stacklevel=3
                )
                continue
        shutil.rmtree(old, ignore_errors=True)
    for path in work:
        shutil.rmtree(path, ignore_errors=True)


def _pid(name, prefix, last=False):
    """The process id in `PREFIX<pid>-...` (or `PREFIX<pid>` with last), else None."""
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix) :]
    pid = rest if last else rest.split("-")[0]
    return int(pid) if pid.isdigit() and len(pid) < 10 else None


def _dead(pid):
    """True if process `pid` is gone. Under the lock, a folder with our own pid is a leftover too."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def _complete(work):
    """A work folder is complete once its manifest, written last, is valid."""
    try:
        return read_json(work / MANIFEST).get("format") == "mlx_sd"
    except ModelLoadError:
        return False


def _disk_full(e):
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and "Unable to write" in str(e)  # mx.save_safetensors' message


def _estimated_size(folder, components, checkpoint, dtype, variant=None):
    """Bytes of the converted weights before quantization: the source's element counts in `dtype`."""
    if checkpoint is not None:
        parts = single_file_components(checkpoint)[1]
        count = sum(v.size for name in components for v in parts.get(name, {}).values())
    else:
        count = sum(
            math.prod(t.shape) for name in components for t in read_safetensors_headers(folder / name, variant).values()
        )
    return count * dtype.size


def _gib(size):
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _folder_size(folder):
    return _gib(sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()))


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
@click.option(
    "--variant",
    help="Source weights: fp16 (the default for float16/bfloat16 where the repo or folder has *.fp16.safetensors: "
    "half the download) or none (full precision).",
)
@click.option("--lora", "loras", multiple=True, help="PATH[:SCALE]: a LoRA baked into the weights (repeatable).")
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it is empty or a folder mlx-sd convert wrote.")
def convert_command(
    source,
    output_dir,
    dtype,
    quantize,
    q_bits,
    q_group_size,
    quantize_vae,
    q_convs,
    prediction_type,
    config,
    variant,
    loras,
    force,
):
    """Convert SOURCE (Hub repo id, diffusers folder or single-file .safetensors) into the MLX model OUTPUT_DIR."""
    if (q_bits or q_group_size or quantize_vae or q_convs) and not quantize:
        raise click.UsageError("--q-bits, --q-group-size, --quantize-vae and --q-convs need -q/--quantize")
    bits = int(q_bits or 8) if quantize else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *args, **kwargs: click.echo(f"warning: {message}", err=True)
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
                variant=variant,
                loras=[parse_lora_option(option) for option in loras],
            )
    except KeyboardInterrupt:  # Ctrl-C, and SIGTERM / SIGHUP through mlx_sd.cli.main
        click.echo("\ninterrupted; nothing was written", err=True)
        sys.exit(130)
    except (ModelLoadError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    manifest = read_json(output / MANIFEST)
    kind = f"{bits}-bit, group size {manifest['quantization']['group_size']}" if bits else dtype
    kind += ", convolutions quantized" if q_convs else ""
    click.echo(f"{output}: {manifest['family']} ({kind}), {_folder_size(output)}")

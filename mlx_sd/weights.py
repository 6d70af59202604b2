"""Reading weights (safetensors only, never pickle) and loading them strictly into a model."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
MANIFEST = "mlx_sd.json"  # marks a folder written by `mlx-sd convert`
MLX_WEIGHTS = "mlx_model.safetensors"  # a converted component's weights, already in MLX layout


class ModelLoadError(Exception):
    """A model could not be found or loaded; the message says what to do."""


def is_pickle(path):
    """True for a pickle checkpoint's name (.bin, .ckpt, .pt, .pth, any case): such files are never opened."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(path):
    """Raises ModelLoadError for a pickle checkpoint, without opening it."""
    if is_pickle(path):
        raise ModelLoadError(f"{path} is a pickle checkpoint; mlx_sd never unpickles files: use a .safetensors file")


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"missing {path}: is {path.parent.parent} a diffusers-format model folder?")
    with open(path) as f:
        return json.load(f)


def read_safetensors(folder):
    """All weights of one component folder (single or sharded safetensors), as MLX arrays."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"missing component folder {folder}: is {folder.parent} a diffusers-format model folder?")
    for stem in ("diffusion_pytorch_model", "model"):
        single = folder / f"{stem}.safetensors"
        index = folder / f"{stem}.safetensors.index.json"
        if single.is_file():
            return _load_file(single)
        if index.is_file():
            shards = sorted(set(read_json(index)["weight_map"].values()))
            weights = {}
            for shard in shards:
                weights.update(_load_file(folder / shard))
            return weights
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return _load_file(files[0])
    if any(is_pickle(f) for f in folder.iterdir()):
        raise ModelLoadError(
            f"{folder} holds only pickle weights; mlx_sd loads safetensors only "
            "(save the model with safe_serialization=True)"
        )
    raise ModelLoadError(f"no safetensors weights found in {folder}")


def _load_file(path):
    try:
        return mx.load(str(path))
    except Exception as e:
        raise ModelLoadError(f"could not read {path}: not a valid safetensors file ({e})") from None


def load_strict(model: nn.Module, weights, component, dtype=None):
    """Loads `weights` into `model`: every key used, every parameter filled, every shape equal."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_sample(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_sample(unexpected)}")
        raise ModelLoadError(f"{component} weights do not match the model: " + "; ".join(parts))
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise ModelLoadError(
                f"{component} weight {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    return model


def _sample(keys, n=5):
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def is_converted(folder):
    """True for a folder written by `mlx-sd convert` (weights in MLX layout, possibly quantized)."""
    return (Path(folder) / MANIFEST).is_file()


def read_converted(folder):
    """The weights of one component folder of a converted model, as saved (MLX layout, no sanitize)."""
    path = Path(folder) / MLX_WEIGHTS
    if not path.is_file():
        raise ModelLoadError(f"missing {path}: the converted model folder is incomplete, convert it again")
    return _load_file(path)

"""Finding a model: a local folder, or a Hugging Face Hub repo id downloaded into the user's cache."""

import os
from pathlib import Path

from .weights import ModelLoadError, refuse_pickle

DEFAULT_MODEL = "stabilityai/sd-turbo"  # what `mlx-sd generate` loads without --model

# Only these files are fetched from the Hub: configs, tokenizer files and non-variant safetensors.
HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer*/*.json",
    "tokenizer*/*.txt",
    "*/diffusion_pytorch_model.safetensors",
    "*/diffusion_pytorch_model.safetensors.index.json",
    "*/diffusion_pytorch_model-*.safetensors",
    "*/model.safetensors",
    "*/model.safetensors.index.json",
    "*/model-*.safetensors",
    "mlx_sd.json",
    "*/mlx_model.safetensors",
]
# Configs and tokenizer files only: what `mlx-sd convert --config` needs besides a single-file checkpoint's weights.
CONFIG_PATTERNS = [p for p in HUB_PATTERNS if not p.endswith(".safetensors")]


def resolve_model(name_or_path, allow_patterns=HUB_PATTERNS):
    """Returns the local folder of a diffusers-format model: a local path, or a Hub repo id downloaded
    through huggingface_hub into the user's cache (the files `allow_patterns` name; HF_HUB_OFFLINE honoured)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    refuse_pickle(path)
    if path.exists():
        raise ModelLoadError(
            f"{name_or_path} is not a model folder or a .safetensors checkpoint; pass a diffusers-format folder"
        )
    if str(name_or_path).count("/") != 1 or str(name_or_path).startswith((".", "/", "~")):
        raise ModelLoadError(
            f"model {name_or_path!r} not found: pass a local model folder or a Hugging Face repo id (owner/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=allow_patterns))
    except Exception as e:  # network, auth, missing repo, offline cache miss
        offline = " (HF_HUB_OFFLINE is set and it is not in the cache)" if os.environ.get("HF_HUB_OFFLINE") else ""
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"could not get model {name_or_path!r} from the Hugging Face Hub{offline}: {reason}"
        ) from None

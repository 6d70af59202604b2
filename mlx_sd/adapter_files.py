"""LoRA and embedding files as A1111 users name them: `<lora:NAME:0.8>` prompt tags, NAME.safetensors in a LoRA folder,
the short hashes of the PNG infotext, and the description `mlx-sd info` prints.

References: A1111 modules/extra_networks.py (`re_extra_net`, tags removed from the prompt),
extensions-builtin/Lora/network.py (`NetworkOnDisk`: hash = `sshs_model_hash` or the "addnet" sha256 of the file after
its safetensors header, shorthash = its first 12 hex digits), extra_networks_lora.py (`Lora hashes: "NAME: hash"`) and
modules/textual_inversion/textual_inversion.py (embedding hash = sha256 of the whole file, 12 hex digits).
"""

import hashlib
import itertools
import re
from collections import Counter
from pathlib import Path

from .embeddings import describe_embedding, read_embedding
from .lora import check_scale
from .lora_formats import SUFFIXES, read_lora, read_safetensors_file
from .lora_keys import FAMILY_NAMES, KOHYA_PREFIXES, PEFT_PREFIXES, guess_family
from .weights import ModelLoadError, is_pickle

LORA_TAG = re.compile(r"<(?:lora|lyco):([^<>]*)>")  # A1111's `<lora:NAME>`, `<lora:NAME:WEIGHT>` (lyco: an alias)
MAX_TAGS = 16
MAX_NAME_LENGTH = 200
HASH_DIGITS = 12  # A1111's shorthash
BLOCK = 1 << 20

DEFAULT_LORA_DIR = "~/.mlx_sd/loras"  # where `mlx-sd generate` looks for <lora:NAME> files without --lora-dir
DEFAULT_EMBEDDINGS_DIR = "~/.mlx_sd/embeddings"  # and for embeddings named in prompts without --embeddings-dir
MAX_FOLDER_FILES = 10_000  # files of an embeddings folder looked at


def check_lora_name(name):
    """A LoRA name that stays inside its folder: no path separators, no `..`, no control characters."""
    if (
        not 0 < len(name) <= MAX_NAME_LENGTH
        or any(c in name for c in "/\\\0")
        or ".." in name
        or name.strip() != name
        or not name.isprintable()
    ):
        raise ValueError(f"invalid LoRA name {name!r}: a file name without folders or '..' is expected")
    return name


def extract_lora_tags(prompt):
    """A1111's `<lora:NAME:0.8>` / `<lora:NAME>` (scale 1.0) tags -> (prompt without them, [(NAME, scale), ...])."""
    loras = []
    for match in LORA_TAG.finditer(prompt):
        parts = match[1].split(":")
        if len(parts) > 2:
            raise ValueError(f"unsupported LoRA tag {match[0]!r}: use <lora:NAME> or <lora:NAME:WEIGHT>")
        name = check_lora_name(parts[0].strip())
        scale = check_scale(parts[1].strip()) if len(parts) == 2 else 1.0
        if any(n == name for n, _ in loras):
            raise ValueError(f"LoRA {name!r} is named twice in the prompt")
        loras.append((name, scale))
        if len(loras) > MAX_TAGS:
            raise ValueError(f"more than {MAX_TAGS} <lora:...> tags in one prompt")
    return LORA_TAG.sub("", prompt), loras


def find_lora(name, lora_dir):
    """The file NAME.safetensors directly inside lora_dir; ModelLoadError naming what is missing."""
    folder = Path(lora_dir).expanduser()
    path = folder / f"{check_lora_name(name)}.safetensors"
    if path.is_file():
        return path
    if not folder.is_dir():
        raise ModelLoadError(f"the LoRA folder {folder} does not exist (for <lora:{name}>)")
    pickles = [p.name for p in folder.glob(f"{name}.*") if is_pickle(p)]
    if pickles:
        raise ModelLoadError(f"{folder / pickles[0]} is a pickle file; mlx_sd loads LoRAs from .safetensors files only")
    raise ModelLoadError(f"no LoRA {name!r}: {path} does not exist")


def _sha256(path, offset=0):
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while block := f.read(BLOCK):
                digest.update(block)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror}") from None
    return digest.hexdigest()


def lora_hash(path):
    """A1111's LoRA hash for `Lora hashes: "NAME: HASH"`: the first 12 hex digits of the sha256 of the file after its
    safetensors header (kohya's "addnet" hash)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header = f.read(8)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror}") from None
    size = path.stat().st_size
    n = int.from_bytes(header, "little") if len(header) == 8 else size
    if n + 8 > size:
        raise ModelLoadError(f"{path} is not a safetensors file (its header is cut off)")
    return _sha256(path, 8 + n)[:HASH_DIGITS]


def embedding_hash(path):
    """A1111's embedding hash for `TI hashes: "NAME: HASH"`: the first 12 hex digits of the file's sha256."""
    return _sha256(Path(path))[:HASH_DIGITS]


def describe_adapter(path):
    """Lines for `mlx-sd info FILE.safetensors`: a LoRA's format, family, rank, layers and alpha, or an embedding's
    token, vectors and widths; ModelLoadError when the file is neither."""
    path = Path(path)
    tensors, _ = read_safetensors_file(path, "adapter")
    if tensors and all(any(k.endswith(s) for s, _ in SUFFIXES) for k in tensors):
        return _describe_lora(path)
    return describe_embedding(read_embedding(path))


def _describe_lora(path):
    lora = read_lora(path)
    kinds = Counter(p.kind for p in lora.patches.values())
    convs = sum(p.kind == "lora" and p.w["down"].ndim == 4 and p.w["down"].shape[2] > 1 for p in lora.patches.values())
    names = {"lora": "LoCon" if convs else "LoRA", "loha": "LoHa", "lokr": "LoKr", "full": "full deltas"}
    layout = "Kohya / A1111" if lora.layout == "kohya" else "diffusers / PEFT"
    prefixes = {**KOHYA_PREFIXES, **PEFT_PREFIXES}
    components = Counter(next((c for p, c in prefixes.items() if k.startswith(p)), "unet") for k in lora.patches)
    ranks = sorted({p.rank for p in lora.patches.values() if p.rank is not None})
    alphas = sorted({p.alpha for p in lora.patches.values() if p.alpha is not None})
    family = _family(lora)
    return [
        f"format: {layout} {', '.join(f'{names[k]} ({n})' for k, n in kinds.items())}",
        f"family: {FAMILY_NAMES.get(family, 'unknown')}",
        f"layers: {len(lora.patches)} ({', '.join(f'{c} {n}' for c, n in sorted(components.items()))})"
        + (f", {convs} with 3x3 or larger convolution kernels" if convs else ""),
        f"rank: {_span(ranks) if ranks else 'full'}",
        f"alpha: {_span(alphas) if alphas else 'none (scale 1)'}",
    ]


def _family(lora):
    """The family from kohya's training metadata, else from the weights (lora_formats.guess_family)."""
    meta = lora.metadata
    base = str(meta.get("ss_base_model_version", "")) + str(meta.get("modelspec.architecture", ""))
    if "sdxl" in base or "stable-diffusion-xl" in base:
        return "sdxl"
    if meta.get("ss_v2") == "True" or "stable-diffusion-v2" in base:
        return "sd2"
    if "sd_v1" in base or "stable-diffusion-v1" in base:
        return "sd1"
    return guess_family(lora)


def _span(values):
    return f"{values[0]:g}" if len(values) == 1 else f"{values[0]:g} to {values[-1]:g}"


def embeddings_in_prompts(folder, texts):
    """The NAME.safetensors files of `folder` whose NAME is a word of `texts` (A1111: an embedding's file name used
    in a prompt inserts it); none when the folder does not exist."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    text = " ".join(texts).lower()
    files = sorted(p for p in itertools.islice(folder.iterdir(), MAX_FOLDER_FILES) if p.suffix == ".safetensors")
    return [p for p in files if re.search(rf"(?<!\w){re.escape(p.stem.lower())}(?!\w)", text)]

"""Textual-inversion embeddings: A1111 (`emb_params`, `string_to_param.*`), diffusers (`{token: (n, dim)}`, e.g.
`learned_embeds.safetensors`) and SDXL (`clip_l` + `clip_g`) files, safetensors only.

Reference: diffusers/loaders/textual_inversion.py (`_retrieve_tokens_and_embeddings`); A1111
modules/textual_inversion/textual_inversion.py (`EmbeddingDatabase.load_from_file`: the file name is the word used in
prompts, a multi-vector embedding takes one token position per vector).
"""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import regex

from .lora_formats import read_safetensors_file
from .weights import ModelLoadError

MAX_VECTORS = 75  # an embedding must fit in one 75-token prompt chunk (A1111)
MAX_TOKEN_LENGTH = 100
SDXL_KEYS = ("clip_l", "clip_g")  # text_encoder (CLIP ViT-L), text_encoder_2 (OpenCLIP bigG)
# whitespace and the characters of A1111's prompt syntax cannot be part of an embedding's word
BAD_TOKEN = regex.compile(r"[\s()\[\]:\\|]")


@dataclass
class Embedding:
    """One embedding: the word that inserts it, and its vectors (n, dim) by text encoder ("" for SD 1.x / 2.x)."""

    token: str
    vectors: dict
    format: str
    path: Path

    @property
    def length(self):
        return next(iter(self.vectors.values())).shape[0]


def check_token(token):
    """The token if it can be written as one word of a prompt; ValueError otherwise."""
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
        raise ValueError(f"an embedding's token must be 1 to {MAX_TOKEN_LENGTH} characters, got {token!r}")
    if BAD_TOKEN.search(token) or not regex.search(r"[\p{L}\p{N}]", token):
        raise ValueError(
            f"embedding token {token!r} cannot be a word of a prompt: it needs a letter or digit and no spaces "
            "or ( ) [ ] : \\ |"
        )
    return token


def read_embedding(path, token=None):
    """Reads an embedding file; the token defaults to the stored one (diffusers) or the file name (A1111, SDXL)."""
    path = Path(path)
    tensors, _ = read_safetensors_file(path, "embedding")
    keys = sorted(tensors)
    if keys == ["emb_params"]:
        found = ("A1111", path.stem, {"": tensors["emb_params"]})
    elif keys == sorted(SDXL_KEYS):
        found = ("SDXL", path.stem, {k: tensors[k] for k in SDXL_KEYS})
    elif len(keys) == 1 and keys[0].startswith("string_to_param."):
        found = ("A1111", path.stem, {"": tensors[keys[0]]})
    elif len(keys) == 1:
        found = ("diffusers", keys[0], {"": tensors[keys[0]]})
    else:
        shown = ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")
        raise ModelLoadError(
            f"{path.name} is not a textual-inversion embedding (expected emb_params, clip_l + clip_g or one "
            f"token's vectors; found {shown})"
        )
    fmt, stored, vectors = found
    vectors = {k: _vectors(v, path, k) for k, v in vectors.items()}
    if len({v.shape[0] for v in vectors.values()}) > 1:
        raise ModelLoadError(f"{path.name}: clip_l and clip_g hold different numbers of vectors")
    return Embedding(check_token(stored if token is None else token), vectors, fmt, path)


def _vectors(value, path, key):
    what = f"{path.name}{f' ({key})' if key else ''}"
    if value.ndim == 1:
        value = value[None]
    if value.ndim != 2 or not 1 <= value.shape[0] <= MAX_VECTORS or value.shape[1] < 1:
        raise ModelLoadError(
            f"{what}: embedding vectors must be (n, dim) with 1 <= n <= {MAX_VECTORS}, got {tuple(value.shape)}"
        )
    value = value.astype(mx.float32)
    if not mx.all(mx.isfinite(value)).item():
        raise ModelLoadError(f"{what}: the embedding holds NaN or infinite values")
    return value


def describe_embedding(embedding):
    """Lines for `mlx-sd info`: format, token, vectors and their widths."""
    dims = {768: "SD 1.x", 1024: "SD 2.x"}
    if "" in embedding.vectors:
        dim = embedding.vectors[""].shape[1]
        widths = f"{dim} ({dims[dim]})" if dim in dims else str(dim)
    else:
        widths = ", ".join(f"{k} {v.shape[1]}" for k, v in embedding.vectors.items()) + " (SDXL)"
    return [
        f"format: textual-inversion embedding ({embedding.format})",
        f"token: {embedding.token}",
        f"vectors: {embedding.length}",
        f"dims: {widths}",
    ]

"""Applying LoRAs and textual-inversion embeddings to a pipeline's models, reversibly (`Adapters`), and for good
(`bake_loras`).

Float layers get `scale * dW` merged into their weights (no cost per step); the original weight is kept, and every
change of the LoRA set or of a scale recomputes the layer from it, so that unloading gives back the very same arrays.
Quantized layers (QuantizedLinear, QuantizedConv2d) cannot take a merge without requantizing, which would round the
change away; they are wrapped in a `LoRABranch`: y = Wq x + up(down(x)) (+ dense(x) for LoHa / LoKr / full deltas).
See lora_layers.py.
"""

import math
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx

from .embeddings import SDXL_KEYS, read_embedding
from .lora_formats import MAX_EXAMPLES, read_lora
from .lora_keys import FAMILY_NAMES, guess_family, module_names, target
from .lora_layers import (
    LoRABranch,
    bias_merge,
    get_module,
    layer_table,
    make_branch,
    merged_weight,
    set_module,
    set_param,
    weight_terms,
)
from .tokenizer import normalize
from .weights import ModelLoadError

MAX_SCALE = 10.0
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def check_scale(scale):
    """A LoRA scale as a float: finite and within +-MAX_SCALE; ValueError otherwise."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"LoRA scale must be a number, got {scale!r}") from None
    if not math.isfinite(value) or abs(value) > MAX_SCALE:
        raise ValueError(f"LoRA scale must be a finite number between -{MAX_SCALE:g} and {MAX_SCALE:g}, got {scale!r}")
    return value


@dataclass
class LoadedLoRA:
    path: Path
    scale: float
    patches: dict  # (component, module path) -> Patch


@dataclass
class _Attached:
    ref: weakref.ref  # the component's module; its state goes when the module is freed
    table: dict
    originals: dict = field(default_factory=dict)  # "path.param" -> the weight before any LoRA


@dataclass
class _TextEncoder:
    vocab_size: int
    hidden_size: int
    dtype: mx.Dtype


class Adapters:
    """The LoRAs and textual-inversion embeddings of one pipeline.

    `attach(name, module)` applies them to a component (unet, text_encoder, text_encoder_2) and must be called again
    for a component read anew from disk (low_memory); a freed component's state is dropped with it."""

    def __init__(self, family=None):
        self.family = family
        self.loras = {}  # name -> LoadedLoRA
        self.embeddings = {}  # token -> Embedding
        self._attached = {}
        self._tables = {}  # component -> layer table, kept while its module is freed
        self._text = {}  # text encoder -> _TextEncoder
        self._tokenizers = {}  # text encoder -> its tokenizer

    @property
    def scales(self):
        return {name: lora.scale for name, lora in self.loras.items()}

    # --- components ---------------------------------------------------------------------------

    def attach(self, name, module):
        """Applies the loaded LoRAs and embeddings to `module`, the pipeline's component `name`."""
        attached = self._attached.get(name)
        if attached is not None and attached.ref() is module:
            return
        table = self._tables[name] = layer_table(module)
        self._attached[name] = _Attached(weakref.ref(module, partial(self._forget, name)), table)
        if name in TEXT_ENCODERS:
            embeddings = module.text_model.embeddings
            config = module.config
            self._text[name] = _TextEncoder(
                config.vocab_size, config.hidden_size, embeddings.position_embedding.weight.dtype
            )
            self._apply_embeddings()
        self._refresh({key for lora in self.loras.values() for key in lora.patches if key[0] == name})

    def attach_tokenizer(self, encoder, tokenizer):
        """Registers the tokenizer of text encoder `encoder`, which learns the embeddings' words."""
        self._tokenizers[encoder] = tokenizer
        self._apply_embeddings()

    def _forget(self, name, ref):
        attached = self._attached.get(name)
        if attached is not None and attached.ref is ref:
            del self._attached[name]

    # --- LoRAs ----------------------------------------------------------------------------------

    def load_lora(self, path, scale=1.0, name=None):
        """Reads a LoRA file and applies it at `scale`; returns its name (default: the file name without suffix)."""
        scale = check_scale(scale)
        path = Path(path)
        name = path.stem if name is None else name
        if not isinstance(name, str) or not name:
            raise ValueError(f"a LoRA name must be a non-empty string, got {name!r}")
        if name in self.loras:
            raise ValueError(f"a LoRA named {name!r} is already loaded: unload it first or give another name")
        patches = resolve(read_lora(path), self._tables, self.family)
        self.loras[name] = LoadedLoRA(path, scale, patches)
        self._refresh(patches)
        return name

    def set_scale(self, name, scale):
        """Changes the scale of a loaded LoRA (0 turns it off without unloading it)."""
        scale = check_scale(scale)
        lora = self._lora(name)
        if scale != lora.scale:
            lora.scale = scale
            self._refresh(lora.patches)

    def unload_lora(self, name=None):
        """Removes one LoRA, or all (None); the layers they changed get their original weights back."""
        if name is not None:
            self._lora(name)
        keys = set()
        for n in list(self.loras) if name is None else [name]:
            keys |= self.loras.pop(n).patches.keys()
        self._refresh(keys)

    def _lora(self, name):
        if name not in self.loras:
            loaded = ", ".join(self.loras) or "none"
            raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
        return self.loras[name]

    def _refresh(self, keys):
        """Recomputes the given (component, path) layers from their originals and the LoRAs now loaded."""
        for component, path in sorted(keys):
            attached = self._attached.get(component)
            module = attached.ref() if attached is not None else None
            if module is not None:
                active = [
                    (lora.scale, lora.patches[(component, path)])
                    for lora in self.loras.values()
                    if (component, path) in lora.patches and lora.scale != 0
                ]
                mx.eval(_refresh_layer(module, path, attached, active))

    # --- embeddings -----------------------------------------------------------------------------

    def load_embedding(self, path, token=None):
        """Reads a textual-inversion embedding; its token (default: the stored one, else the file name) used as a
        word in a prompt inserts its vectors. Loading a token again replaces its embedding."""
        embedding = read_embedding(path, token)
        vectors = self._embedding_vectors(embedding)
        for token in [t for t in self.embeddings if normalize(t) == normalize(embedding.token)]:
            del self.embeddings[token]  # prompts match tokens in any case
        embedding.vectors = vectors
        self.embeddings[embedding.token] = embedding
        self._apply_embeddings()
        return embedding.token

    def unload_embedding(self, token=None):
        """Removes one embedding by its token, or all (None)."""
        if token is not None and token not in self.embeddings:
            raise ValueError(f"no embedding {token!r} is loaded (loaded: {', '.join(self.embeddings) or 'none'})")
        for t in list(self.embeddings) if token is None else [token]:
            del self.embeddings[t]
        self._apply_embeddings()

    def _embedding_vectors(self, embedding):
        """The embedding's vectors by text encoder of this model; ModelLoadError when it is for another model."""
        file, encoders = embedding.path.name, [e for e in TEXT_ENCODERS if e in self._text]
        if len(encoders) == 2 and "" in embedding.vectors:
            raise ModelLoadError(f"{file} is an embedding for one text encoder; SDXL needs clip_l and clip_g vectors")
        if len(encoders) == 1 and "" not in embedding.vectors:
            raise ModelLoadError(f"{file} is an SDXL embedding (clip_l + clip_g); this model has one text encoder")
        vectors = dict(
            zip(
                encoders,
                embedding.vectors.values() if len(encoders) == 1 else [embedding.vectors[k] for k in SDXL_KEYS],
            )
        )
        for encoder, v in vectors.items():
            width = self._text[encoder].hidden_size
            if v.shape[1] != width:
                guess = {768: " (SD 1.x)", 1024: " (SD 2.x)"}.get(v.shape[1], "")
                raise ModelLoadError(
                    f"{file} has {v.shape[1]}-wide vectors{guess}; this model's {encoder} takes {width}"
                )
        return vectors

    def _apply_embeddings(self):
        """Gives each tokenizer the embeddings' words and ids (after the vocabulary), each encoder their vectors."""
        for encoder, info in self._text.items():
            ids, offset = {}, info.vocab_size
            for token, embedding in self.embeddings.items():
                ids[token] = list(range(offset, offset + embedding.length))
                offset += embedding.length
            if encoder in self._tokenizers:
                self._tokenizers[encoder].set_embedding_tokens(ids)
            attached = self._attached.get(encoder)
            module = attached.ref() if attached is not None else None
            if module is not None:
                vectors = [e.vectors[encoder] for e in self.embeddings.values()]
                extra = mx.concatenate(vectors).astype(info.dtype) if vectors else None
                module.text_model.embeddings.set_extra(extra)


def resolve(lora, tables, family=None):
    """{(component, module path): Patch} of a read LoRA file, checked against the layer tables of a model of
    `family`: every layer of the file must land on a layer of the right shape (ModelLoadError otherwise)."""
    file = lora.path.name
    guessed = guess_family(lora)
    if guessed and family and guessed != family:
        raise ModelLoadError(f"{file} is an {FAMILY_NAMES[guessed]} LoRA; this model is {FAMILY_NAMES[family]}")
    names = {c: module_names(c, table) for c, table in tables.items()}
    patches, unmatched = {}, []
    for key, patch in lora.patches.items():
        found = target(key, lora.layout, names)
        if found is None:
            unmatched.append(key)
        elif found in patches:
            raise ModelLoadError(f"{file}: {key} and {patches[found].key} both change {'.'.join(found)}")
        else:
            _check_fit(file, key, patch, found, tables[found[0]][found[1]])
            patches[found] = patch
    if unmatched:
        hint = f" (it looks like an {FAMILY_NAMES[guessed]} LoRA)" if guessed else ""
        raise ModelLoadError(
            f"{file}: {len(unmatched)} of its {len(lora.patches)} layers match no layer of the "
            f"{FAMILY_NAMES.get(family, 'given')} model{hint}: {', '.join(sorted(unmatched)[:MAX_EXAMPLES])}"
        )
    return patches


def _check_fit(file, key, patch, found, layer):
    shape, out, inner = patch.shape2d, layer.shape[0], math.prod(layer.shape[1:])
    if shape is not None and shape != (out, inner):
        raise ModelLoadError(
            f"{file}: {key} changes a weight of {shape[0]} x {shape[1]}, but {'.'.join(found)} is "
            f"{' x '.join(map(str, layer.shape))} (a LoRA for another model?)"
        )
    if "diff_b" in patch.w and (not layer.bias or patch.w["diff_b"].size != out):
        raise ModelLoadError(f"{file}: {key} changes a bias of {patch.w['diff_b'].size}; {'.'.join(found)} has none")


def _refresh_layer(module, path, attached, active):
    """Sets one layer to its original plus the active (scale, patch) changes; returns the arrays to evaluate."""
    layer = attached.table[path]
    current = get_module(module, path)
    base = current.base if isinstance(current, LoRABranch) else current
    biases = bias_merge([s * p.bias() for s, p in active if p.bias() is not None])
    out = [set_param(attached.originals, f"{path}.bias", base, "bias", biases)]
    if layer.quantized:
        branch = make_branch(base, layer, active)
        set_module(module, path, branch or base)
        if branch is not None:
            out += [branch._down, branch._up, branch._dense]
    else:
        low, dense = weight_terms(active, layer)
        merge = partial(merged_weight, low=low, dense=dense) if low or dense else None
        out.append(set_param(attached.originals, f"{path}.weight", base, "weight", merge))
    return [a for a in out if a is not None]


def bake_loras(components, loras, family=None):
    """Merges LoRA files [(path, scale)] for good into the float models {component name: module} (`mlx-sd convert
    --lora`, before quantizing); no original weights are kept."""
    tables = {name: layer_table(module) for name, module in components.items()}
    for path, scale in loras:
        scale = check_scale(scale)
        for (component, layer_path), patch in resolve(read_lora(path), tables, family).items():
            layer = tables[component][layer_path]
            if layer.quantized:
                raise ValueError(f"cannot bake a LoRA into the quantized layer {component}.{layer_path}: bake first")
            base = get_module(components[component], layer_path)
            if patch.bias() is not None:
                set_param({}, "bias", base, "bias", bias_merge([scale * patch.bias()]))
            low, dense = weight_terms([(scale, patch)], layer)
            if low or dense:
                set_param({}, "weight", base, "weight", partial(merged_weight, low=low, dense=dense))
            mx.eval(base.parameters())


def parse_lora_option(text):
    """`PATH[:SCALE]` (the --lora option) -> (path, scale): a number after the last colon is the scale (checked),
    anything else is part of the path."""
    path, colon, scale = str(text).rpartition(":")
    try:
        float(scale)
    except ValueError:
        return str(text), 1.0
    if not colon or not path:
        return str(text), 1.0
    return path, check_scale(scale)

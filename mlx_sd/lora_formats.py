"""LoRA files: reading them (safetensors only), grouping their keys by layer, and each layer's weight change.

Layouts (see ../shared/reference/adapters-and-apis.md): Kohya / A1111 (`lora_unet_*`, `lora_te_*`, `lora_te1_*`,
`lora_te2_*`, with diffusers or LDM block names), diffusers / PEFT (`unet.*.lora_A.weight`, `text_encoder.*`,
`text_encoder_2.*`, `*.lora.down.weight`, `*.lora_linear_layer.down.weight`) and the older attention-processor layout
(`*.processor.to_q_lora.down.weight`). Layer kinds: LoRA / LoCon (with optional Tucker `lora_mid`), LyCORIS LoHa and
LoKr, and full deltas (`diff`, `diff_b`). The formulas follow A1111's extensions-builtin/Lora (network_lora.py,
network_hada.py, network_lokr.py, network_full.py, lyco_helpers.py); where each layer goes is lora_keys.py.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .lora_keys import KOHYA_PREFIXES, PEFT_PREFIXES
from .weights import ModelLoadError, refuse_pickle

# key suffix -> role in its layer (longest suffixes that share an ending come first)
SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "diff_b"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"),  # old attention processors: attn1.processor.to_q_lora.down.weight
    ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
    (".dora_scale", "dora"),
    (".lora_magnitude_vector.weight", "dora"),
    (".lora_magnitude_vector", "dora"),
    *((f".hada_{n}", f"hada_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")),
    *((f".lokr_{n}", f"lokr_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b", "w1", "w2", "t2")),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
)
# LyCORIS kinds mlx_sd does not apply, recognised to name them in the error
UNSUPPORTED = {"oft_blocks": "OFT", "oft_diag": "OFT", "w_norm": "norm", "b_norm": "norm", "on_input": "IA3"}
MAX_EXAMPLES = 3


@dataclass
class Patch:
    """One layer's weight change in a LoRA file, in PyTorch layout: `delta2d()` is (out, in * kh * kw)."""

    key: str  # the file's name for the layer
    kind: str  # lora, loha, lokr or full
    w: dict  # role -> array
    scale: float  # alpha / rank (or 1)
    alpha: float | None = None

    @property
    def rank(self):
        w = self.w
        if self.kind == "lora":
            return w["down"].shape[0]
        if self.kind == "loha":
            return w["hada_w1_b"].shape[0]
        if self.kind == "lokr":  # A1111 network_lokr.py: the second factor's rank wins
            for role in ("lokr_w2_b", "lokr_w1_b"):
                if role in w:
                    return w[role].shape[0]
        return None

    @property
    def shape2d(self):
        """(out, in * kh * kw) of the change, from the factor shapes alone; None for a bias change only."""
        w = self.w
        if self.kind == "lora":
            down = w["down"].shape
            inner = math.prod(down[1:]) * (math.prod(w["mid"].shape[2:]) if "mid" in w else 1)
            return (w["up"].shape[0], inner)
        if self.kind == "loha":
            return _factor_shape(w, "hada_w1_a", "hada_w1_b", "hada_t1")
        if self.kind == "lokr":
            (a, b), (c, d) = _lokr_shape(w, "1"), _lokr_shape(w, "2")
            return (a * c, b * d)
        return (w["diff"].shape[0], math.prod(w["diff"].shape[1:])) if "diff" in w else None

    @property
    def factors(self):
        """(up (out, r) with the scale folded in, down (r, in * kh * kw)) of a plain LoRA; None for other kinds."""
        if self.kind != "lora" or "mid" in self.w:
            return None
        up, down = self.w["up"], self.w["down"]
        return up.reshape(up.shape[0], -1).astype(mx.float32) * self.scale, down.reshape(down.shape[0], -1)

    def delta2d(self):
        """The weight change (out, in * kh * kw) in float32, scaled by alpha / rank, or None (a bias change only)."""
        w = {k: v.astype(mx.float32) for k, v in self.w.items()}
        if self.kind == "lora":
            up, down = w["up"].reshape(w["up"].shape[0], -1), w["down"].reshape(w["down"].shape[0], -1)
            dw = _tucker(w["mid"], up.T, down) if "mid" in w else up @ down
        elif self.kind == "loha":
            dw = _product(w, "hada_w1_a", "hada_w1_b", "hada_t1") * _product(w, "hada_w2_a", "hada_w2_b", "hada_t2")
        elif self.kind == "lokr":
            w1, w2 = _lokr_factor(w, "1"), _lokr_factor(w, "2")
            dw = (w1[:, None, :, None] * w2[None, :, None, :]).reshape(w1.shape[0] * w2.shape[0], -1)  # kron
        elif "diff" in w:
            dw = w["diff"]
        else:
            return None
        return dw.reshape(dw.shape[0], -1) * self.scale

    def bias(self):
        """The bias change (out,) in float32, or None; a LoRA's own bias (PEFT lora_B.bias) is scaled with it."""
        if "diff_b" not in self.w:
            return None
        return self.w["diff_b"].astype(mx.float32).reshape(-1) * (self.scale if self.kind == "lora" else 1.0)


def _tucker(t, wa, wb):
    """lyco_helpers.make_weight_cp: t (r, r, kh, kw), wa (r, out), wb (r, in) -> (out, in * kh * kw)."""
    wa, wb = wa.reshape(wa.shape[0], -1), wb.reshape(wb.shape[0], -1)
    return mx.einsum("abkl,ao,bi->oikl", t, wa, wb).reshape(wa.shape[1], -1)


def _product(w, a, b, t):
    """a @ b, or with a Tucker core t, _tucker(t, a, b) (LoHa's and LoKr's factor pairs)."""
    if t in w:
        return _tucker(w[t], w[a], w[b])
    return w[a] @ w[b].reshape(w[b].shape[0], -1)


def _factor_shape(w, a, b, t):
    if t in w:  # Tucker factors are (r, out) and (r, in)
        return w[a].shape[1], w[b].shape[1] * math.prod(w[t].shape[2:])
    return w[a].shape[0], math.prod(w[b].shape[1:])


def _lokr_factor(w, i):
    full = w.get(f"lokr_w{i}")
    if full is not None:
        return full.reshape(full.shape[0], -1)
    return _product(w, f"lokr_w{i}_a", f"lokr_w{i}_b", f"lokr_t{i}")


def _lokr_shape(w, i):
    full = w.get(f"lokr_w{i}")
    if full is not None:
        return full.shape[0], math.prod(full.shape[1:])
    return _factor_shape(w, f"lokr_w{i}_a", f"lokr_w{i}_b", f"lokr_t{i}")


KINDS = {
    "lora": ({"down", "up"}, {"mid", "diff_b"}),
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"hada_t1", "hada_t2"}),
    "lokr": (set(), {f"lokr_{n}" for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}),
    "full": (set(), {"diff", "diff_b"}),
}


def _kind(key, roles):
    """The layer kind of a group of roles; ModelLoadError when the group is incomplete or mixes kinds."""
    for kind, (required, optional) in KINDS.items():
        if roles and required <= roles <= required | optional and _complete(kind, roles):
            return kind
    raise ModelLoadError(
        f"incomplete or unknown LoRA layer {key}: it has {', '.join(sorted(roles)) or 'only an alpha'}"
    )


def _complete(kind, roles):
    if kind == "loha":
        return ("hada_t1" in roles) == ("hada_t2" in roles)
    if kind == "lokr":
        for i in "12":
            split = {f"lokr_w{i}_a", f"lokr_w{i}_b"} & roles
            if (f"lokr_w{i}" in roles) == bool(split) or len(split) == 1:
                return False
        return not ("lokr_t2" in roles and "lokr_w2" in roles)
    return True


@dataclass
class LoRAFile:
    """A parsed LoRA file: its patches by the file's layer name, and its layout."""

    path: Path
    patches: dict  # layer name in the file -> Patch
    layout: str  # "kohya" or "diffusers"
    metadata: dict


def read_safetensors_file(path, what):
    """(tensors, metadata) of one .safetensors file; pickle files are refused unread."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise ModelLoadError(f"no {what} file {path}")
    try:
        tensors, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not read {what} {path}: not a valid safetensors file ({reason})") from None
    return tensors, metadata


def read_lora(path):
    """Reads and groups a LoRA file; ModelLoadError for an unreadable file, unknown keys, DoRA or an empty file."""
    path = Path(path)
    tensors, metadata = read_safetensors_file(path, "LoRA")
    groups, unknown = {}, []
    for key, value in tensors.items():
        suffix = next(((s, role) for s, role in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
        else:
            groups.setdefault(key[: -len(suffix[0])], {})[suffix[1]] = value
    if unknown:
        raise ModelLoadError(f"{path.name}: {_unknown_keys_message(unknown)}")
    if not groups:
        raise ModelLoadError(f"{path.name} holds no LoRA weights")
    dora = [k for k, roles in groups.items() if "dora" in roles]
    if dora:
        raise ModelLoadError(f"{path.name} is a DoRA (dora_scale, e.g. {dora[0]}), which mlx_sd does not support")
    kohya = [k for k in groups if k.startswith(tuple(KOHYA_PREFIXES))]
    if kohya and len(kohya) != len(groups):
        other = next(k for k in groups if k not in set(kohya))
        raise ModelLoadError(
            f"{path.name} mixes Kohya (lora_unet_*, lora_te*) and diffusers keys ({kohya[0]}, {other})"
        )
    peft_config = _peft_metadata(metadata, path)
    patches = {key: _patch(key, roles, peft_config, path) for key, roles in groups.items()}
    return LoRAFile(path, patches, "kohya" if kohya else "diffusers", metadata)


def _unknown_keys_message(keys):
    kinds = sorted({UNSUPPORTED[p] for k in keys for p in UNSUPPORTED if k.endswith("." + p)})
    what = f"{'/'.join(kinds)} layers, which mlx_sd does not support" if kinds else "keys of no known LoRA layout"
    return f"{len(keys)} {what}: {', '.join(sorted(keys)[:MAX_EXAMPLES])}"


def _patch(key, roles, peft_config, path):
    alpha = roles.pop("alpha", None)
    kind = _kind(key, set(roles))
    if alpha is not None:
        if alpha.size != 1:
            raise ModelLoadError(f"{path.name}: {key}.alpha should be one number, has shape {tuple(alpha.shape)}")
        alpha = float(alpha.astype(mx.float32).item())
    patch = Patch(key, kind, roles, 1.0, alpha)
    rank = patch.rank
    use_rslora = False
    if alpha is None and peft_config and not key.startswith(tuple(KOHYA_PREFIXES)):
        alpha, rank, use_rslora = _peft_alpha(key, peft_config, rank)
        patch.alpha = alpha
    if alpha is not None and rank:
        if not math.isfinite(alpha):
            raise ModelLoadError(f"{path.name}: {key} has alpha {alpha}")
        patch.scale = alpha / (math.sqrt(rank) if use_rslora else rank)
    _check_factor_shapes(patch, path)
    return patch


def _check_factor_shapes(patch, path):
    w = patch.w
    if patch.kind == "lora":
        up, down, mid = w["up"], w["down"], w.get("mid")
        r = down.shape[0]
        ok = up.ndim in (2, 4) and up.shape[1] == r and math.prod(up.shape[2:]) == 1 and down.ndim in (2, 4)
        ok = ok and (mid is None or (mid.ndim == 4 and mid.shape[:2] == (r, r)))
    elif patch.kind == "loha":
        ok = _pair_ok(w, "hada_w1_a", "hada_w1_b", "hada_t1") and _pair_ok(w, "hada_w2_a", "hada_w2_b", "hada_t2")
        ok = ok and _factor_shape(w, "hada_w1_a", "hada_w1_b", "hada_t1") == _factor_shape(
            w, "hada_w2_a", "hada_w2_b", "hada_t2"
        )
    elif patch.kind == "lokr":
        ok = all(
            w[f"lokr_w{i}"].ndim in (2, 4)
            if f"lokr_w{i}" in w
            else _pair_ok(w, f"lokr_w{i}_a", f"lokr_w{i}_b", f"lokr_t{i}")
            for i in "12"
        )
    else:
        ok = w.get("diff", mx.zeros((1, 1))).ndim in (2, 4) and w.get("diff_b", mx.zeros(1)).ndim == 1
    if not ok:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(w.items()))
        raise ModelLoadError(f"{path.name}: the factors of {patch.key} do not fit together ({shapes})")


def _pair_ok(w, a, b, t):
    """Factor shapes: a (out, r) and b (r, in...), or with a Tucker core t (r, r, kh, kw), a (r, out), b (r, in)."""
    A, B = w[a], w[b]
    if A.ndim != 2 or B.ndim not in (2, 4):
        return False
    if t in w:
        T = w[t]
        return T.ndim == 4 and A.shape[0] == B.shape[0] == T.shape[0] == T.shape[1] and B.ndim == 2
    return A.shape[1] == B.shape[0]


def _peft_metadata(metadata, path):
    """diffusers' `lora_adapter_metadata` (PEFT LoraConfig entries by component prefix), or {}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise ModelLoadError(f"{path.name}: its lora_adapter_metadata is not valid JSON") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path.name}: its lora_adapter_metadata is not a JSON object")
    if any(k.endswith("use_dora") and v for k, v in config.items()):
        raise ModelLoadError(f"{path.name} is a DoRA (use_dora), which mlx_sd does not support")
    return config


def _peft_alpha(key, config, rank):
    """PEFT's (lora_alpha, r, use_rslora) of one layer from the adapter metadata; patterns are matched as module
    names (a `^` pattern whole, others as a dotted suffix), never as regular expressions from the file."""
    prefix = next((p for p in PEFT_PREFIXES if key.startswith(p)), "unet.")
    module = key[len(prefix) :] if key.startswith(prefix) else key

    def pick(name, default):
        patterns = config.get(prefix + name + "_pattern") or {}
        for pattern, value in patterns.items() if isinstance(patterns, dict) else ():
            exact = pattern.startswith("^")
            pattern = pattern.lstrip("^")
            if module == pattern or (not exact and module.endswith("." + pattern)):
                return value
        return config.get(prefix + ("lora_alpha" if name == "alpha" else "r"), default)

    r = pick("rank", rank)
    alpha = pick("alpha", r)
    if not all(isinstance(v, (int, float)) and v > 0 for v in (r, alpha)):
        raise ModelLoadError(f"invalid lora_alpha {alpha!r} or r {r!r} in the adapter metadata for {key}")
    return float(alpha), r, bool(config.get(prefix + "use_rslora", False))

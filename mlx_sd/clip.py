"""CLIP text encoder, matching transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`.

SD 1.x uses CLIP ViT-L/14 (quick_gelu), SD 2.x OpenCLIP ViT-H (gelu, 23 layers), SDXL both CLIP ViT-L and
OpenCLIP bigG with a text projection. Reference: transformers/models/clip/modeling_clip.py.
"""

from dataclasses import dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn

from .activations import compute_dtype, gelu, quick_gelu

# MLX's own nn.gelu_fast_approx and nn.gelu off the CPU's float32 path (activations.py: MLX's CPU exp and erf are
# scalar loops; with them SD 2's text encoder (OpenCLIP ViT-H) took 1.9 s for 2 x 77 tokens there, 0.9 s so)
_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


@dataclass
class CLIPTextConfig:
    """The text encoder's `config.json`; defaults are transformers' `CLIPTextConfig` defaults."""

    hidden_size: int = 512
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_hidden_layers: int = 12
    max_position_embeddings: int = 77
    vocab_size: int = 49408
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    eos_token_id: int = 49407
    with_projection: bool = False

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        # The projection head is not a config field: the architecture name says whether there is one.
        kwargs["with_projection"] = "CLIPTextModelWithProjection" in (d.get("architectures") or [])
        return cls(**kwargs)


@dataclass
class CLIPTextOutput:
    last_hidden_state: mx.array  # (B, L, hidden) after the final layer norm
    pooler_output: mx.array  # (B, hidden) last_hidden_state at the EOS position
    hidden_states: list = field(default_factory=list)  # embeddings, then each layer's output (before final norm)
    text_embeds: mx.array | None = None  # (B, projection_dim) projected pooler_output, with_projection only


class CLIPTextEmbeddings(nn.Module):
    """Token + position embeddings; ids from vocab_size on are textual-inversion vectors (`set_extra`), looked up
    apart from the token embedding (which may be quantized)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def set_extra(self, vectors):
        """Textual-inversion vectors (n, hidden) for ids vocab_size ... vocab_size + n - 1, or None; private, so
        not a parameter of the model."""
        if vectors is None:
            self.pop("_extra", None)
        else:
            self._extra = vectors

    def __call__(self, input_ids):
        """(B, L, hidden) in the compute dtype of the weights' (activations.compute_dtype)."""
        L = input_ids.shape[1]
        position = self.position_embedding.weight[:L]
        dtype = compute_dtype(position.dtype)
        position = position.astype(dtype)
        if "_extra" not in self:
            return self.token_embedding(input_ids).astype(dtype) + position
        extra_ids = input_ids - self.vocab_size
        is_extra = extra_ids >= 0
        tokens = self.token_embedding(mx.where(is_extra, 0, input_ids))
        extra = self._extra[mx.clip(extra_ids, 0, self._extra.shape[0] - 1)].astype(tokens.dtype)
        return mx.where(is_extra[..., None], extra, tokens).astype(dtype) + position


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        dims = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = (dims // self.num_heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x):
        B, L, C = x.shape
        q, k, v = (
            proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)  # (B, heads, L, head_dim)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal")
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, C))  # (B, L, hidden)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP text encoder; with `config.with_projection` it is `CLIPTextModelWithProjection` (SDXL's second encoder)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; expected one of {sorted(_ACTIVATIONS)}")
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.with_projection:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def __call__(self, input_ids) -> CLIPTextOutput:
        """input_ids: (B, L) integer token ids, L <= max_position_embeddings."""
        B, L = input_ids.shape
        if self.config.max_position_embeddings < L:
            raise ValueError(
                f"sequence length {L} exceeds max_position_embeddings {self.config.max_position_embeddings}"
            )
        tm = self.text_model
        x = tm.embeddings(input_ids)
        hidden_states = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            hidden_states.append(x)
        x = tm.final_layer_norm(x)

        if self.config.eos_token_id == 2:
            # Legacy configs (eos_token_id wrongly 2): the EOS token is the highest id, first one on ties.
            eos_pos = mx.argmax(input_ids, axis=-1)
        else:
            eos_pos = mx.argmax((input_ids == self.config.eos_token_id).astype(mx.int32), axis=-1)
        pooled = x[mx.arange(B), eos_pos]  # (B, hidden)

        text_embeds = self.text_projection(pooled) if self.config.with_projection else None
        return CLIPTextOutput(x, pooled, hidden_states, text_embeds)


def sanitize(weights):
    """Adds the `text_model.` prefix where transformers 5 `CLIPTextModel.save_pretrained` leaves it out
    (Hub checkpoints and `CLIPTextModelWithProjection` carry it) and drops the `position_ids` buffers."""
    out = {}
    for key, value in weights.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[key] = value
    return out

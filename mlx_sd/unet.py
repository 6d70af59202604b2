"""diffusers' UNet2DConditionModel (SD 1.x, SD 2.x, SDXL) in MLX, NHWC.

Reference: diffusers/models/unets/unet_2d_condition.py, unets/unet_2d_blocks.py,
transformers/transformer_2d.py, attention.py, resnet.py and embeddings.py (diffusers 0.42.1).
"""

import math
from dataclasses import dataclass, field
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .activations import gelu, silu
from .attention import attention
from .convolution import conv3x3, evaluate_blocks, whole_images
from .norms import GroupNorm, norm_act

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# config key -> the values this implementation supports (the first one is diffusers' default)
SUPPORTED_VALUES = {
    "act_fn": ("silu", "swish"),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "center_input_sample": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type": (None, "text_time"),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "mid_block_scale_factor": (1.0,),
    "downsample_padding": (1,),
    "reverse_transformer_layers_per_block": (None,),
}


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: list = field(default_factory=lambda: [320, 640, 1280, 1280])
    down_block_types: list = field(default_factory=lambda: ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up_block_types: list = field(default_factory=lambda: ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    layers_per_block: list = field(default_factory=lambda: [2] * 4)
    num_attention_heads: list = field(default_factory=lambda: [8] * 4)
    cross_attention_dim: list = field(default_factory=lambda: [1280] * 4)
    transformer_layers_per_block: list = field(default_factory=lambda: [1] * 4)
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    sample_size: int = 64

    @classmethod
    def from_dict(cls, d):
        """Builds the config from unet/config.json; raises ValueError for features this UNet does not implement."""
        for key, allowed in SUPPORTED_VALUES.items():
            if d.get(key, allowed[0]) not in allowed:
                raise ValueError(f"unsupported UNet config: {key}={d[key]!r} (mlx_sd supports {list(allowed)})")
        default = cls()
        down = list(d.get("down_block_types", default.down_block_types))
        up = list(d.get("up_block_types", default.up_block_types))
        for kind, types, known in (("down", down, DOWN_BLOCKS), ("up", up, UP_BLOCKS)):
            for t in types:
                if t not in known:
                    raise ValueError(f"unsupported UNet {kind} block type {t!r} (mlx_sd supports {list(known)})")
        n = len(down)
        if len(up) != n or len(d.get("block_out_channels", default.block_out_channels)) != n:
            raise ValueError(f"UNet config needs {n} up_block_types and block_out_channels, one per down block")
        if d.get("norm_num_groups", 32) is None:
            raise ValueError("unsupported UNet config: norm_num_groups=None")

        def per_block(key, fallback):
            value = d.get(key, fallback)
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n or not all(isinstance(v, int) for v in values):
                raise ValueError(f"unsupported UNet config: {key}={value!r} (need an int or {n} ints)")
            return values

        # SD configs name the head count `attention_head_dim` (diffusers: num_attention_heads or attention_head_dim)
        heads_key = "num_attention_heads" if d.get("num_attention_heads") is not None else "attention_head_dim"
        known = cls.__dataclass_fields__.keys() - {"num_attention_heads"}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        kwargs.update(
            down_block_types=down,
            up_block_types=up,
            num_attention_heads=per_block(heads_key, 8),
            layers_per_block=per_block("layers_per_block", 2),
            cross_attention_dim=per_block("cross_attention_dim", 1280),
            transformer_layers_per_block=per_block("transformer_layers_per_block", 1),
        )
        config = cls(**kwargs)
        if config.addition_embed_type == "text_time" and None in (
            config.addition_time_embed_dim,
            config.projection_class_embeddings_input_dim,
        ):
            raise ValueError(
                "text_time UNet config needs addition_time_embed_dim and projection_class_embeddings_input_dim"
            )
        return config


def timestep_embedding(timesteps, dim, flip_sin_to_cos, freq_shift, max_period=10000):
    """diffusers get_timestep_embedding: (N,) -> (N, dim) float32 sinusoidal features."""
    half = dim // 2
    emb = timesteps.astype(mx.float32)[:, None] * mx.array(_frequencies(half, freq_shift, max_period))  # (N, half)
    sin, cos = mx.sin(emb), mx.cos(emb)
    emb = mx.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2 == 1:
        emb = mx.pad(emb, [(0, 0), (0, 1)])
    return emb


@lru_cache
def _frequencies(half, freq_shift, max_period):
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
    # exp in float64 rounded to float32 matches torch's float32 exp where MLX's faster exp is an ulp off
    return np.exp(exponent.astype(np.float64)).astype(np.float32)[None, :]  # (1, half)


def upsample_nearest(x, size):
    """F.interpolate(mode="nearest", size=size) on NHWC: source index floor(dst * (in / out)) in float32, as PyTorch."""
    for axis, out in zip((1, 2), size):
        n = x.shape[axis]
        scale = mx.array(n, dtype=mx.float32) / out
        src = mx.floor(mx.arange(out, dtype=mx.float32) * scale).astype(mx.int32)
        x = mx.take(x, mx.minimum(src, n - 1), axis=axis)
    return x


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dims, dims):
        super().__init__()
        self.linear_1 = nn.Linear(in_dims, dims)
        self.linear_2 = nn.Linear(dims, dims)

    def __call__(self, x):
        return self.linear_2(silu(self.linear_1(x)))


class Attention(nn.Module):
    """Multi-head attention; keys/values come from `context` (cross-attention) or from x (self-attention)."""

    def __init__(self, dims, heads, head_dim, context_dims=None, upcast=False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.scale = head_dim**-0.5
        self.upcast = upcast
        self.to_q = nn.Linear(dims, inner, bias=False)
        self.to_k = nn.Linear(context_dims or dims, inner, bias=False)
        self.to_v = nn.Linear(context_dims or dims, inner, bias=False)
        self.to_out = [nn.Linear(inner, dims), nn.Dropout(0.0)]

    def __call__(self, x, context=None):
        context = x if context is None else context
        B, L, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # (B, L, heads * d) -> (B, heads, L, d)
        q, k, v = (t.reshape(B, t.shape[1], self.heads, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
        if self.upcast and x.dtype == mx.float16:
            q, k, v = (t.astype(mx.float32) for t in (q, k, v))
        out = attention(q, k, v, self.scale).astype(x.dtype)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, L, heads * d)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    def __init__(self, dims, inner):
        super().__init__()
        self.proj = nn.Linear(dims, 2 * inner)

    def __call__(self, x):
        x, gate = mx.split(self.proj(x), 2, axis=-1)
        return x * gelu(gate)  # exact (erf) gelu


# GEGLU projection elements per block of tokens on the CPU (4M: 16 MiB in float32)
FEED_FORWARD_BLOCK = 2**22


class FeedForward(nn.Module):
    def __init__(self, dims, mult=4):
        super().__init__()
        self.net = [GEGLU(dims, mult * dims), nn.Dropout(0.0), nn.Linear(mult * dims, dims)]
        self.inner = mult * dims

    def __call__(self, x):
        """On the CPU, blocks of tokens evaluated one after the other, so that the 8x wider GEGLU activations
        exist for one block at a time (as convolution.conv3x3 does for images)."""
        B, L, _ = x.shape
        block = max(1, FEED_FORWARD_BLOCK // (B * 2 * self.inner))
        if block >= L or not evaluate_blocks():
            return self.net[2](self.net[0](x))
        outs = []
        for i in range(0, L, block):
            outs.append(self.net[2](self.net[0](x[:, i : i + block])))
            mx.eval(outs[-1])
        return mx.concatenate(outs, axis=1)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dims, heads, head_dim, context_dims, upcast):
        super().__init__()
        self.norm1 = nn.LayerNorm(dims, eps=1e-5)
        self.attn1 = Attention(dims, heads, head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dims, eps=1e-5)
        self.attn2 = Attention(dims, heads, head_dim, context_dims, upcast=upcast)
        self.norm3 = nn.LayerNorm(dims, eps=1e-5)
        self.ff = FeedForward(dims)

    def __call__(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    def __init__(self, config: UNetConfig, channels, heads, num_layers, context_dims):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.norm = GroupNorm(config.norm_num_groups, channels, eps=1e-6, pytorch_compatible=True)
        # SD 1.x checkpoints hold 1x1 convs, SD 2.x / SDXL linear layers; on NHWC both act on the last axis
        if config.use_linear_projection:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, kernel_size=1)
            self.proj_out = nn.Conv2d(inner, channels, kernel_size=1)
        self.transformer_blocks = [
            BasicTransformerBlock(inner, heads, head_dim, context_dims, config.upcast_attention)
            for _ in range(num_layers)
        ]

    def __call__(self, x, context):
        B, H, W, _ = x.shape
        h = self.proj_in(self.norm(x)).reshape(B, H * W, -1)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        return self.proj_out(h.reshape(B, H, W, -1)) + x  # (B, H, W, C)


class ResnetBlock2D(nn.Module):
    def __init__(self, config: UNetConfig, in_channels, out_channels, temb_channels):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, pytorch_compatible=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, pytorch_compatible=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def __call__(self, x, temb):
        # on the CPU the norms and activations run block by block inside the convolutions (convolution.py)
        h = conv3x3(self.conv1, x, norm_act(self.norm1, x, silu))
        h = h + self.time_emb_proj(silu(temb))[:, None, None, :]
        shortcut = self.conv_shortcut if "conv_shortcut" in self else (lambda rows: rows)
        return conv3x3(self.conv2, h, norm_act(self.norm2, h, silu), residual=lambda a, b: shortcut(x[:, a:b]))


class Downsample2D(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def __call__(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def __call__(self, x, size):
        if tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):  # exact 2x: convolution.upsample2x's broadcast
            return conv3x3(self.conv, x, upsample=True)
        return self.conv(upsample_nearest(x, size))


class DownBlock2D(nn.Module):
    """DownBlock2D, or CrossAttnDownBlock2D when `cross_attention` (a Transformer2DModel after each resnet)."""

    def __init__(self, config: UNetConfig, i, in_channels, temb_channels, cross_attention, add_downsample):
        super().__init__()
        out_channels = config.block_out_channels[i]
        n = config.layers_per_block[i]
        self.resnets = [
            ResnetBlock2D(config, in_channels if j == 0 else out_channels, out_channels, temb_channels)
            for j in range(n)
        ]
        if cross_attention:
            self.attentions = [
                Transformer2DModel(
                    config,
                    out_channels,
                    config.num_attention_heads[i],
                    config.transformer_layers_per_block[i],
                    config.cross_attention_dim[i],
                )
                for _ in range(n)
            ]
        if add_downsample:
            self.downsamplers = [Downsample2D(out_channels)]

    def __call__(self, x, temb, context, layers=None):
        """(x, the skip states); `layers`: a range of the layers to run (all, and then the downsampler, if None)."""
        states = []
        for j in range(len(self.resnets)) if layers is None else layers:
            x = self.resnets[j](x, temb)
            if "attentions" in self:
                x = self.attentions[j](x, context)
            states.append(x)
        if "downsamplers" in self and layers is None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock2D(nn.Module):
    """UpBlock2D, or CrossAttnUpBlock2D when `cross_attention`; each resnet eats one skip connection."""

    def __init__(self, config: UNetConfig, i, in_channels, prev_channels, temb_channels, cross_attention, add_upsample):
        super().__init__()
        rev = len(config.block_out_channels) - 1 - i  # the matching down block
        out_channels = config.block_out_channels[rev]
        n = config.layers_per_block[rev] + 1
        self.resnets = [
            ResnetBlock2D(
                config,
                (prev_channels if j == 0 else out_channels) + (in_channels if j == n - 1 else out_channels),
                out_channels,
                temb_channels,
            )
            for j in range(n)
        ]
        if cross_attention:
            self.attentions = [
                Transformer2DModel(
                    config,
                    out_channels,
                    config.num_attention_heads[rev],
                    config.transformer_layers_per_block[rev],
                    config.cross_attention_dim[rev],
                )
                for _ in range(n)
            ]
        if add_upsample:
            self.upsamplers = [Upsample2D(out_channels)]

    def __call__(self, x, temb, context, skips, upsample_size, layers=None):
        """Runs the layers (a range; all, and then the upsampler, if None), each popping its skip from `skips`."""
        for j in range(len(self.resnets)) if layers is None else layers:
            x = self.resnets[j](mx.concatenate([x, skips.pop()], axis=-1), temb)
            if "attentions" in self:
                x = self.attentions[j](x, context)
        if "upsamplers" in self and layers is None:
            x = self.upsamplers[0](x, upsample_size)
        return x


def down_blocks(config: UNetConfig, temb_channels):
    """The UNet's (and a ControlNet's) down blocks, each halving the size but the last."""
    channels, n = config.block_out_channels, len(config.block_out_channels)
    return [
        DownBlock2D(
            config,
            i,
            channels[max(i - 1, 0)],
            temb_channels,
            cross_attention=config.down_block_types[i] == "CrossAttnDownBlock2D",
            add_downsample=i < n - 1,
        )
        for i in range(n)
    ]


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, config: UNetConfig, temb_channels):
        super().__init__()
        channels = config.block_out_channels[-1]
        self.resnets = [ResnetBlock2D(config, channels, channels, temb_channels) for _ in range(2)]
        self.attentions = [
            Transformer2DModel(
                config,
                channels,
                config.num_attention_heads[-1],
                config.transformer_layers_per_block[-1],
                config.cross_attention_dim[-1],
            )
        ]

    def __call__(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nn.Module):
    """The denoising UNet: predicts noise (or v) for NHWC latents at any height and width."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        temb_channels = 4 * channels[0]
        n = len(channels)
        self.conv_in = nn.Conv2d(
            config.in_channels, channels[0], config.conv_in_kernel, padding=(config.conv_in_kernel - 1) // 2
        )
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels)
        if config.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb_channels)

        self.down_blocks = down_blocks(config, temb_channels)
        self.mid_block = UNetMidBlock2DCrossAttn(config, temb_channels)
        rev = list(reversed(channels))
        self.up_blocks = [
            UpBlock2D(
                config,
                i,
                in_channels=rev[min(i + 1, n - 1)],
                prev_channels=rev[max(i - 1, 0)],
                temb_channels=temb_channels,
                cross_attention=config.up_block_types[i] == "CrossAttnUpBlock2D",
                add_upsample=i < n - 1,
            )
            for i in range(n)
        ]
        self.conv_norm_out = GroupNorm(
            config.norm_num_groups, channels[0], eps=config.norm_eps, pytorch_compatible=True
        )
        self.conv_out = nn.Conv2d(
            channels[0], config.out_channels, config.conv_out_kernel, padding=(config.conv_out_kernel - 1) // 2
        )

    def __call__(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        text_embeds=None,
        time_ids=None,
        down_residuals=None,
        mid_residual=None,
        cache=None,
    ):
        """sample (B, H, W, C); timestep: number, 0-d or (B,) array; encoder_hidden_states (B, L, D);
        SDXL also needs text_embeds (B, 1280) and time_ids (B, 6). Returns (B, H, W, out_channels).
        down_residuals (one per skip connection) and mid_residual: ControlNet outputs added to the skips and to the
        mid block's output (diffusers' down_block_additional_residuals, mid_block_additional_residual).
        cache: a DeepCache, to run only the shallow path on the calls between its full ones."""
        emb = self.embedding(sample, timestep, text_embeds, time_ids)
        context = encoder_hidden_states
        if cache is not None and not cache.full():
            return self.shallow(sample, emb, context, cache.features, down_residuals)
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, emb, context)
            skips.extend(states)
        if down_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_residuals, strict=True)]
        x = self.mid_block(x, emb, context)
        if mid_residual is not None:
            x = x + mid_residual
        for block in self.up_blocks:
            block_skips = skips[-len(block.resnets) :]
            skips = skips[: -len(block.resnets)]
            if cache is not None and block is self.up_blocks[-1]:  # keep the features entering its last 2 layers
                n = len(block.resnets)
                cache.features = block(x, emb, context, block_skips, None, range(n - 2))
                x = block(cache.features, emb, context, block_skips, None, range(n - 2, n))
                continue
            # upsample to the next skip's exact size: 2x, or what diffusers forwards as `upsample_size`
            # when H or W is not a multiple of 2**num_upsamplers
            x = block(x, emb, context, block_skips, skips[-1].shape[1:3] if skips else None)
        return self.output(x)

    def embedding(self, sample, timestep, text_embeds, time_ids):
        """The time embedding (B, 4 * C0), with SDXL's added text and size embeddings."""
        config = self.config
        B = sample.shape[0]
        timesteps = mx.broadcast_to(mx.array(timestep).astype(mx.float32), (B,))
        t_emb = timestep_embedding(timesteps, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
        emb = self.time_embedding(t_emb.astype(sample.dtype))  # (B, 4 * C0)
        if config.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet (addition_embed_type 'text_time', SDXL) needs text_embeds and time_ids")
            time_embeds = timestep_embedding(
                time_ids.reshape(-1), config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift
            ).reshape(B, -1)  # (B, 6 * addition_time_embed_dim)
            add_embeds = mx.concatenate([text_embeds, time_embeds], axis=-1).astype(emb.dtype)
            emb = emb + self.add_embedding(add_embeds)
        return emb

    def shallow(self, sample, emb, context, features, down_residuals=None):
        """DeepCache's cheap call: conv_in and the first down block's first layer make the two skips that the last
        up block's last two layers take, with `features` (kept by the last full call) in place of the rest."""
        x = self.conv_in(sample)
        skips = [x, *self.down_blocks[0](x, emb, context, range(1))[1]]
        if down_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_residuals)]
        n = len(self.up_blocks[-1].resnets)
        return self.output(self.up_blocks[-1](features, emb, context, skips, None, range(n - 2, n)))

    def output(self, x):
        if self.config.conv_out_kernel == 3:
            return conv3x3(self.conv_out, x, norm_act(self.conv_norm_out, x, silu))
        return self.conv_out(silu(self.conv_norm_out(x)))


class DeepCache:
    """DeepCache (Ma, Fang and Wang, 2023: "DeepCache: Accelerating Diffusion Models for Free"), opt-in: the UNet's
    deep features reused between calls.

    Every `interval`-th call (the first included) runs the whole UNet and keeps the input of its last up block's
    last two layers; the calls in between run only the shallow path: conv_in, the first layer of the first down
    block, and those two layers on the kept features. One per sequence of UNet calls on the same batch."""

    def __init__(self, interval):
        self.interval, self.calls, self.features = interval, 0, None

    def full(self):
        """Whether the coming call runs the whole UNet; counts the call."""
        full = self.features is None or self.calls % self.interval == 0
        self.calls += 1
        return full


def sanitize(weights):
    """diffusers UNet weights -> this model's layout: conv kernels OIHW -> OHWI (1x1 proj_in/proj_out included)."""
    return {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in weights.items()}


class CompiledUNet:
    """A UNet's forward pass through mx.compile, which reads the UNet's current parameters at every call.

    The parameters are inputs of the compiled function (`inputs=unet.state`), not constants captured at the
    first trace: weights replaced since the last call (LoRA deltas merged into a Linear or Conv2d) are used.
    A change of the module structure (a Linear replaced by a quantized layer or a low-rank branch module, a
    parameter of another shape or dtype) starts a new trace. MLX traces once per input shape and dtype: keep
    them fixed through a generation. Call it like the UNet; a Python timestep becomes an array, so that the
    steps of a sampler share one trace.
    """

    def __init__(self, unet: UNet2DConditionModel):
        self.unet = unet
        self.config = unet.config
        self._structure = None
        self._forward = None

    def __call__(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, **residuals):
        """As UNet2DConditionModel.__call__ (ControlNet's down_residuals / mid_residual included)."""
        structure = module_structure(self.unet)
        if structure != self._structure:
            self._forward = mx.compile(self.unet.__call__, inputs=self.unet.state)
            self._structure = structure
        timesteps = mx.broadcast_to(mx.array(timestep).astype(mx.float32), (sample.shape[0],))
        down, mid = residuals.pop("down_residuals", None), residuals.pop("mid_residual", None)
        if residuals:
            raise TypeError(f"unexpected arguments: {', '.join(residuals)}")
        with whole_images():  # a trace cannot evaluate the convolutions' row blocks
            return self._forward(sample, timesteps, encoder_hidden_states, text_embeds, time_ids, down, mid)


def module_structure(model: nn.Module):
    """What a compiled trace of `model` depends on besides array values: module types and parameter shapes."""
    modules = tuple((path, type(m)) for path, m in model.named_modules())
    parameters = tuple((k, v.shape, v.dtype) for k, v in tree_flatten(model.parameters()))
    return modules, parameters


def compile_unet(unet: UNet2DConditionModel):
    """The UNet behind mx.compile (see CompiledUNet): `unet = compile_unet(pipe.unet)` once, then call it."""
    return CompiledUNet(unet)

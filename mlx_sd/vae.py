"""diffusers' AutoencoderKL (the SD / SDXL VAE) in MLX, NHWC.

Mirrors diffusers.models.autoencoders.{autoencoder_kl.AutoencoderKL, vae.Encoder, vae.Decoder}; attribute
names follow the checkpoint keys, so `sanitize` only fixes layouts and the legacy attention names.
"""

import re
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from .activations import gelu, silu
from .attention import attention
from .convolution import conv3x3, pointwise
from .norms import GroupNorm, norm_act

# diffusers.models.activations.ACT2CLS
ACTIVATIONS = {"silu": silu, "swish": silu, "mish": nn.mish, "gelu": gelu, "relu": nn.relu}
# diffusers' Encoder/Decoder pass resnet_eps=1e-6 to every GroupNorm, the attention's included.
NORM_EPS = 1e-6
# Checkpoints saved before diffusers 0.14 name the mid-block attention projections query/key/value/proj_attn.
LEGACY_ATTENTION = re.compile(r"(\.attentions\.\d+)\.(query|key|value|proj_attn)\.")
LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    act_fn: str = "silu"
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    sample_size: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @classmethod
    def from_dict(cls, d):
        """Keeps only the known keys of a vae/config.json."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Latent-space tile size and overlap of decode_tiled: 512-pixel tiles blended over 128 pixels, diffusers' defaults
# for the SD / SDXL VAE (tile_sample_min_size 512, tile_overlap_factor 0.25).
TILE_SIZE = 64
TILE_OVERLAP = 16


def group_norm(groups, channels):
    return GroupNorm(groups, channels, eps=NORM_EPS, pytorch_compatible=True)


class ResnetBlock2D(nn.Module):
    """diffusers.models.resnet.ResnetBlock2D without a time embedding, output_scale_factor 1."""

    def __init__(self, in_channels, out_channels, groups, act):
        super().__init__()
        self.act = act
        self.norm1 = group_norm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x):
        # on the CPU the norms and activations run block by block inside the convolutions (convolution.py), and
        # the output may take h's place: nothing reads h afterwards
        h = conv3x3(self.conv1, x, norm_act(self.norm1, x, self.act))

        def residual(start, stop):  # x's rows, through the 1x1 shortcut where the channels change
            rows = x[:, start:stop]
            return pointwise(self.conv_shortcut, rows) if "conv_shortcut" in self else rows

        return conv3x3(self.conv2, h, norm_act(self.norm2, h, self.act), residual=residual, overwrite=True)


class Attention(nn.Module):
    """The VAE mid-block attention: GroupNorm, single-head self-attention over all pixels, residual."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = group_norm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x):
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, H * W, C)  # (B, heads=1, H*W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        h = attention(q, k, v, C**-0.5)
        h = self.to_out[0](h).reshape(B, H, W, C)  # (B, H, W, C)
        return x + h


class UNetMidBlock2D(nn.Module):
    """resnet, [attention], resnet at the lowest resolution."""

    def __init__(self, channels, groups, act, add_attention):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups, act) for _ in range(2)]
        self.attentions = [Attention(channels, groups)] if add_attention else []

    def __call__(self, x):
        x = self.resnets[0](x)
        for layer in self.attentions:
            x = layer(x)
        return self.resnets[1](x)


class Downsample2D(nn.Module):
    """Pads (0, 1, 0, 1) on the bottom/right, then a 3x3 convolution with stride 2 and no padding."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x):
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample2D(nn.Module):
    """Nearest 2x, then a 3x3 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x):
        return conv3x3(self.conv, x, upsample=True)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, act, add_downsample):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act) for i in range(num_layers)
        ]
        self.downsamplers = [Downsample2D(out_channels)] if add_downsample else []

    def __call__(self, x):
        for layer in self.layers():
            x = layer(x)
        return x

    def layers(self):
        return self.resnets + self.downsamplers


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, act, add_upsample):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act) for i in range(num_layers)
        ]
        self.upsamplers = [Upsample2D(out_channels)] if add_upsample else []

    def __call__(self, x):
        for layer in self.layers():
            x = layer(x)
        return x

    def layers(self):
        return self.resnets + self.upsamplers


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) -> (B, H/2^(n-1), W/2^(n-1), 2 * latent_channels), n = len(block_out_channels)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.act = ACTIVATIONS[config.act_fn]
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(
                channels[max(i - 1, 0)],
                channels[i],
                config.layers_per_block,
                groups,
                self.act,
                add_downsample=i < len(channels) - 1,
            )
            for i in range(len(channels))
        ]
        self.mid_block = UNetMidBlock2D(channels[-1], groups, self.act, config.mid_block_add_attention)
        self.conv_norm_out = group_norm(groups, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def __call__(self, x):
        x = self.conv_in(x)
        for layer in layers(self.down_blocks):
            x = layer(x)
        x = self.mid_block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> image (B, h*2^(n-1), w*2^(n-1), out_channels)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.act = ACTIVATIONS[config.act_fn]
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(channels[0], groups, self.act, config.mid_block_add_attention)
        # diffusers gives each decoder block one resnet more than the encoder's
        self.up_blocks = [
            UpDecoderBlock2D(
                channels[max(i - 1, 0)],
                channels[i],
                config.layers_per_block + 1,
                groups,
                self.act,
                add_upsample=i < len(channels) - 1,
            )
            for i in range(len(channels))
        ]
        self.conv_norm_out = group_norm(groups, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for layer in layers(self.up_blocks):
            x = layer(x)
        return conv3x3(self.conv_out, x, norm_act(self.conv_norm_out, x, self.act))


def layers(blocks):
    """The resnets and resamplers of up or down blocks in order, for one loop over them all: a loop over the
    blocks would keep each block's input alive until its last layer (at 512 x 512, the 256 MiB input of the SD
    VAE's last up block during all three of its resnets)."""
    return [layer for block in blocks for layer in block.layers()]


class AutoencoderKL(nn.Module):
    """The KL autoencoder of Stable Diffusion: `encode` images to a latent distribution, `decode` latents."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        n = len(config.block_out_channels)
        if (
            list(config.down_block_types) != ["DownEncoderBlock2D"] * n
            or list(config.up_block_types) != ["UpDecoderBlock2D"] * n
        ):
            raise ValueError(
                f"unsupported VAE blocks {config.down_block_types} / {config.up_block_types}: "
                f"expected {n} DownEncoderBlock2D and {n} UpDecoderBlock2D"
            )
        if config.act_fn not in ACTIVATIONS:
            raise ValueError(f"unsupported VAE act_fn {config.act_fn!r}; expected one of {sorted(ACTIVATIONS)}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, x):
        """Image (B, H, W, 3) in [-1, 1] -> (mean, logvar) of the latent distribution, each
        (B, H/8, W/8, latent_channels); logvar clamped to [-30, 20] like diffusers' DiagonalGaussianDistribution."""
        h = self.encoder(x)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = mx.split(h, 2, axis=-1)  # 2 x (B, h, w, latent_channels)
        return mean, mx.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """Latents already divided by scaling_factor (B, h, w, latent_channels) -> image (B, 8h, 8w, 3), not clipped."""
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode_tiled(self, z, tile_size=TILE_SIZE, overlap=TILE_OVERLAP):
        """`decode` in overlapping tiles of tile_size x tile_size latents, so that peak memory is that of one tile.

        diffusers' AutoencoderKL.tiled_decode in NHWC, with tile_sample_min_size = tile_size * 8 and
        tile_overlap_factor = overlap / tile_size: tiles start every tile_size - overlap latents and each is
        faded linearly into the tiles above and to its left across the overlap. One difference: a last tile that
        lies wholly inside the one before it is not decoded (diffusers decodes it alone and fades it over the
        image's last rows or columns); the tile before it runs to the edge instead. Each tile's GroupNorm and
        attention see only that tile, so the result differs slightly from `decode`.
        """
        if not 0 <= overlap < tile_size:
            raise ValueError(f"overlap must be in [0, tile_size={tile_size}), got {overlap}")
        scale = 2 ** (len(self.config.block_out_channels) - 1)
        keep, fade = (tile_size - overlap) * scale, overlap * scale  # in pixels
        row_starts, col_starts = (
            tile_starts(z.shape[1], tile_size, overlap),
            tile_starts(z.shape[2], tile_size, overlap),
        )
        rows, above = [], []
        for i, y in enumerate(row_starts):
            row = []
            for j, x in enumerate(col_starts):
                tile = self.decode(z[:, y : y + tile_size, x : x + tile_size])
                if i > 0:
                    tile = blend(above[j], tile, fade, axis=1)
                if j > 0:
                    tile = blend(row[-1], tile, fade, axis=2)
                mx.eval(tile)
                row.append(tile)
            # each tile keeps its first `keep` pixels; the last in a row or column keeps everything
            strip = mx.concatenate([t[:, :, :keep] for t in row[:-1]] + [row[-1]], axis=2)
            rows.append(strip if i == len(row_starts) - 1 else strip[:, :keep])
            mx.eval(rows[-1])
            above = row
        return mx.concatenate(rows, axis=1)


def should_tile(latent_h, latent_w, tile_size=TILE_SIZE):
    """Whether latents of this size need `decode_tiled`: either side larger than one tile (diffusers' rule)."""
    return latent_h > tile_size or latent_w > tile_size


def tile_starts(size, tile_size, overlap):
    """Tile offsets every tile_size - overlap, less a last tile that lies wholly inside the one before it."""
    return list(range(0, max(size - overlap, 1), tile_size - overlap))


def blend(a, b, extent, axis):
    """b with its first `extent` rows (axis 1) or columns (axis 2) faded in from a's last `extent`, weights
    x / extent as diffusers' blend_v / blend_h."""
    if extent == 0:
        return b
    a, b = a.swapaxes(1, axis), b.swapaxes(1, axis)
    w = (mx.arange(extent) / extent).astype(b.dtype)[:, None, None]  # (extent, 1, 1)
    faded = a[:, -extent:] * (1 - w) + b[:, :extent] * w
    return mx.concatenate([faded, b[:, extent:]], axis=1).swapaxes(1, axis)


def sanitize(weights):
    """diffusers VAE weights -> this module's layout.

    Renames legacy attention keys (query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0, as diffusers'
    _fix_state_dict_keys_on_load does), squeezes conv-shaped (O, I, 1, 1) attention projections to Linear
    (as diffusers' single-file conversion does) and transposes the other 4-D conv weights OIHW -> OHWI.
    """
    sanitized = {}
    for key, value in weights.items():
        key = LEGACY_ATTENTION.sub(lambda m: f"{m[1]}.{LEGACY_NAMES[m[2]]}.", key)
        if ".attentions." in key and value.ndim > 2:
            value = value.reshape(value.shape[:2])  # (O, I, 1, 1) -> (O, I)
        elif value.ndim == 4:
            value = value.transpose(0, 2, 3, 1)  # (O, I, kH, kW) -> (O, kH, kW, I)
        sanitized[key] = value
    return sanitized

"""mlx_sd.vae.AutoencoderKL.decode_tiled: against diffusers' tiled_decode, and against untiled decoding."""

import gc
import time

import mlx.core as mx
import numpy as np
import pytest
import torch

from helpers import SDXL, random_vae, real_config, to_np
from mlx_sd.vae import AutoencoderConfig, AutoencoderKL, sanitize, should_tile, tile_starts
from mlx_sd.weights import load_strict, read_json, read_safetensors

# The SDXL VAE config, narrowed: four blocks, so latents are upsampled 8x as in the real one.
TINY = dict(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=64)
# float32 on both sides, same tiles and blending: only summation order differs (measured ~2e-5 on O(3) outputs).
PARITY_TOL = {"atol": 1e-4, "rtol": 1e-4}


def random_reference(**overrides):
    """A diffusers AutoencoderKL of the SDXL config (with overrides), default init plus random GroupNorm affine."""
    config = {k: v for k, v in real_config(SDXL, "vae").items() if not k.startswith("_")}
    return random_vae({**config, **overrides})


def load_ours(reference, folder):
    reference.save_pretrained(folder)
    config = AutoencoderConfig.from_dict(read_json(folder / "config.json"))
    return load_strict(AutoencoderKL(config), sanitize(read_safetensors(folder)), "vae")


def diffusers_tiled(model, latents, tile_size, overlap):
    """diffusers' tiled_decode with the tile parameters of decode_tiled(tile_size, overlap), as NHWC numpy."""
    scale = 2 ** (len(model.config.block_out_channels) - 1)
    model.tile_latent_min_size = tile_size
    model.tile_sample_min_size = tile_size * scale
    model.tile_overlap_factor = overlap / tile_size  # exact in binary for the sizes used here
    with torch.no_grad():
        return model.tiled_decode(latents).sample.permute(0, 2, 3, 1).numpy()


def to_nhwc(latents):
    return mx.array(latents.permute(0, 2, 3, 1).numpy())


def tiled_vs_untiled(tiled, untiled):
    """Differences and signal in [0, 1] image units (the decoder's [-1, 1] output halved)."""
    diff = np.abs(tiled - untiled) / 2
    return {
        "max": float(diff.max()),
        "mean": float(diff.mean()),
        "p99": float(np.percentile(diff, 99)),
        "signal_std": float(untiled.std() / 2),
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    reference = random_reference(**TINY)
    return reference, load_ours(reference, tmp_path_factory.mktemp("vae_tiled"))


def test_tile_starts_and_policy():
    assert tile_starts(17, 8, 2) == [0, 6, 12]  # the last tile (12..17) reaches past the one before (6..14)
    assert tile_starts(20, 8, 2) == [0, 6, 12]  # diffusers adds 18..20, which lies inside 12..20
    assert tile_starts(8, 8, 2) == [0] and tile_starts(3, 8, 2) == [0]
    assert tile_starts(128, 64, 16) == [0, 48, 96]  # SDXL at 1024x1024: 3 x 3 tiles
    assert not should_tile(64, 64) and should_tile(128, 64) and should_tile(64, 65) and not should_tile(96, 80, 96)


# Several tiles each way, batch 2, non-square, sizes not multiples of the tile step (6 and 12).
@pytest.mark.parametrize("tile_size, overlap, height, width", [(8, 2, 17, 23), (16, 4, 44, 30), (8, 0, 13, 10)])
def test_matches_diffusers_tiled_decode(tiny, tile_size, overlap, height, width):
    reference, ours = tiny
    latents = torch.randn(2, 4, height, width)
    ref = diffusers_tiled(reference, latents, tile_size, overlap)
    out = to_np(ours.decode_tiled(to_nhwc(latents), tile_size, overlap))
    assert out.shape == (2, 8 * height, 8 * width, 3)
    print(f"\ntiles {tile_size}/{overlap} on {height}x{width}: max abs diff vs diffusers {np.abs(out - ref).max():.2e}")
    np.testing.assert_allclose(out, ref, **PARITY_TOL)


def test_skipped_last_tile_changes_only_the_last_rows(tiny):
    """At 20 rows diffusers decodes a last tile of 2 rows inside the one before; ours lets that one run to the
    edge, so the two agree everywhere but the last overlap * 8 = 16 pixel rows."""
    reference, ours = tiny
    latents = torch.randn(1, 4, 20, 23)
    ref = diffusers_tiled(reference, latents, 8, 2)
    out = to_np(ours.decode_tiled(to_nhwc(latents), 8, 2))
    np.testing.assert_allclose(out[:, :144], ref[:, :144], **PARITY_TOL)
    assert np.abs(out[:, 144:] - ref[:, 144:]).max() > 1e-2


def test_one_tile_is_untiled_decode(tiny):
    _, ours = tiny
    latents = mx.random.normal((1, 8, 6, 4), key=mx.random.key(0))
    np.testing.assert_array_equal(to_np(ours.decode_tiled(latents, 8, 2)), to_np(ours.decode(latents)))


def test_tiled_close_to_untiled(tiny):
    """Each tile normalises (GroupNorm) over itself and sees zeros past its edges, so tiled decoding differs from
    untiled everywhere, most near seams. 24-latent tiles with an 8-latent overlap: 6 tiles on 53 x 40 latents.
    Measured (seed 0): mean 0.025, p99 0.15, max 0.6 in [0, 1] units against a signal std of 0.16 -- larger
    than at full size (see test_fullsize_tiled), since the random tiny decoder's receptive field (~17 latents)
    is wide for its tiles. Bound: mean < 0.05 and < 0.3 signal std; a misplaced tile would give ~ 1 signal std."""
    _, ours = tiny
    latents = mx.random.normal((1, 53, 40, 4), key=mx.random.key(1))
    start = time.perf_counter()
    tiled = to_np(ours.decode_tiled(latents, 24, 8))
    tiled_s = time.perf_counter() - start
    untiled = to_np(ours.decode(latents))
    stats = tiled_vs_untiled(tiled, untiled)
    print(f"\ntiny tiled vs untiled (24/8 on 53x40): {stats}, tiled {tiled_s:.1f} s")
    assert stats["mean"] < 0.05 and stats["mean"] < 0.3 * stats["signal_std"]


def test_bad_overlap(tiny):
    _, ours = tiny
    with pytest.raises(ValueError, match="overlap"):
        ours.decode_tiled(mx.zeros((1, 8, 8, 4)), 8, 8)


@pytest.mark.fullsize
def test_fullsize_tiled(tmp_path):
    """The real SDXL VAE config (random weights) at the default 64-latent tiles with a 16-latent overlap on
    72 x 66 latents (2 x 2 tiles, the last ones partial): against diffusers' tiled_decode, and against untiled.
    Bound for tiled vs untiled (measured: mean 0.0084, p99 0.062, max 0.24, signal std 0.198):
    mean < 0.02 and < 0.1 signal std, p99 < 0.1 in [0, 1] units."""
    torch.manual_seed(0)
    reference = random_reference()
    latents = torch.randn(1, 4, 72, 66)
    start = time.perf_counter()
    ref = diffusers_tiled(reference, latents, 64, 16)
    torch_s = time.perf_counter() - start
    ours = load_ours(reference, tmp_path)
    del reference
    gc.collect()

    z = to_nhwc(latents)
    start = time.perf_counter()
    tiled = to_np(ours.decode_tiled(z))
    tiled_s = time.perf_counter() - start
    untiled = to_np(ours.decode(z))
    untiled_s = time.perf_counter() - start - tiled_s
    parity, parity_mean = float(np.abs(tiled - ref).max()), float(np.abs(tiled - ref).mean())
    stats = tiled_vs_untiled(tiled, untiled)
    print(
        f"\nsdxl vae tiled: max abs diff vs diffusers {parity:.2e}, mean {parity_mean:.1e} "
        f"(ref max abs {np.abs(ref).max():.2f}); "
        f"tiled vs untiled {stats}; torch tiled {torch_s:.1f} s, mlx tiled {tiled_s:.1f} s, untiled {untiled_s:.1f} s"
    )
    # 24 resnets deep in float32, GroupNorm reducing over up to 512 x 512 pixels per tile: summation-order noise
    # that grows with the tile's size. Untiled decoding of these latents differs from diffusers' untiled decode by
    # as much (measured: max 1.7e-3, mean 2.0e-4 on outputs up to 4.1); tiled, max 1.4e-3. A wrong tile offset or
    # blend weight gives errors of 0.1 or more.
    scale = max(float(np.abs(ref).max()), 1.0)
    assert parity <= 1e-3 * scale and parity_mean <= 1e-4 * scale, (parity, parity_mean)
    assert stats["mean"] < 0.02 and stats["mean"] < 0.1 * stats["signal_std"] and stats["p99"] < 0.1

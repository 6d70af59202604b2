"""What one ControlNet adds to a denoising step: peak memory and time, full-size random weights (MLX only).

    flock /tmp/mlx_sd_heavy.lock python benchmarks/controlnet_overhead.py --family sd1 --size 512 --rounds 3
    python benchmarks/controlnet_overhead.py --sizes-only      # parameter bytes and residual sizes, no compute

One guided step (batch 2) of the UNet alone and of ControlNet + UNet (controlnet.control_residuals, as the
pipeline calls it, with the control image's features made once beforehand, as the pipeline makes them), in
alternating rounds so that a shared machine's load affects both alike; medians. Peak memory is
mx.get_peak_memory() over each kind of step, weights included.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_sd.controlnet import Control, ControlNetConfig, ControlNetModel, control_residuals
from mlx_sd.pipeline import Conditioning
from mlx_sd.unet import UNet2DConditionModel, UNetConfig

CONFIGS = Path(__file__).resolve().parent.parent / "mlx_sd" / "assets" / "configs"
GiB = 2**30


def config(family, component):
    return json.loads((CONFIGS / family / component / "config.json").read_text())


def residual_floats(cfg, latent):
    """The number of floats in one image's ControlNet residuals: one per UNet skip connection, and the mid block's."""
    n = len(cfg.block_out_channels)
    total = cfg.block_out_channels[0] * latent**2  # conv_in's
    for i, c in enumerate(cfg.block_out_channels):
        side = latent // 2**i
        total += cfg.layers_per_block[i] * c * side**2 + (c * (side // 2) ** 2 if i < n - 1 else 0)
    return total + cfg.block_out_channels[-1] * (latent // 2 ** (n - 1)) ** 2


def sizes():
    """Parameter bytes of each family's ControlNet and UNet in float16, and the residuals of a guided step."""
    count = lambda m: sum(v.size for _, v in tree_flatten(m.parameters()))  # noqa: E731
    for family, size in (("sd1", 512), ("sdxl", 1024)):
        cn = ControlNetModel(ControlNetConfig.from_dict(config(family, "controlnet")))  # lazy init: no memory
        unet = UNet2DConditionModel(UNetConfig.from_dict(config(family, "unet")))
        residuals = 2 * residual_floats(cn.config, size // 8)  # batch 2
        print(
            f"{family}: ControlNet {count(cn) / 1e6:.1f}M parameters = {2 * count(cn) / GiB:.2f} GiB float16 "
            f"(UNet {count(unet) / 1e6:.1f}M = {2 * count(unet) / GiB:.2f} GiB); residuals of a guided step at "
            f"{size}: {2 * residuals / GiB:.3f} GiB float16"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--sizes-only", action="store_true")
    args = parser.parse_args()
    if args.sizes_only:
        return sizes()

    dtype = getattr(mx, args.dtype)
    mx.random.seed(0)
    unet = UNet2DConditionModel(UNetConfig.from_dict(config(args.family, "unet")))
    unet.set_dtype(dtype)
    mx.eval(unet.parameters())
    latent = args.size // 8
    x = mx.random.normal((2, latent, latent, 4)).astype(dtype)
    context = mx.random.normal((2, 77, unet.config.cross_attention_dim[0])).astype(dtype)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra = dict(
            text_embeds=mx.random.normal((2, 1280)).astype(dtype),
            time_ids=mx.array([[args.size, args.size, 0, 0, args.size, args.size]] * 2, dtype=dtype),
        )
    conditioning = Conditioning(context, True, extra)

    def unet_step(controls):
        residuals = control_residuals(controls, x, 500, conditioning, 0, 1)
        mx.eval(unet(x, 500, context, **extra, **residuals))

    unet_step([])  # warm-up
    mx.reset_peak_memory()
    unet_step([])
    unet_peak = mx.get_peak_memory()

    cn = ControlNetModel(ControlNetConfig.from_dict(config(args.family, "controlnet")))
    cn.set_dtype(dtype)
    mx.eval(cn.parameters())
    weights = sum(v.nbytes for _, v in tree_flatten(cn.parameters()))
    image = mx.random.uniform(shape=(1, args.size, args.size, 3)).astype(dtype)
    tic = time.perf_counter()
    features = mx.repeat(cn.embed_control(image), 2, axis=0)  # once per generation, as prepare_controls does
    mx.eval(features)
    embedding_time = time.perf_counter() - tic
    controls = [Control(cn, features, 1.0, 0.0, 1.0, False)]
    unet_step(controls)  # warm-up
    mx.reset_peak_memory()
    unet_step(controls)
    both_peak = mx.get_peak_memory()

    times = {"unet": [], "controlnet + unet": []}
    for _ in range(args.rounds):
        for name, c in (("unet", []), ("controlnet + unet", controls)):
            tic = time.perf_counter()
            unet_step(c)
            times[name].append(time.perf_counter() - tic)
    median = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    print(f"{args.family} at {args.size}x{args.size}, guided step (batch 2), {args.dtype}, {mx.default_device()}")
    print(f"peak: UNet step {unet_peak / GiB:.2f} GiB, ControlNet + UNet step {both_peak / GiB:.2f} GiB")
    print(f"extra peak {(both_peak - unet_peak) / GiB:.2f} GiB, of which ControlNet weights {weights / GiB:.2f} GiB")
    print(", ".join(f"{k}: {' '.join(f'{t:.1f}' for t in v)} s (median {median[k]:.1f})" for k, v in times.items()))
    print(f"the control image's conditioning embedding, once per generation: {embedding_time:.2f} s")
    overhead = median["controlnet + unet"] / median["unet"] - 1
    print(f"per-step overhead: +{median['controlnet + unet'] - median['unet']:.1f} s (+{100 * overhead:.0f}%)")


if __name__ == "__main__":
    main()

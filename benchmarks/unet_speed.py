"""UNet step time and peak memory: mlx_sd against diffusers (torch) on the same random full-size weights.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/unet_speed.py \
        --model runwayml--stable-diffusion-v1-5 --size 512 --steps 3

Both run in this process on the same device class (CPU here; on a Mac, MLX uses the GPU and torch can be
given --torch-device mps). Prints seconds per UNet call (batch 2, as with classifier-free guidance) for
each, the ratio, and MLX's peak memory.
"""

import argparse
import gc
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

CONFIGS = Path(__file__).parent.parent / "tests" / "configs"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="runwayml--stable-diffusion-v1-5", help="a folder name in tests/configs")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latents are size / 8)")
    parser.add_argument("--steps", type=int, default=3, help="timed UNet calls after one warm-up")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--torch-device", default="cpu")
    args = parser.parse_args()

    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from mlx_sd.unet import UNet2DConditionModel, UNetConfig, sanitize
    from mlx_sd.weights import load_strict

    config = json.loads((CONFIGS / args.model / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    reference = TorchUNet.from_config(config).eval().to(args.torch_device, getattr(torch, args.dtype))
    latent = args.size // 8
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, latent, latent, config["in_channels"])).astype(np.float32)
    context = rng.standard_normal((2, 77, config["cross_attention_dim"])).astype(np.float32)
    extra_torch, extra_mlx = {}, {}
    if config.get("addition_embed_type") == "text_time":
        text_embeds = rng.standard_normal((2, 1280)).astype(np.float32)
        time_ids = np.array([[args.size, args.size, 0, 0, args.size, args.size]] * 2, np.float32)
        extra_torch = {
            "added_cond_kwargs": {"text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)}
        }
        extra_mlx = {"text_embeds": mx.array(text_embeds), "time_ids": mx.array(time_ids)}

    def run_torch():
        with torch.no_grad():
            x = torch.from_numpy(sample).permute(0, 3, 1, 2).to(args.torch_device, getattr(torch, args.dtype))
            c = torch.from_numpy(context).to(args.torch_device, getattr(torch, args.dtype))
            out = reference(x, 500, encoder_hidden_states=c, **extra_torch).sample  # noqa: F821 (deleted below)
            return out.float().cpu().numpy()

    torch_out = run_torch()
    tic = time.perf_counter()
    for _ in range(args.steps):
        run_torch()
    torch_time = (time.perf_counter() - tic) / args.steps

    weights = {k: mx.array(v.float().cpu().numpy()) for k, v in reference.state_dict().items()}
    del reference
    gc.collect()
    unet = UNet2DConditionModel(UNetConfig.from_dict(config))
    load_strict(unet, sanitize(weights), "unet", getattr(mx, args.dtype))
    del weights
    mx.eval(unet.parameters())
    dtype = getattr(mx, args.dtype)

    def run_mlx():
        out = unet(
            mx.array(sample, dtype=dtype),
            500,
            mx.array(context, dtype=dtype),
            **{k: v.astype(dtype) for k, v in extra_mlx.items()},
        )
        mx.eval(out)
        return out

    mlx_out = np.array(run_mlx().astype(mx.float32))
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for _ in range(args.steps):
        run_mlx()
    mlx_time = (time.perf_counter() - tic) / args.steps

    diff = np.abs(mlx_out - torch_out.transpose(0, 2, 3, 1)).max()
    print(f"{args.model} UNet, {args.size}x{args.size}, batch 2, {args.dtype}, device {mx.default_device()}")
    print(f"diffusers ({args.torch_device}): {torch_time:.2f} s/call")
    print(f"mlx_sd: {mlx_time:.2f} s/call  ->  {torch_time / mlx_time:.2f}x diffusers' speed")
    print(f"mlx_sd peak memory during the calls: {mx.get_peak_memory() / 2**30:.2f} GiB; max abs diff {diff:.2e}")


if __name__ == "__main__":
    main()

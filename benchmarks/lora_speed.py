"""LoRA load time and per-step cost on a full-size UNet with random weights (MLX only, no torch).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/lora_speed.py \
        --rank 32 --rounds 3

Builds the UNet of --model (tests/configs) in float32 with random weights (SD 1.5: about 3.4 GB) and writes a Kohya
LoCon file of --rank (float16 factors, alpha = rank / 2) on every Linear and Conv2d layer of the UNet: attention,
feed-forward, projections, resnet convolutions and time projections, samplers. Reports medians over --rounds of:

- load (read + merge into the weights) and unload on the float32 UNet, and the memory the originals take;
- load and unload on the same UNet quantized to 8 bits (Linear layers; with --q-convs the convolutions too), whose
  quantized layers get a low-rank branch (float layers still merge);
- seconds per UNet call (--batch: 2 as with guidance, 1 as a low_memory half-step; --latent x --latent latents) on
  the 8-bit UNet without and with the branch, in alternating rounds (the scale is set to 0 and back, which removes
  and rebuilds the branches). MLX's CPU backend runs quantized matrix products slowly: at 64 x 64 latents one 8-bit
  call takes minutes there, and on a shared machine the branch's cost drowns in the noise;
- with --layers instead: one 8-bit layer alone and with a rank-r branch, on the activations of a 512-px SD 1.5
  step (batch 2), in many alternating rounds: a Linear d -> d (the attention projections) at each UNet level and a
  3x3 QuantizedConv2d at the first level.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd.lora import Adapters
from mlx_sd.lora_layers import LoRABranch, layer_table
from mlx_sd.quantize import QuantizedConv2d, quantize_model
from mlx_sd.unet import UNet2DConditionModel, UNetConfig

CONFIGS = Path(__file__).parent.parent / "tests" / "configs"
GiB = 2**30


def write_lora(unet, rank, path):
    """A Kohya LoCon file with random float16 factors for every layer of the UNet; returns the number of layers."""
    rng = np.random.default_rng(0)
    tensors = {}
    for name, layer in layer_table(unet).items():
        out, inner = layer.shape[0], layer.shape[1:]
        key = "lora_unet_" + name.replace(".", "_")
        down = rng.standard_normal((rank, *inner), dtype=np.float32) / np.sqrt(np.prod(inner))
        up = rng.standard_normal((out, rank, *([1, 1] if layer.conv else [])), dtype=np.float32) * 0.01
        tensors[f"{key}.lora_down.weight"] = mx.array(down, dtype=mx.float16)
        tensors[f"{key}.lora_up.weight"] = mx.array(up, dtype=mx.float16)
        tensors[f"{key}.alpha"] = mx.array(rank / 2, dtype=mx.float16)
    mx.save_safetensors(str(path), tensors)
    return len(tensors) // 3


def time_load(adapters, path, rounds):
    """Median seconds of load_lora and of unload_lora, and the memory the loaded LoRA holds."""
    loads, unloads, held = [], [], 0
    for _ in range(rounds):
        before = mx.get_active_memory()
        tic = time.perf_counter()
        adapters.load_lora(path, 1.0, "bench")
        loads.append(time.perf_counter() - tic)
        held = mx.get_active_memory() - before
        tic = time.perf_counter()
        adapters.unload_lora()
        unloads.append(time.perf_counter() - tic)
    return statistics.median(loads), statistics.median(unloads), held


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="runwayml--stable-diffusion-v1-5", help="a folder name in tests/configs")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latent", type=int, default=64, help="latent size of the timed UNet calls (512 px: 64)")
    parser.add_argument("--batch", type=int, default=2, help="batch of the timed UNet calls")
    parser.add_argument("--q-convs", action="store_true", help="quantize the convolutions too (convert --q-convs)")
    parser.add_argument("--no-step", action="store_true", help="skip the UNet call timings")
    parser.add_argument("--layers", action="store_true", help="time single 8-bit layers with and without a branch")
    args = parser.parse_args()
    if args.layers:
        return time_layers(args.rank, max(args.rounds, 10))

    config = json.loads((CONFIGS / args.model / "unet" / "config.json").read_text())
    unet = UNet2DConditionModel(UNetConfig.from_dict(config))
    mx.eval(unet.parameters())
    print(f"{args.model} UNet, float32, {mx.get_active_memory() / GiB:.2f} GiB of weights", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.safetensors"
        layers = write_lora(unet, args.rank, path)
        print(f"LoRA: rank {args.rank}, {layers} layers, {path.stat().st_size / 2**20:.0f} MiB")

        adapters = Adapters("sd1")
        adapters.attach("unet", unet)
        load, unload, held = time_load(adapters, path, args.rounds)
        print(f"float32, merged: load {load:.2f} s, unload {unload:.2f} s, originals kept {held / GiB:.2f} GiB")

        quantize_model(unet, 8, 64, convolutions=args.q_convs)
        mx.eval(unet.parameters())
        adapters = Adapters("sd1")
        adapters.attach("unet", unet)
        load, unload, held = time_load(adapters, path, args.rounds)
        what = "Linear and conv layers" if args.q_convs else "Linear layers"
        print(
            f"8-bit ({what}), branch: load {load:.2f} s, unload {unload:.2f} s, branch + originals {held / GiB:.2f} GiB"
        )
        if not args.no_step:
            time_steps(unet, adapters, path, config, args)


def time_steps(unet, adapters, path, config, args):
    rng = np.random.default_rng(0)
    shape = (args.batch, args.latent, args.latent, config["in_channels"])
    sample = mx.array(rng.standard_normal(shape, dtype=np.float32))
    context = mx.array(rng.standard_normal((args.batch, 77, config["cross_attention_dim"]), dtype=np.float32))

    def call():
        tic = time.perf_counter()
        mx.eval(unet(sample, 500, context))
        return time.perf_counter() - tic

    adapters.load_lora(path, 1.0, "bench")
    print(f"  warm-up call: {call():.2f} s", flush=True)
    times = {0.0: [], 1.0: []}
    for _ in range(args.rounds):
        for scale in (0.0, 1.0):
            adapters.set_scale("bench", scale)
            times[scale].append(call())
            print(f"  call {'with' if scale else 'without'} the branch: {times[scale][-1]:.2f} s", flush=True)
    base, branch = statistics.median(times[0.0]), statistics.median(times[1.0])
    print(f"UNet call, batch {args.batch}, {args.latent}x{args.latent} latents, 8-bit: {base:.2f} s without, ", end="")
    print(f"{branch:.2f} s with the branch: +{branch - base:.2f} s ({100 * (branch / base - 1):+.1f}%)")


def time_layers(rank, rounds):
    rng = np.random.default_rng(0)

    def rand(*shape):
        return mx.array(rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1]))

    cases = [
        (
            f"Linear {d} -> {d}, {n} tokens",
            nn.QuantizedLinear.from_linear(nn.Linear(d, d, bias=False), 64, 8),
            rand(2, n, d),
            rand(rank, d),
        )
        for n, d in ((4096, 320), (1024, 640), (256, 1280), (64, 1280))
    ]
    conv = QuantizedConv2d(nn.Conv2d(320, 320, 3, padding=1), 64, 8)
    cases.append(("3x3 conv 320 -> 320, 64 x 64", conv, rand(2, 64, 64, 320), rand(rank, 3, 3, 320)))
    for name, layer, x, down in cases:
        branch = LoRABranch(layer, down, rand(layer(x).shape[-1], rank), None)
        times = {"alone": [], "branch": []}
        for _ in range(rounds):
            for key, module in (("alone", layer), ("branch", branch)):
                tic = time.perf_counter()
                mx.eval(module(x))
                times[key].append(time.perf_counter() - tic)
        alone, branched = statistics.median(times["alone"][1:]), statistics.median(times["branch"][1:])
        print(
            f"8-bit {name}: {1000 * alone:.1f} ms alone, {1000 * branched:.1f} ms with a rank-{rank} branch "
            f"({100 * (branched / alone - 1):+.1f}%)",
            flush=True,
        )


if __name__ == "__main__":
    main()

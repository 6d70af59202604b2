"""DeepCache's speed-up: a full UNet call against a shallow one (unet.DeepCache), random full-size weights.

    python benchmarks/deep_cache.py --model sd15 --size 512 --rounds 3 [--dtype float32] [--batch 2]

(on Linux with LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 for MLX's CPU backend).
One UNet from tests/configs' real config with random N(0, 0.02) weights; a guided call (batch 2, a 77-token
context) timed whole and as DeepCache's shallow call (conv_in, the first down layer, the last up block's last two
layers on kept features), in alternating rounds after one warm-up each; medians. Printed: both times, their
ratio, and what a schedule with the whole UNet every N calls costs per call against every call
((full + (N - 1) shallow) / N / full). The image change needs real weights: random ones say nothing about it.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compare import CONFIGS, MODELS  # noqa: E402  (this script's folder is on sys.path)
from sdxl_memory import randomize  # noqa: E402

from mlx_sd.unet import DeepCache, UNet2DConditionModel, UNetConfig  # noqa: E402


def inputs(config, size, batch):
    """Latents, context and SDXL's added conditioning for one call."""
    keys = mx.random.split(mx.random.key(0), 3)
    x = mx.random.normal((batch, size // 8, size // 8, config.in_channels), key=keys[0])
    context = mx.random.normal((batch, 77, config.cross_attention_dim[-1]), key=keys[1])
    extra = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra = dict(
            text_embeds=mx.random.normal((batch, pooled), key=keys[2]),
            time_ids=mx.array([[size, size, 0, 0, size, size]] * batch, dtype=mx.float32),
        )
    return x, context, extra


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="sd15")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels, a multiple of 64")
    parser.add_argument("--batch", type=int, default=2, help="2: a guided call, 1: a low_memory half")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.size % 64 or not 64 <= args.size <= 2048:
        parser.error("--size must be a multiple of 64 in [64, 2048]")
    if not 1 <= args.rounds <= 20 or args.batch not in (1, 2):
        parser.error("--rounds must be in [1, 20] and --batch 1 or 2")

    cfg = json.loads((CONFIGS / MODELS[args.model] / "unet" / "config.json").read_text())
    config = UNetConfig.from_dict(cfg)
    unet = randomize(UNet2DConditionModel(config), getattr(mx, args.dtype))
    mx.eval(unet.parameters())
    x, context, extra = inputs(config, args.size, args.batch)
    kept = DeepCache(1)  # every call full: keeps the features that the shallow calls then use

    def full():
        return unet(x, 500, context, **extra, cache=kept)

    def shallow():
        cache = DeepCache(10**9)
        cache.features, cache.calls = kept.features, 1
        return unet(x, 500, context, **extra, cache=cache)

    print(f"{args.model} {args.size}x{args.size}, {args.dtype}, batch {args.batch}; MLX {mx.__version__} on "
          f"{mx.default_device()}", flush=True)  # fmt: skip
    times = {"full": [], "shallow": []}
    calls = {"full": full, "shallow": shallow}
    for r in range(args.rounds + 1):  # round 0: warm-up
        for name in ("full", "shallow") if r % 2 == 0 else ("shallow", "full"):
            tic = time.perf_counter()
            mx.eval(calls[name]())
            if r:
                times[name].append(time.perf_counter() - tic)
                print(f"  round {r} {name:<8} {times[name][-1]:8.2f} s", flush=True)
    full_s, shallow_s = (statistics.median(times[k]) for k in ("full", "shallow"))
    print(f"median: full {full_s:.2f} s, shallow {shallow_s:.2f} s ({shallow_s / full_s:.3f}x)")
    for n in (2, 3, 5):
        per_call = (full_s + (n - 1) * shallow_s) / n
        print(
            f"  whole UNet every {n} calls: {per_call / full_s:.2f}x the time per call "
            f"({full_s / per_call:.2f}x faster)"
        )


if __name__ == "__main__":
    main()

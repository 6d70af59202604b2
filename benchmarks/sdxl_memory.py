"""Peak memory and time of one full-size SDXL 1024x1024 UNet step and the VAE decode of its latents.

    flock /tmp/mlx_sd_heavy.lock python benchmarks/sdxl_memory.py [--dtype float16|bfloat16|float32]
        [--quantize 4|8] [--no-tiled] [--size 1024]

(on Linux with LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 for MLX's CPU backend).
The SDXL base UNet and VAE are built from the real configs (tests/configs) with random N(0, 0.02) weights
made directly in MLX in the target dtype: no checkpoint and no torch. Phases, in order:
  unet build     the UNet's weights (quantized with --quantize: Linear layers, group size 64, as `mlx-sd convert`)
  unet step      one CFG step: batch 2 (--batch) of size/8 x size/8 latents, 77 x 2048 context, pooled and time ids
  vae tiled      decode_tiled of one size/8 x size/8 latent (64-latent tiles, 16 overlap); skipped with --no-tiled
  vae untiled    decode of the same latent
The UNet is freed before the VAE is built. As in the pipeline, a float16 VAE runs in float32 (force_upcast;
its weights float32 at rest, float16 on MLX's CPU backend: loading.vae_dtype).
Each phase reports its wall time, MLX's peak allocation (mx.get_peak_memory, reset before the phase), the
process's peak resident memory during the phase (VmHWM, reset through /proc/self/clear_refs where Linux allows)
and over the whole run (resource.getrusage ru_maxrss).

On a CPU without fast float16 matrix products (x86 here: 3 GFLOP/s, and quantized products slower still) a
float16 or quantized 1024 step takes hours: there, measure the step in float32, the weights of the other
dtypes with --no-step, and the float16/float32 activation ratio at a small --size (README: how the figures
were obtained).
"""

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_sd.activations import compute_dtype  # noqa: E402
from mlx_sd.loading import vae_dtype as vae_weights_dtype  # noqa: E402
from mlx_sd.pipeline import DTYPES  # noqa: E402
from mlx_sd.quantize import quantize_model  # noqa: E402
from mlx_sd.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from mlx_sd.vae import AutoencoderConfig, AutoencoderKL  # noqa: E402
from mlx_sd.weights import read_json  # noqa: E402

CONFIGS = ROOT / "tests" / "configs" / "stabilityai--stable-diffusion-xl-base-1.0"
GiB = 2**30
STD = 0.02


def randomize(model, dtype):
    """Replaces every parameter by N(0, STD) in `dtype` (norm scales by N(1, STD)), one parameter at a time, so
    that the modules' lazy float32 initialisation is never computed."""
    weights = []
    for name, p in tree_flatten(model.parameters()):
        scale_of_norm = "norm" in name.rsplit(".", 2)[-2] and name.endswith(".weight")
        w = mx.random.normal(p.shape, dtype=dtype, loc=1.0 if scale_of_norm else 0.0, scale=STD)
        mx.eval(w)
        weights.append((name, w))
    model.load_weights(weights, strict=True)
    return model


def reset_rss_peak():
    """Resets the kernel's VmHWM for this process; False where /proc/self/clear_refs is not writable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def run_phase(name, fn, results):
    """Runs fn() (which evaluates its own work) and records its time and peak memory."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    rss_reset = reset_rss_peak()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    results.append(
        {
            "phase": name,
            "seconds": seconds,
            "mlx_peak": mx.get_peak_memory(),
            "mlx_active": mx.get_active_memory(),
            "rss_peak": rss_peak() if rss_reset else None,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        }
    )
    print(format_row(results[-1]), flush=True)
    return out


def format_row(r):
    rss = f"{r['rss_peak'] / GiB:6.2f}" if r["rss_peak"] is not None else "     -"
    return (
        f"{r['phase']:<12} {r['seconds']:9.1f} s   mlx peak {r['mlx_peak'] / GiB:6.2f} GiB   "
        f"mlx active after {r['mlx_active'] / GiB:6.2f} GiB   rss peak {rss} GiB   "
        f"ru_maxrss {r['ru_maxrss'] / GiB:6.2f} GiB"
    )


def build_unet(dtype, bits):
    unet = randomize(UNet2DConditionModel(UNetConfig.from_dict(read_json(CONFIGS / "unet" / "config.json"))), dtype)
    if bits:
        quantize_model(unet, bits, 64)
    mx.eval(unet.parameters())
    return unet


def unet_step(unet, latent_size, dtype, batch=2):
    """One UNet call: batch 2 is a classifier-free-guidance step, batch 1 one half of it (low_memory mode)."""
    mx.random.seed(1)
    sample = mx.random.normal((batch, latent_size, latent_size, 4), dtype=dtype)
    context = mx.random.normal((batch, 77, 2048), dtype=dtype)
    pooled = mx.random.normal((batch, 1280), dtype=dtype)
    size = latent_size * 8
    time_ids = mx.array([[size, size, 0, 0, size, size]] * batch, dtype=dtype)
    mx.eval(sample, context, pooled, time_ids)
    noise = unet(sample, 999, context, text_embeds=pooled, time_ids=time_ids)
    mx.eval(noise)
    return noise


def unet_phases(args, dtype, latent_size, results):
    """Builds the UNet and runs one step; the UNet is freed on return."""
    unet = run_phase("unet build", lambda: build_unet(dtype, args.quantize), results)
    parameters = sum(v.size for _, v in tree_flatten(unet.parameters()))
    print(f"  UNet: {parameters / 1e9:.2f} B stored values, {mx.get_active_memory() / GiB:.2f} GiB", flush=True)
    if not args.no_step:
        noise = run_phase("unet step", lambda: unet_step(unet, latent_size, dtype, args.batch), results)  # noqa: F821 (deleted below)
        print(f"  UNet output finite: {bool(mx.isfinite(noise).all())}", flush=True)
        del noise
    del unet


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16")
    parser.add_argument("--quantize", type=int, choices=[4, 8], help="quantize the UNet's Linear layers to 4 or 8 bits")
    parser.add_argument("--no-tiled", action="store_true", help="skip the tiled VAE decode")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels, a multiple of 8 (default 1024)")
    parser.add_argument("--no-step", action="store_true", help="build the UNet (its weights' memory) but skip the step")
    parser.add_argument("--no-vae", action="store_true", help="skip the VAE decodes")
    parser.add_argument("--no-unet", action="store_true", help="skip the UNet: the VAE decodes only")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch: 2 = a guided step, 1 = a low_memory half")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    latent_size = args.size // 8
    vae_config = AutoencoderConfig.from_dict(read_json(CONFIGS / "vae" / "config.json"))
    vae_dtype = vae_weights_dtype(dtype, vae_config.force_upcast)
    quantized = f", UNet {args.quantize}-bit (group 64)" if args.quantize else ""
    print(
        f"SDXL {args.size}x{args.size}, random weights, UNet {args.dtype}{quantized}, VAE {vae_dtype}; "
        f"MLX {mx.__version__}, device {mx.default_device()}",
        flush=True,
    )

    results = []
    mx.random.seed(0)
    if not args.no_unet:
        unet_phases(args, dtype, latent_size, results)
    if args.no_vae:
        return

    vae = randomize(AutoencoderKL(vae_config), vae_dtype)
    z = mx.random.normal((1, latent_size, latent_size, 4), dtype=compute_dtype(vae_dtype))
    mx.eval(z)
    if not args.no_tiled:
        run_phase("vae tiled", lambda: mx.eval(vae.decode_tiled(z)), results)
    run_phase("vae untiled", lambda: mx.eval(vae.decode(z)), results)


if __name__ == "__main__":
    main()

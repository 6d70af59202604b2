"""Peak memory of a whole generation, phase by phase: text encoding, denoising, decoding.

    python benchmarks/memory.py --model sd15 --dtype float16 --size 512 --steps 1 [--quantize 4 [--q-convs]]
        [--low-memory] [--free-unet] [--clear-cache] [--folder DIR]

(on Linux with LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 for MLX's CPU backend).
The pipeline is built from tests/configs' real configs with random N(0, 0.02) weights made directly in MLX
in the target dtype (no checkpoint, no torch): the text encoder(s) and UNet in --dtype, the VAE as the
pipeline loads it (loading.vae_dtype: float32 for float16 with force_upcast, except on MLX's CPU backend);
--quantize 4/8 quantizes the text encoders and the UNet as `from_pretrained(quantize=)` does (Linear layers,
group 64), --q-convs the UNet's convolutions too (`mlx-sd convert --q-convs`). Then one `generate` call
(guidance 7.5, Euler, --steps steps) runs, with the pipeline's low_memory mode if asked.

Printed per phase: MLX's peak allocation (mx.get_peak_memory, reset at the phase's start: weights included),
the process's peak resident memory during the phase (VmHWM, reset through /proc/self/clear_refs where Linux
allows), and the phase's time; then the whole generation's MLX peak and the phase where it happened.
--folder DIR writes the random model once as an `mlx-sd convert` folder (weights in --dtype, quantized as
asked; reused when DIR holds one) and loads it with `from_pretrained`, as users do: only then can low_memory free
each model after its phase and read it again (a pipeline made from components keeps them all), and the phases'
peaks include reading the models. --free-unet drops the UNet before decoding (components only); --clear-cache
empties MLX's buffer cache after each phase (mx.clear_cache: lowers RSS, not MLX's peak).

On MLX's CPU backend float16 and quantized weights are computed in float32 (activations.compute_dtype,
quantize.QuantizedLinear): float32 activations, float16 / quantized weights at rest.
"""

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compare import CONFIGS, MODELS  # noqa: E402  (this script's folder is on sys.path)
from sdxl_memory import randomize, reset_rss_peak, rss_peak  # noqa: E402

from mlx_sd.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from mlx_sd.loading import bundled_config, vae_dtype  # noqa: E402
from mlx_sd.pipeline import StableDiffusion, StableDiffusionXL  # noqa: E402
from mlx_sd.quantize import quantize_model  # noqa: E402
from mlx_sd.tokenizer import CLIPTokenizer  # noqa: E402
from mlx_sd.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from mlx_sd.vae import AutoencoderConfig, AutoencoderKL  # noqa: E402

GiB = 2**30


def component(model_name, name, dtype, bits=None, convolutions=False):
    folder = CONFIGS / MODELS[model_name] / name
    cfg = json.loads((folder / "config.json").read_text())
    config_cls, model_cls = {
        "unet": (UNetConfig, UNet2DConditionModel),
        "vae": (AutoencoderConfig, AutoencoderKL),
    }.get(name, (CLIPTextConfig, CLIPTextModel))
    model = randomize(model_cls(config_cls.from_dict(cfg)), dtype)
    if bits:
        quantize_model(model, bits, 64, convolutions=convolutions)
    mx.eval(model.parameters())
    return model


def tokenizer(model_name, name="tokenizer"):
    folder = CONFIGS / MODELS[model_name] / name
    return CLIPTokenizer.from_folder(folder if folder.is_dir() else CONFIGS / MODELS["sd21base"] / name)


def build(args):
    """The pipeline with random weights, made from components (low_memory cannot free them: see --folder)."""
    dtype = getattr(mx, args.dtype)
    xl = (CONFIGS / MODELS[args.model] / "text_encoder_2").is_dir()

    def encoders():
        names = ["text_encoder", "text_encoder_2"] if xl else ["text_encoder"]
        return [component(args.model, n, dtype, args.quantize) for n in names]

    unet = component(args.model, "unet", dtype, args.quantize, args.q_convs)
    vae_cfg = json.loads((CONFIGS / MODELS[args.model] / "vae" / "config.json").read_text())
    vae = component(args.model, "vae", vae_dtype(dtype, vae_cfg.get("force_upcast", True)))
    scheduler = json.loads((CONFIGS / MODELS[args.model] / "scheduler" / "scheduler_config.json").read_text())
    family = {"sd15": "sd1", "sd21base": "sd2", "sdturbo": "sd2"}.get(args.model, "sdxl")
    components = dict(tokenizer=tokenizer(args.model), unet=unet, vae=vae)
    if xl:
        te, te2 = encoders()
        components.update(text_encoder=te, tokenizer_2=tokenizer(args.model, "tokenizer_2"), text_encoder_2=te2)
        pipe = StableDiffusionXL(components, scheduler, dtype, family=family)
    else:
        components.update(text_encoder=encoders()[0])
        pipe = StableDiffusion(components, scheduler, dtype, family=family)
    pipe.low_memory = args.low_memory
    return pipe


def save_folder(pipe, args, folder):
    """Writes the pipeline's models as an `mlx-sd convert` folder (MLX layout, quantized layers as saved)."""
    work = folder.with_name(folder.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    source = CONFIGS / MODELS[args.model]
    shutil.copytree(source, work, ignore=shutil.ignore_patterns("tokenizer*"))
    bundled = bundled_config(pipe.family)
    for tokenizer_name, _ in pipe.text_encoders:
        shutil.copytree(bundled / tokenizer_name, work / tokenizer_name)
        shutil.copytree(ROOT / "mlx_sd" / "assets" / "clip_tokenizer", work / tokenizer_name, dirs_exist_ok=True)
    for name in pipe.models:
        model = getattr(pipe, name)
        config = json.loads((source / name / "config.json").read_text())
        if args.quantize and name != "vae":
            config["quantization"] = {"group_size": 64, "bits": args.quantize}
            if args.q_convs and name == "unet":
                config["quantization"]["convolutions"] = True
        (work / name / "config.json").write_text(json.dumps(config, indent=2))
        mx.save_safetensors(str(work / name / "mlx_model.safetensors"), dict(tree_flatten(model.parameters())))
    manifest = dict(format="mlx_sd", format_version=1, source="benchmarks/memory.py", family=pipe.family)
    manifest.update(dtype=args.dtype, prediction_type="epsilon", quantization=args.quantize)
    (work / "mlx_sd.json").write_text(json.dumps(manifest, indent=2))
    work.rename(folder)


def load(args):
    """The pipeline from --folder (written first from random weights unless it exists), as users load one."""
    folder = Path(args.folder)
    if not (folder / "mlx_sd.json").is_file():
        pipe = build(args)
        save_folder(pipe, args, folder)
        del pipe
        gc.collect()
        mx.clear_cache()
    pipe = StableDiffusion.from_pretrained(folder, dtype=args.dtype, low_memory=args.low_memory)
    return pipe


class Phases:
    """Wraps a pipeline's phase methods (encode_prompt, denoise, decode) to record each one's peaks."""

    def __init__(self, pipe, args):
        self.rows, self.args, self.pipe = [], args, pipe
        self.start = None
        for method, name in (("encode_prompt", "text encoding"), ("decode", "decoding")):
            setattr(pipe, method, self.wrap(name, getattr(pipe, method)))
        denoise = pipe.denoise

        def wrapped_denoise(conditioning, latents, scheduler, *a, **k):
            # generate() takes exactly one item per step and never exhausts the generator: end after the last
            steps = len(scheduler.timesteps if len(a) < 3 or a[2] is None else a[2])
            self.begin()
            for i, step_latents in enumerate(denoise(conditioning, latents, scheduler, *a, **k), 1):
                if i == steps:
                    self.end("denoising")
                yield step_latents

        pipe.denoise = wrapped_denoise

    def wrap(self, name, fn):
        def wrapped(*a, **k):
            if name == "decoding" and self.args.free_unet and not self.args.folder:
                self.pipe.unet = None
                gc.collect()
            self.begin()
            out = fn(*a, **k)
            mx.eval(out.embeds if hasattr(out, "embeds") else out)
            self.end(name)
            return out

        return wrapped

    def begin(self):
        gc.collect()
        mx.reset_peak_memory()
        self.rss_ok = reset_rss_peak()
        self.start = time.perf_counter()

    def end(self, name):
        row = dict(
            phase=name,
            seconds=time.perf_counter() - self.start,
            mlx_peak=mx.get_peak_memory(),
            rss_peak=rss_peak() if self.rss_ok else None,
            active_after=mx.get_active_memory(),
        )
        self.rows.append(row)
        rss = f"{row['rss_peak'] / GiB:6.2f}" if row["rss_peak"] is not None else "     -"
        print(
            f"  {name:<14} MLX peak {row['mlx_peak'] / GiB:6.2f} GiB   RSS peak {rss} GiB   "
            f"active after {row['active_after'] / GiB:6.2f} GiB   {row['seconds']:8.1f} s",
            flush=True,
        )
        if self.args.clear_cache:
            mx.clear_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="sd15")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels, a multiple of 8")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--quantize", type=int, choices=[4, 8])
    parser.add_argument("--q-convs", action="store_true", help="with --quantize: the UNet's convolutions too")
    parser.add_argument("--low-memory", action="store_true", help="the pipeline's low_memory mode")
    parser.add_argument("--free-unet", action="store_true", help="drop the UNet before decoding")
    parser.add_argument("--clear-cache", action="store_true", help="mx.clear_cache() after each phase")
    parser.add_argument("--folder", help="write (once) and load the random model as an mlx-sd convert folder")
    args = parser.parse_args()
    if args.size % 8 or not 64 <= args.size <= 2048:
        parser.error("--size must be a multiple of 8 in [64, 2048]")
    if not 1 <= args.steps <= 100:
        parser.error("--steps must be in [1, 100]")
    if args.q_convs and not args.quantize:
        parser.error("--q-convs needs --quantize")

    quant = f", {args.quantize}-bit{' + convs' if args.q_convs else ''}" if args.quantize else ""
    flags = " ".join(f for f, on in (("low_memory", args.low_memory), ("free-unet", args.free_unet)) if on)
    print(
        f"{args.model} {args.size}x{args.size}, {args.dtype}{quant}, {args.steps} step(s) {flags}; "
        f"MLX {mx.__version__} on {mx.default_device()}",
        flush=True,
    )
    mx.random.seed(0)
    pipe = load(args) if args.folder else build(args)
    gc.collect()
    print(f"  weights        {mx.get_active_memory() / GiB:6.2f} GiB", flush=True)
    phases = Phases(pipe, args)
    mx.reset_peak_memory()
    pipe.generate(
        "a photo of an astronaut riding a horse on mars",
        width=args.size,
        height=args.size,
        steps=args.steps,
        guidance_scale=7.5,
        sampler="euler",
        seed=0,
    )
    top = max(phases.rows, key=lambda r: r["mlx_peak"])
    print(f"  whole generation: MLX peak {top['mlx_peak'] / GiB:.2f} GiB, in {top['phase']}", flush=True)


if __name__ == "__main__":
    main()

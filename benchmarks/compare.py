"""Side by side: mlx_sd, diffusers (torch) and mlx-examples' stable_diffusion on the same random weights.

    python benchmarks/compare.py --model sd21base --component unet --size 256 --rounds 5 --mx /work/mlx-examples

Components (--component, repeatable): `unet` (one guided step: batch 2, 77-token context), `text` (the text
encoder(s) on 2 x 77 tokens), `vae` (decode of one latent), `image` (a whole image: text encoding, --steps
Euler steps, decode; also the median seconds per phase: mlx_sd's own timings, diffusers' text encoder(s),
UNet calls and VAE decode timed around the modules). Models: tests/configs' SD 1.5, SD 2.1-base, SD-Turbo,
SDXL and SDXL-Turbo with random weights (torch's default initialization, seed 0), converted once for each
implementation. --dtype float32/float16/bfloat16; --quantize 4/8 quantizes the MLX implementations' UNet and
text-encoder Linear layers (group 64; diffusers stays float). Implementations (--impl): diffusers, mlx_sd,
mlx_sd_compiled (the UNet through unet.compile_unet; unet component only), mlx_examples (with --mx).

All implementations run in this process; each round runs each once, in a rotating order, after one warm-up
call each. Printed per implementation: the median seconds, the median of the per-round ratios to mlx_sd, and
the largest difference of its output from the first implementation's (diffusers when it runs), and the
median process CPU time (all threads; steadier than wall time on a shared machine). MLX uses its
default device (CPU here; GPU on Apple silicon / CUDA builds); --torch-device picks torch's.

On Linux, MLX's CPU backend calls the system BLAS: run with
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
and check the "BLAS" line: OpenBLAS that sees a CPU it does not know (virtual machines) runs its slowest
kernels ("Prescott"), 3-4x slower; OPENBLAS_CORETYPE=Haswell (or SkylakeX with AVX-512) fixes that. The
preloaded library also serves torch's matrix products.

Memory: every implementation's weights are in memory at once (mlx-examples shares mlx_sd's float arrays);
SD 1.5 / 2.x in float32 need 7-10 GB, SDXL's UNet 10 GB per copy in float32.
"""

import argparse
import ctypes
import gc
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_sd.activations import compute_dtype  # noqa: E402
from mlx_sd.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from mlx_sd.clip import sanitize as sanitize_clip  # noqa: E402
from mlx_sd.loading import vae_dtype  # noqa: E402
from mlx_sd.quantize import quantize_model  # noqa: E402
from mlx_sd.unet import UNet2DConditionModel, UNetConfig, compile_unet  # noqa: E402
from mlx_sd.unet import sanitize as sanitize_unet  # noqa: E402
from mlx_sd.vae import AutoencoderConfig, AutoencoderKL  # noqa: E402
from mlx_sd.vae import sanitize as sanitize_vae  # noqa: E402
from mlx_sd.weights import load_strict  # noqa: E402

CONFIGS = ROOT / "tests" / "configs"
MODELS = {
    "sd15": "runwayml--stable-diffusion-v1-5",
    "sd21base": "stabilityai--stable-diffusion-2-1-base",
    "sdturbo": "stabilityai--sd-turbo",
    "sdxl": "stabilityai--stable-diffusion-xl-base-1.0",
    "sdxlturbo": "stabilityai--sdxl-turbo",
}
IMPLEMENTATIONS = ("diffusers", "mlx_sd", "mlx_sd_compiled", "mlx_examples")
COMPONENTS = ("unet", "text", "vae", "image")
PROMPT = "a photo of an astronaut riding a horse on mars"


def blas_core():
    """The kernel set OpenBLAS chose (openblas_get_corename), or None when the loaded BLAS is not OpenBLAS."""
    try:
        get = ctypes.CDLL(None).openblas_get_corename
    except AttributeError:
        return None
    get.restype = ctypes.c_char_p
    return get().decode()


def config(model, component):
    return json.loads((CONFIGS / MODELS[model] / component / "config.json").read_text())


def text_components(model):
    return (
        ["text_encoder", "text_encoder_2"]
        if (CONFIGS / MODELS[model] / "text_encoder_2").is_dir()
        else ["text_encoder"]
    )


class Reference:
    """The torch models (random weights, seed 0) and their weights as MLX arrays, built on first use."""

    def __init__(self, args):
        self.args = args
        self.torch_models = {}
        self.mlx_models = {}
        self.quantized = set()

    def torch_model(self, component):
        import diffusers
        import torch
        import transformers

        if component not in self.torch_models:
            torch.manual_seed({"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3}[component])
            cfg = config(self.args.model, component)
            if component == "unet":
                model = diffusers.UNet2DConditionModel.from_config(cfg)
            elif component == "vae":
                model = diffusers.AutoencoderKL.from_config(cfg)
            else:
                arch = getattr(transformers, cfg.get("architectures", ["CLIPTextModel"])[0])
                model = arch(transformers.CLIPTextConfig(**cfg))
            self.torch_models[component] = model.float().eval()
        return self.torch_models[component]

    def mlx_model(self, component, quantized=False):
        """mlx_sd's model, float weights in args.dtype (the VAE's as the pipeline keeps them: loading.vae_dtype);
        with `quantized` and --quantize, its Linear layers quantized (in place, once)."""
        if quantized and self.args.quantize and component not in self.quantized:
            quantize_model(self.mlx_model(component), self.args.quantize, 64)
            self.quantized.add(component)
        if component not in self.mlx_models:
            cfg = config(self.args.model, component)
            cls, config_cls, sanitize = {
                "unet": (UNet2DConditionModel, UNetConfig, sanitize_unet),
                "vae": (AutoencoderKL, AutoencoderConfig, sanitize_vae),
            }.get(component, (CLIPTextModel, CLIPTextConfig, sanitize_clip))
            state = self.torch_model(component).state_dict()
            weights = sanitize({k: mx.array(v.numpy()) for k, v in state.items()})
            model = load_strict(cls(config_cls.from_dict(cfg)), weights, component, self.dtype(component))
            mx.eval(model.parameters())
            self.mlx_models[component] = model
        return self.mlx_models[component]

    def dtype(self, component):
        dtype = getattr(mx, self.args.dtype)
        return vae_dtype(dtype) if component == "vae" else dtype

    def drop_torch(self):
        self.torch_models.clear()
        gc.collect()


def inputs(args):
    """Numpy inputs shared by every implementation (NHWC latents)."""
    rng = np.random.default_rng(0)
    h = w = args.size // 8
    unet_cfg = config(args.model, "unet")
    ids = rng.integers(1, 49406, (2, 77)).astype(np.int64)
    ids[:, 0], ids[:, 20], ids[:, 21:] = 49406, 49407, 49407  # BOS, 19 tokens, EOS, EOS padding
    x = dict(
        sample=rng.standard_normal((2, h, w, unet_cfg["in_channels"])).astype(np.float32),
        context=rng.standard_normal((2, 77, unet_cfg["cross_attention_dim"])).astype(np.float32),
        latent=rng.standard_normal((1, h, w, 4)).astype(np.float32),
        ids=ids,
    )
    if unet_cfg.get("addition_embed_type") == "text_time":
        x["text_embeds"] = rng.standard_normal((2, 1280)).astype(np.float32)
        x["time_ids"] = np.array([[args.size, args.size, 0, 0, args.size, args.size]] * 2, np.float32)
    return x


# --- mlx_sd ------------------------------------------------------------------------------------------


def mlx_sd_runner(ref, component, x, args, compiled=False):
    dtype = getattr(mx, args.dtype)
    if compiled and component != "unet":
        raise SystemExit("mlx_sd_compiled: the unet component only")
    if component == "unet":
        unet = ref.mlx_model("unet", quantized=True)
        call = compile_unet(unet) if compiled else unet
        extra = {k: mx.array(x[k]).astype(dtype) for k in ("text_embeds", "time_ids") if k in x}
        sample, context = mx.array(x["sample"]).astype(dtype), mx.array(x["context"]).astype(dtype)
        return lambda: call(sample, mx.array([500.0, 500.0]), context, **extra)
    if component == "text":
        encoders = [ref.mlx_model(name, quantized=True) for name in text_components(args.model)]
        ids = mx.array(x["ids"].astype(np.int32))
        return lambda: mx.concatenate([e(ids).last_hidden_state for e in encoders], axis=-1)
    if component == "vae":
        vae = ref.mlx_model("vae")
        z = mx.array(x["latent"]).astype(compute_dtype(ref.dtype("vae")))
        return lambda: vae.decode(z)
    return mlx_sd_image_runner(ref, args)


def mlx_sd_image_runner(ref, args):
    from mlx_sd.pipeline import StableDiffusion, StableDiffusionXL
    from mlx_sd.tokenizer import CLIPTokenizer

    folder = CONFIGS / MODELS[args.model]
    tokenizer_folder = (
        folder / "tokenizer" if (folder / "tokenizer").is_dir() else CONFIGS / MODELS["sd21base"] / "tokenizer"
    )
    tokenizer = CLIPTokenizer.from_folder(tokenizer_folder)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    components = dict(tokenizer=tokenizer, unet=ref.mlx_model("unet", quantized=True), vae=ref.mlx_model("vae"))
    dtype = getattr(mx, args.dtype)
    encoders = [ref.mlx_model(name, quantized=True) for name in text_components(args.model)]
    components["text_encoder"] = encoders[0]
    if len(encoders) == 2:
        components.update(tokenizer_2=CLIPTokenizer.from_folder(folder / "tokenizer_2"), text_encoder_2=encoders[1])
        pipe = StableDiffusionXL(components, scheduler, dtype=dtype, family="sdxl")
    else:
        family = "sd1" if args.model == "sd15" else "sd2"
        pipe = StableDiffusion(components, scheduler, dtype=dtype, family=family)
    size = args.size

    def run():
        images = pipe.generate(
            PROMPT, width=size, height=size, steps=args.steps, guidance_scale=args.guidance, sampler="euler", seed=0
        )
        t = images.timings
        run.phases = {"text": t["text_encoder"], "denoise": t["denoise"], "decode": t["vae"]}
        return mx.array(np.asarray(images[0], np.float32))

    return run


# --- diffusers --------------------------------------------------------------------------------------


def diffusers_runner(ref, component, x, args):
    import torch

    device, dtype = args.torch_device, getattr(torch, args.dtype)

    def sync(t):
        _synchronize(device)
        return t

    def nchw(a):
        return torch.from_numpy(a).permute(0, 3, 1, 2).to(device, dtype)

    if component == "unet":
        unet = ref.torch_model("unet").to(device, dtype)
        added = {k: torch.from_numpy(x[k]).to(device, dtype) for k in ("text_embeds", "time_ids") if k in x}
        sample, context = nchw(x["sample"]), torch.from_numpy(x["context"]).to(device, dtype)
        t = torch.tensor([500.0, 500.0], device=device)
        return lambda: sync(unet(sample, t, context, added_cond_kwargs=added or None).sample).permute(0, 2, 3, 1)
    if component == "text":
        encoders = [ref.torch_model(name).to(device, dtype) for name in text_components(args.model)]
        ids = torch.from_numpy(x["ids"]).to(device)
        return lambda: sync(torch.cat([e(ids).last_hidden_state for e in encoders], dim=-1))
    if component == "vae":
        vae = ref.torch_model("vae").to(device, torch.float32 if dtype == torch.float16 else dtype)
        z = nchw(x["latent"]).to(vae.dtype)
        return lambda: sync(vae.decode(z).sample).permute(0, 2, 3, 1)
    return diffusers_image_runner(ref, args, device, dtype)


def diffusers_image_runner(ref, args, device, dtype):
    import diffusers
    from transformers import CLIPTokenizer

    from mlx_sd import tokenizer as tokenizer_module

    folder = CONFIGS / MODELS[args.model]
    assets = Path(tokenizer_module.__file__).parent / "assets" / "clip_tokenizer"
    scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    tokenizers = []
    for sub in ("tokenizer", "tokenizer_2")[: len(text_components(args.model))]:
        src = folder / sub if (folder / sub).is_dir() else CONFIGS / MODELS["sd21base"] / "tokenizer"
        tokenizers.append(
            CLIPTokenizer(
                str(assets / "vocab.json"), str(assets / "merges.txt"), model_max_length=77, **_special_tokens(src)
            )
        )
    models = {c: ref.torch_model(c).to(device, dtype) for c in ["unet", *text_components(args.model)]}
    vae = ref.torch_model("vae").to(device, dtype)
    if len(tokenizers) == 2:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=models["text_encoder"],
            text_encoder_2=models["text_encoder_2"],
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=models["unet"],
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae,
            text_encoder=models["text_encoder"],
            tokenizer=tokenizers[0],
            unet=models["unet"],
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    if dtype.is_floating_point and dtype != vae.dtype:
        pipe.vae.to(vae.dtype)
    phases = {}
    for phase, owner, method in [
        *(("text", m, "forward") for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None),
        ("denoise", pipe.unet, "forward"),
        ("decode", pipe.vae, "decode"),
    ]:
        setattr(owner, method, _phase_timer(getattr(owner, method), phase, phases, device))

    def run():
        import torch

        phases.clear()
        image = pipe(
            PROMPT,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        return np.asarray(image, np.float32)

    run.phases = phases
    return run


def _synchronize(device):
    """Waits for torch's queued work on a GPU device (nothing on the CPU)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def _phase_timer(fn, phase, phases, device):
    """fn, adding its wall seconds (device work included) to phases[phase]."""

    def timed_call(*a, **k):
        tic = time.perf_counter()
        out = fn(*a, **k)
        _synchronize(device)
        phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - tic
        return out

    return timed_call


def _special_tokens(folder):
    cfg = (
        json.loads((folder / "tokenizer_config.json").read_text())
        if (folder / "tokenizer_config.json").is_file()
        else {}
    )
    special = (
        json.loads((folder / "special_tokens_map.json").read_text())
        if (folder / "special_tokens_map.json").is_file()
        else {}
    )
    tokens = {}
    for name in ("pad_token", "bos_token", "eos_token", "unk_token"):
        value = special.get(name, cfg.get(name))
        if value is not None:
            tokens[name] = value["content"] if isinstance(value, dict) else value
    return tokens


# --- mlx-examples -----------------------------------------------------------------------------------


def mlx_examples_runner(ref, component, x, args):
    """mlx-examples' stable_diffusion package, given by --mx (a checkout of ml-explore/mlx-examples)."""
    sys.path.insert(0, str(Path(args.mx) / "stable_diffusion"))
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from stable_diffusion import clip, model_io
    from stable_diffusion import config as mxc
    from stable_diffusion import unet as mxunet
    from stable_diffusion import vae as mxvae

    def shared(model, mapper, ours):
        """Their model with our (evaluated) arrays, 4-D ones handed over as OIHW as their mapper expects."""
        weights = []
        for k, v in tree_flatten(ours.parameters()):
            weights += mapper(k, v.transpose(0, 3, 1, 2) if v.ndim == 4 else v)
        model.update(tree_unflatten(weights))
        mx.eval(model.parameters())
        return model

    dtype = getattr(mx, args.dtype)
    if component == "unet":
        c = ref.mlx_model("unet").config
        model = mxunet.UNetModel(
            mxc.UNetConfig(
                in_channels=c.in_channels,
                out_channels=c.out_channels,
                block_out_channels=c.block_out_channels,
                layers_per_block=c.layers_per_block,
                transformer_layers_per_block=c.transformer_layers_per_block,
                num_attention_heads=c.num_attention_heads,
                cross_attention_dim=c.cross_attention_dim,
                norm_num_groups=c.norm_num_groups,
                down_block_types=c.down_block_types,
                up_block_types=c.up_block_types[::-1],
                addition_embed_type=c.addition_embed_type,
                addition_time_embed_dim=c.addition_time_embed_dim,
                projection_class_embeddings_input_dim=c.projection_class_embeddings_input_dim,
            )
        )
        model = shared(model, model_io.map_unet_weights, ref.mlx_model("unet"))
        if args.quantize:
            nn.quantize(
                model,
                64,
                args.quantize,
                class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[1] % 64 == 0,
            )
        sample, context = mx.array(x["sample"]).astype(dtype), mx.array(x["context"]).astype(dtype)
        text_time = (
            (mx.array(x["text_embeds"]).astype(dtype), mx.array(x["time_ids"]).astype(dtype))
            if "time_ids" in x
            else None
        )
        return lambda: model(sample, mx.array([500.0, 500.0]), encoder_x=context, text_time=text_time)
    if component == "text":
        encoders = []
        for name in text_components(args.model):
            cfg = config(args.model, name)
            model = clip.CLIPTextModel(
                mxc.CLIPTextModelConfig(
                    num_layers=cfg["num_hidden_layers"],
                    model_dims=cfg["hidden_size"],
                    num_heads=cfg["num_attention_heads"],
                    max_length=cfg["max_position_embeddings"],
                    vocab_size=cfg["vocab_size"],
                    projection_dim=cfg["projection_dim"] if "WithProjection" in cfg["architectures"][0] else None,
                    hidden_act=cfg.get("hidden_act", "quick_gelu"),
                )
            )
            encoders.append(shared(model, model_io.map_clip_text_encoder_weights, ref.mlx_model(name)))
            if args.quantize:
                nn.quantize(
                    encoders[-1],
                    64,
                    args.quantize,
                    class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[1] % 64 == 0,
                )
        ids = mx.array(x["ids"].astype(np.int32))
        return lambda: mx.concatenate([e(ids).last_hidden_state for e in encoders], axis=-1)
    if component == "vae":
        cfg = config(args.model, "vae")
        model = mxvae.Autoencoder(
            mxc.AutoencoderConfig(
                in_channels=cfg["in_channels"],
                out_channels=cfg["out_channels"],
                latent_channels_out=2 * cfg["latent_channels"],
                latent_channels_in=cfg["latent_channels"],
                block_out_channels=cfg["block_out_channels"],
                layers_per_block=cfg["layers_per_block"],
                norm_num_groups=cfg["norm_num_groups"],
                scaling_factor=cfg.get("scaling_factor", 0.18215),
            )
        )
        model = shared(model, model_io.map_vae_weights, ref.mlx_model("vae"))
        z = mx.array(x["latent"]).astype(compute_dtype(ref.dtype("vae")))
        z = z * model.scaling_factor  # their decode divides by it
        return lambda: model.decode(z)
    raise SystemExit("--component image is not wired for mlx-examples (its pipeline loads from the Hub)")


RUNNERS = {
    "mlx_sd": mlx_sd_runner,
    "mlx_sd_compiled": lambda *a: mlx_sd_runner(*a, compiled=True),
    "diffusers": diffusers_runner,
    "mlx_examples": mlx_examples_runner,
}


def to_numpy(out):
    if isinstance(out, mx.array):
        mx.eval(out)
        return np.array(out.astype(mx.float32))
    if isinstance(out, np.ndarray):
        return out
    return out.detach().float().cpu().numpy()


def timed(fn):
    """(wall seconds, process CPU seconds, output) of one call."""
    import torch

    with torch.no_grad():
        tic, cpu = time.perf_counter(), time.process_time()
        out = fn()
        if isinstance(out, mx.array):
            mx.eval(out)
        return time.perf_counter() - tic, time.process_time() - cpu, out


def _phase_medians(rounds):
    """'text 0.71 s, denoise 8.40 s, decode 16.30 s': each phase's median over the rounds."""
    return ", ".join(f"{phase} {np.median([r.get(phase, 0.0) for r in rounds]):.2f} s" for phase in rounds[0])


def bench_component(ref, component, args):
    x = inputs(args)
    # mlx-examples first: it takes mlx_sd's float arrays before --quantize replaces them
    order = sorted(args.impl, key=lambda name: name != "mlx_examples")
    runners = {name: RUNNERS[name](ref, component, x, args) for name in order}
    runners = {name: runners[name] for name in args.impl}
    if "diffusers" not in args.impl:
        ref.drop_torch()
    outputs = {name: to_numpy(timed(fn)[2]) for name, fn in runners.items()}  # warm-up
    times = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    phases = {name: [] for name in runners}
    names = list(runners)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu_seconds, _ = timed(runners[name])
            times[name].append(wall)
            cpu[name].append(cpu_seconds)
            if hasattr(runners[name], "phases"):
                phases[name].append(dict(runners[name].phases))
            mx.clear_cache()
        print(f"  round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)
    first = names[0]
    print(f"{component} {args.model} {args.size}px {args.dtype}{f' {args.quantize}-bit' if args.quantize else ''}:")
    for name in names:
        ratio = np.median(np.array(times[name]) / np.array(times["mlx_sd"])) if "mlx_sd" in times else float("nan")
        # whole images start from each implementation's own noise (torch's generator, MLX's): not compared
        diff = (
            "" if component == "image" else f"  max |out - {first}| {np.abs(outputs[name] - outputs[first]).max():.2e}"
        )
        print(
            f"  {name:<15} {np.median(times[name]):8.2f} s  {ratio:5.2f}x mlx_sd"
            f"  (CPU time {np.median(cpu[name]):7.2f} s){diff}"
        )
        if phases[name]:
            print(" " * 19 + _phase_medians(phases[name]))
    del runners
    gc.collect()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="sd21base")
    parser.add_argument("--component", choices=COMPONENTS, action="append", help="repeatable; default unet")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents: size / 8)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--quantize", type=int, choices=[4, 8], help="MLX implementations: 4- or 8-bit Linear layers")
    parser.add_argument("--impl", default=None, help=f"comma-separated subset of {','.join(IMPLEMENTATIONS)}")
    parser.add_argument("--mx", help="a checkout of ml-explore/mlx-examples (adds mlx_examples to the default --impl)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="image: sampler steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="image: guidance scale (0 for the Turbo models)")
    parser.add_argument("--torch-device", default="cpu", choices=["cpu", "cuda", "mps"])
    args = parser.parse_args()
    if args.size % 8 or not 64 <= args.size <= 2048:
        parser.error("--size must be a multiple of 8 in [64, 2048]")
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    default = ["diffusers", "mlx_sd"] + (["mlx_examples"] if args.mx else [])
    args.impl = args.impl.split(",") if args.impl else default
    if unknown := set(args.impl) - set(IMPLEMENTATIONS):
        parser.error(f"unknown --impl {sorted(unknown)}")
    if "mlx_examples" in args.impl and not args.mx:
        parser.error("mlx_examples needs --mx PATH (a checkout of ml-explore/mlx-examples)")
    import diffusers
    import torch

    print(
        f"MLX {mx.__version__} on {mx.default_device()}, torch {torch.__version__} on {args.torch_device} "
        f"({torch.get_num_threads()} threads), diffusers {diffusers.__version__}; "
        f"BLAS: {blas_core() or 'not OpenBLAS'}",
        flush=True,
    )
    ref = Reference(args)
    for component in args.component or ["unet"]:
        bench_component(ref, component, args)


if __name__ == "__main__":
    main()

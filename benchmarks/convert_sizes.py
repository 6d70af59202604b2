"""`mlx-sd convert` on full-size SD 1.5 and SD 2.1 with random weights: sizes on disk, conversion time and peak
memory, load times of the converted folders against the diffusers folder, and quantized image differences
(Linear layers only, and with the UNet's convolutions: `--q-convs`).

    flock /tmp/mlx_sd_heavy.lock python benchmarks/convert_sizes.py [--work DIR] [--models sd15 sd21]

Each conversion and load runs in a fresh subprocess, which reports its wall time, its peak resident memory
(ru_maxrss) and MLX's peak allocation. The files were just written, so loads read from a warm page cache.
Needs the test extra (torch, diffusers, transformers) to build the random diffusers folders.
"""

import argparse
import gc
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "mlx_sd" / "assets" / "configs"
MODELS = {"sd15": ("sd1", None), "sd21": ("sd2-v", "v_prediction")}  # name: (bundled configs, single-file flag)
GiB = 2**30


def build(name, folder, single_file):
    """A random-weight diffusers folder (float32, like the Hub's) and the same weights as an LDM single file."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT / "tests"))
    from ldm_export import export_ldm

    configs = CONFIGS / MODELS[name][0]
    torch.manual_seed(0)
    shutil.copytree(configs, folder)
    for f in (ROOT / "mlx_sd" / "assets" / "clip_tokenizer").iterdir():
        shutil.copy(f, folder / "tokenizer" / f.name)

    def config(component):
        return {
            k: v
            for k, v in json.loads((configs / component / "config.json").read_text()).items()
            if not k.startswith("_")
        }

    modules = {
        "unet": UNet2DConditionModel(**config("unet")),
        "vae": AutoencoderKL(**config("vae")),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**config("text_encoder"))),
    }
    for component, module in modules.items():
        module.save_pretrained(folder / component, safe_serialization=True)
    family = "sd2" if name == "sd21" else "sd1"
    export_ldm(single_file, family, **{k: m.state_dict() for k, m in modules.items()})
    del modules
    gc.collect()


def child(kind, *args):
    """Runs `kind` in a subprocess; returns its JSON report."""
    out = subprocess.run(
        [sys.executable, __file__, "_" + kind, *map(str, args)], check=True, capture_output=True, text=True, cwd=ROOT
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss():
    """Peak resident bytes of this process: VmHWM on Linux (whose ru_maxrss carries the parent's peak over into
    a child), ru_maxrss (bytes) on macOS."""
    status = Path("/proc/self/status")
    if status.is_file():
        hwm = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM"))
        return int(hwm.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def report(extra):
    import mlx.core as mx

    extra.update(rss_gib=peak_rss() / GiB, mlx_peak_gib=mx.get_peak_memory() / GiB)
    print(json.dumps(extra))


def do_convert(source, output, dtype, bits, prediction_type):
    from mlx_sd.convert import convert

    tic = time.perf_counter()
    convert(
        source,
        output,
        dtype=dtype,
        quantize=None if bits == "none" else int(bits.rstrip("c")),
        quantize_convolutions=bits.endswith("c"),
        force=True,
        prediction_type=None if prediction_type == "none" else prediction_type,
    )
    report({"seconds": time.perf_counter() - tic})


def do_load(folder, quantize):
    from mlx_sd import StableDiffusion

    tic = time.perf_counter()
    StableDiffusion.from_pretrained(folder, dtype="float16", quantize=None if quantize == "none" else int(quantize))
    report({"seconds": time.perf_counter() - tic})


def do_generate(folder, output):
    """Two euler steps at 128x128 with guidance, computed in float32 from the saved weights; saves the
    final latents and image."""
    import mlx.core as mx
    import numpy as np

    from mlx_sd import StableDiffusion

    pipe = StableDiffusion.from_pretrained(folder, dtype="float32")
    latents = mx.random.normal((1, 16, 16, 4), key=mx.random.key(0))
    scheduler_latents = []
    images = pipe.generate(
        "a photo of an astronaut riding a horse",
        width=128,
        height=128,
        steps=2,
        guidance_scale=7.5,
        sampler="euler",
        seed=0,
        latents=latents,
        callback=lambda step, t, x: scheduler_latents.append(np.array(x)),
    )
    np.savez(output, image=np.asarray(images[0]), latents=scheduler_latents[-1])
    report({})


def size(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / GiB


def run(name, work):
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    folder, single = work / "diffusers", work / "model.safetensors"
    if not (folder / "model_index.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        tic = time.perf_counter()
        build(name, folder, single)
        print(f"{name}: built the random diffusers folder in {time.perf_counter() - tic:.0f} s", flush=True)
    prediction_type = MODELS[name][1] or "none"
    rows = {}
    for label, source, dtype, bits in (
        ("fp16", folder, "float16", "none"),
        ("q8", folder, "float16", "8"),
        ("q4", folder, "float16", "4"),
        ("q8 convs", folder, "float16", "8c"),
        ("q4 convs", folder, "float16", "4c"),
        ("fp16 from single file", single, "float16", "none"),
    ):
        out = work / label.replace(" ", "_")
        rows[label] = child("convert", source, out, dtype, bits, prediction_type if source == single else "none")
        rows[label]["gib"] = size(out)
        rows[label]["components"] = {c.name: size(c) for c in sorted(out.iterdir()) if c.is_dir()}
        print(name, label, json.dumps(rows[label]), flush=True)
    shutil.rmtree(work / "fp16_from_single_file")
    largest = max(size(c) for c in folder.iterdir() if c.is_dir())
    loads = {
        "diffusers folder (float32 files)": child("load", folder, "none"),
        "converted fp16": child("load", work / "fp16", "none"),
        "converted q8": child("load", work / "q8", "none"),
        "converted q4": child("load", work / "q4", "none"),
        "converted q4 with convolutions": child("load", work / "q4_convs", "none"),
        "diffusers folder, quantize=4 at load": child("load", folder, 4),
    }
    for label, row in loads.items():
        print(name, "load", label, json.dumps(row), flush=True)
    images = {}
    for label in ("fp16", "q8", "q4", "q8 convs", "q4 convs"):
        name_ = label.replace(" ", "_")
        child("generate", work / name_, work / f"{name_}.npz")
        images[label] = np.load(work / f"{name_}.npz")
    diffs = {}
    for label in ("q8", "q4", "q8 convs", "q4 convs"):
        image = np.abs(images[label]["image"].astype(np.float64) - images["fp16"]["image"])
        ref = images["fp16"]["latents"]
        diffs[label] = dict(
            image_mean=image.mean(),
            image_max=image.max(),
            latents_rel=float(np.linalg.norm(images[label]["latents"] - ref) / np.linalg.norm(ref)),
        )
    return dict(
        diffusers_gib=size(folder),
        largest_component_gib=largest,
        single_file_gib=single.stat().st_size / GiB,
        conversions=rows,
        loads=loads,
        diffs=diffs,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mlx_sd_convert_bench"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    results = {}
    for name in args.models:
        results[name] = run(name, args.work / name)
        if not args.keep:
            shutil.rmtree(args.work / name)
    print(json.dumps(results, indent=1, default=float))
    for name, r in results.items():
        fp16 = r["conversions"]["fp16"]["gib"]
        print(
            f"\n## {name}: diffusers folder {r['diffusers_gib']:.2f} GiB (float32), single file "
            f"{r['single_file_gib']:.2f} GiB, largest component {r['largest_component_gib']:.2f} GiB"
        )
        print("| output | size GiB | vs fp16 | convert s | peak RSS GiB | MLX peak GiB | peak / largest |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, row in r["conversions"].items():
            print(
                f"| {label} | {row['gib']:.2f} | {row['gib'] / fp16:.3f} | {row['seconds']:.1f} | "
                f"{row['rss_gib']:.2f} | {row['mlx_peak_gib']:.2f} | "
                f"{row['mlx_peak_gib'] / r['largest_component_gib']:.2f} |"
            )
        print("| load (float16) | seconds | peak RSS GiB |\n| --- | --- | --- |")
        for label, row in r["loads"].items():
            print(f"| {label} | {row['seconds']:.1f} | {row['rss_gib']:.2f} |")
        for label, d in r["diffs"].items():
            print(
                f"{label} vs fp16 (2 euler steps, 128x128, float32 compute): image mean {d['image_mean']:.2f}/255 "
                f"max {d['image_max']:.0f}/255, final latents relative L2 {d['latents_rel']:.4f}"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        {"_convert": do_convert, "_load": do_load, "_generate": do_generate}[sys.argv[1]](*sys.argv[2:])
    else:
        main()

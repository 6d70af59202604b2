"""`mlx-sd convert` on tiny random models: round trips, single files against diffusers, quantization, bad input.

Tolerances: float32 round trips are bit-exact (the same weights in the same layout run by the same code);
float16 round trips and single files against diffusers: final 8-bit images within 0.5/255 mean and 2/255 max
absolute difference (tests/test_pipeline.py); quantized models: bounds on the image difference from the float16
model measured on these random weights with margin (see test_quantized_models_load_and_generate).
"""

import gc
import json
import pickle
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from helpers import CONFIGS, SD15, SD21, SD21_BASE, SDXL, assert_images_close, make_pipeline, run_both
from ldm_export import export_ldm
from mlx_sd import ModelLoadError, StableDiffusion, loading
from mlx_sd import convert as convert_module
from mlx_sd.controlnet import CONTROLNET_PROBE
from mlx_sd.convert import convert, convert_command
from mlx_sd.info import describe
from mlx_sd.loading import vae_dtype
from mlx_sd.quantize import QuantizedLinear, quantize_model

LDM_FAMILY = {"sd1": "sd1", "sd2v": "sd2", "sdxl": "sdxl"}
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (diffusers pipeline, its diffusers folder, the same weights as an LDM single file)."""
    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            reference = make_pipeline(family, folder / "diffusers")
            states = {n: getattr(reference, n).state_dict() for n in COMPONENTS if getattr(reference, n, None)}
            single = export_ldm(folder / f"{family}.safetensors", LDM_FAMILY[family], **states)
            cache[family] = reference, folder / "diffusers", single
        return cache[family]

    return get


def generate(pipe, latents, **kwargs):
    """One image of the tiny models, as float64 (H, W, 3) in 0..255."""
    settings = dict(width=64, height=48, steps=3, guidance_scale=7.5, sampler="euler", seed=0)
    image = pipe.generate("a photo of an astronaut riding a horse", latents=latents, **{**settings, **kwargs})[0]
    return np.asarray(image, np.float64)


LATENTS = mx.array(np.random.default_rng(0).standard_normal((1, 6, 8, 4)).astype(np.float32))


def parameters(pipe):
    return {
        f"{n}.{k}": v
        for n in COMPONENTS
        if getattr(pipe, n, None) is not None
        for k, v in tree_flatten(getattr(pipe, n).parameters())
    }


def assert_same_parameters(a, b):
    pa, pb = parameters(a), parameters(b)
    assert pa.keys() == pb.keys()
    bad = [k for k in pa if pa[k].dtype != pb[k].dtype or not np.array_equal(np.array(pa[k]), np.array(pb[k]))]
    assert not bad, bad[:5]


def folder_bytes(folder, component=None):
    return sum(f.stat().st_size for f in (folder / component if component else folder).rglob("*.safetensors"))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_float32_round_trip_is_bit_identical(tiny, family, tmp_path):
    _, folder, _ = tiny(family)
    out = convert(folder, tmp_path / "mlx", dtype="float32")
    manifest = json.loads((out / "mlx_sd.json").read_text())
    assert (manifest["family"], manifest["dtype"], manifest["quantization"]) == (family, "float32", None)
    # weights are saved in MLX layout: conv kernels already OHWI, nothing to transpose at load
    assert mx.load(str(out / "unet" / "mlx_model.safetensors"))["conv_in.weight"].shape == (32, 3, 3, 4)
    direct = StableDiffusion.from_pretrained(folder, dtype="float32")
    converted = StableDiffusion.from_pretrained(out, dtype="float32")
    assert_same_parameters(converted, direct)
    assert np.array_equal(generate(converted, LATENTS), generate(direct, LATENTS))


def test_float16_round_trip_within_float16_tolerance(tiny, tmp_path):
    reference, folder, _ = tiny("sd1")
    out = convert(folder, tmp_path / "mlx")  # float16 by default
    assert {v.dtype for v in mx.load(str(out / "unet" / "mlx_model.safetensors")).values()} == {mx.float16}
    converted = StableDiffusion.from_pretrained(out, dtype="float16")
    direct = StableDiffusion.from_pretrained(folder, dtype="float16")
    # only the VAE differs: it runs in float32 (force_upcast), from float16-rounded weights once converted
    assert_images_close(generate(converted, LATENTS), generate(direct, LATENTS))
    assert_images_close(*run_both(reference, converted, "euler", 64, 48, 3, 7.5))


@pytest.mark.parametrize("family", ["sd1", "sd2v", "sdxl"])
def test_single_file_matches_diffusers(tiny, family, tmp_path):
    reference, folder, single = tiny(family)
    out = convert(single, tmp_path / "mlx", dtype="float32", config=folder)
    manifest = json.loads((out / "mlx_sd.json").read_text())
    assert manifest["family"] == LDM_FAMILY[family]
    ours = StableDiffusion.from_pretrained(out, dtype="float32")
    assert_images_close(*run_both(reference, ours, "euler", 64, 48, 3, 7.5, negative_prompt="blurry"))
    # the same weights as converting the diffusers folder, bit for bit
    assert_same_parameters(ours, StableDiffusion.from_pretrained(folder, dtype="float32"))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_from_pretrained_reads_single_files(tiny, family, tmp_path, monkeypatch):
    """A single file loads without converting, with the bundled configs of its family (the tiny ones here)."""
    _, folder, single = tiny(family)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / LDM_FAMILY[family]).symlink_to(folder)
    monkeypatch.setattr(loading, "CONFIGS", tmp_path / "configs")
    ours = StableDiffusion.from_pretrained(single, dtype="float32")
    direct = StableDiffusion.from_pretrained(folder, dtype="float32")
    assert_same_parameters(ours, direct)
    assert np.array_equal(generate(ours, LATENTS), generate(direct, LATENTS))


def test_bundled_configs_are_the_real_ones():
    """The configs single files are converted with: SD 1.5, SD 2.1 base (epsilon), SD 2.1 (v), SDXL base."""
    real = {"sd1": SD15, "sd2": SD21_BASE, "sd2-v": SD21, "sdxl": SDXL}
    for name, model in real.items():
        bundled = loading.CONFIGS / name
        # controlnet/: the family's ControlNet config for single-file ControlNets (test_controlnet checks it)
        files = sorted(
            str(f.relative_to(bundled))
            for f in bundled.rglob("*")
            if f.is_file() and not f.is_relative_to(bundled / "controlnet")
        )
        assert files == sorted(
            str(f.relative_to(CONFIGS / model))
            for f in (CONFIGS / model).rglob("*")
            if f.is_file() and not f.is_relative_to(CONFIGS / model / "vae_1_0")
        ), name
        for f in files:
            assert (bundled / f).read_bytes() == (CONFIGS / model / f).read_bytes(), f"{name}/{f}"
    assert loading.bundled_config("sd2", "v_prediction") == loading.CONFIGS / "sd2-v"
    assert loading.bundled_config("sd2", "epsilon") == loading.CONFIGS / "sd2"


def test_sd2_single_file_needs_the_prediction_type(tiny, tmp_path):
    _, folder, single = tiny("sd2v")
    with pytest.raises(ModelLoadError, match="--prediction-type epsilon"):
        convert(single, tmp_path / "mlx")
    with pytest.raises(ModelLoadError, match="--prediction-type epsilon"):
        StableDiffusion.from_pretrained(single)
    # with a prediction type, the bundled SD 2.1 configs are used; they do not fit the tiny weights
    with pytest.raises(ModelLoadError, match="do not fit sd2v.safetensors; pass --config"):
        convert(single, tmp_path / "mlx", prediction_type="v_prediction")
    out = convert(single, tmp_path / "mlx", dtype="float32", config=folder, prediction_type="epsilon")
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    assert json.loads((out / "mlx_sd.json").read_text())["prediction_type"] == "epsilon"
    assert not list(tmp_path.glob(".*"))


def quantizable(pipe, name, group_size):
    """Paths of the layers mlx_sd quantizes: Linear and token embeddings whose input width divides into groups."""
    return sorted(
        path
        for path, m in getattr(pipe, name).named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding))
        and not path.endswith("position_embedding")
        and m.weight.shape[-1] % group_size == 0
    )


def quantized(pipe, name):
    return sorted(
        path
        for path, m in getattr(pipe, name).named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    )


def test_quantized_models_load_and_generate(tiny, tmp_path):
    _, folder, _ = tiny("sdxl")
    fp16 = convert(folder, tmp_path / "fp16")
    # computed in float32 from the saved float16 weights, so that the difference is the quantization's alone
    float_pipe = StableDiffusion.from_pretrained(fp16, dtype="float32")
    expected = generate(float_pipe, LATENTS)
    diffs = {}
    for bits in (8, 4):
        out = convert(folder, tmp_path / f"q{bits}", quantize=bits, q_group_size=32)
        config = json.loads((out / "unet" / "config.json").read_text())
        assert config["quantization"] == {"group_size": 32, "bits": bits}
        assert "quantization" not in json.loads((out / "vae" / "config.json").read_text())
        pipe = StableDiffusion.from_pretrained(out, dtype="float32")
        for name in ("text_encoder", "text_encoder_2", "unet"):
            layers = quantized(pipe, name)
            assert layers and layers == quantizable(float_pipe, name, 32), name
            # each quantized (O, I) weight: 2 bytes -> bits / 8 bytes per weight, plus a float16 scale and bias per
            # group; the rest of the file is the same, up to the safetensors header's two extra entries per layer
            modules = dict(getattr(float_pipe, name).named_modules())
            saved = sum(modules[p].weight.size * (2 - bits / 8 - 4 / 32) for p in layers)
            assert abs(folder_bytes(fp16, name) - folder_bytes(out, name) - saved) < 300 * len(layers), name
        assert not quantized(pipe, "vae")
        assert "text_model.embeddings.token_embedding" in quantized(pipe, "text_encoder")
        image = generate(pipe, LATENTS)
        diffs[bits] = np.abs(image - expected)
    # measured on these weights: 8-bit 0.08/255 mean, 1/255 max; 4-bit 1.35/255 mean, 16/255 max
    assert diffs[8].mean() <= 0.5 and diffs[8].max() <= 3
    assert diffs[4].mean() <= 3 and diffs[4].max() <= 24
    assert 0 < diffs[8].mean() < diffs[4].mean()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_convolutions(tiny, bits, tmp_path):
    """--q-convs: the UNet's convolutions (but conv_in / conv_out) are stored quantized and dequantized per call.
    The saved folder rebuilds exactly the model quantized in memory, is smaller than Linear-only quantization,
    and stays close to float. Measured on these weights (float32 compute): 8-bit 0.08/255 mean, 1/255 max
    (Linear only: 0.05, 1); 4-bit 1.55/255 mean, 11/255 max (Linear only: 0.62, 4)."""
    _, folder, _ = tiny("sd1")
    linear_only = convert(folder, tmp_path / "linear", dtype="float32", quantize=bits, q_group_size=32)
    out = convert(
        folder, tmp_path / "convs", dtype="float32", quantize=bits, q_group_size=32, quantize_convolutions=True
    )
    assert json.loads((out / "unet" / "config.json").read_text())["quantization"] == {
        "group_size": 32,
        "bits": bits,
        "convolutions": True,
    }
    assert folder_bytes(out, "unet") < 0.8 * folder_bytes(linear_only, "unet")
    assert folder_bytes(out, "text_encoder") == folder_bytes(linear_only, "text_encoder")  # UNet only
    pipe = StableDiffusion.from_pretrained(out, dtype="float32")
    convs = {path: type(m).__name__ for path, m in pipe.unet.named_modules() if "Conv" in type(m).__name__}
    assert {p for p, kind in convs.items() if kind == "Conv2d"} == {"conv_in", "conv_out"}
    assert sum(kind == "QuantizedConv2d" for kind in convs.values()) > 10

    in_memory = StableDiffusion.from_pretrained(folder, dtype="float32")
    expected = generate(in_memory, LATENTS)
    quantize_model(in_memory.unet, bits, 32, convolutions=True)
    for name in ("text_encoder",):
        quantize_model(getattr(in_memory, name), bits, 32)
    assert_same_parameters(pipe, in_memory)
    image = generate(pipe, LATENTS)
    assert np.array_equal(image, generate(in_memory, LATENTS))
    linear_diff = np.abs(generate(StableDiffusion.from_pretrained(linear_only, dtype="float32"), LATENTS) - expected)
    diff = np.abs(image - expected)
    print(
        f"\n{bits}-bit vs float: convolutions too {diff.mean():.2f}/255 mean, {diff.max():.0f}/255 max; "
        f"Linear only {linear_diff.mean():.2f}, {linear_diff.max():.0f}"
    )
    assert 0 < diff.mean() <= (0.5 if bits == 8 else 4)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_at_load_equals_quantized_conversion(tiny, bits, tmp_path):
    _, folder, _ = tiny("sd1")
    out = convert(folder, tmp_path / "q", dtype="float32", quantize=bits)  # group size 64, as at load
    converted = StableDiffusion.from_pretrained(out, dtype="float32")
    at_load = StableDiffusion.from_pretrained(folder, dtype="float32", quantize=bits)
    assert quantized(at_load, "unet")
    assert_same_parameters(converted, at_load)
    assert np.array_equal(generate(converted, LATENTS), generate(at_load, LATENTS))
    # low_memory reloads the text encoders quantized (compared on the same low_memory path: its guidance halves run
    # as batch-1 UNet calls, whose 4-bit matrix products may round differently from the batch-2 ones)
    lean = StableDiffusion.from_pretrained(folder, dtype="float32", quantize=bits, low_memory=True)
    converted_lean = StableDiffusion.from_pretrained(out, dtype="float32", low_memory=True)
    for _ in range(2):
        assert np.array_equal(generate(lean, LATENTS), generate(converted_lean, LATENTS))
    with pytest.raises(ModelLoadError, match="already quantized"):
        StableDiffusion.from_pretrained(out, quantize=bits)


def test_quantize_vae(tiny, tmp_path):
    _, folder, _ = tiny("sd1")
    out = convert(folder, tmp_path / "q", dtype="float32", quantize=8, q_group_size=32, quantize_vae=True)
    pipe = StableDiffusion.from_pretrained(out, dtype="float32")
    assert quantized(pipe, "vae") == quantizable(StableDiffusion.from_pretrained(folder, dtype="float32"), "vae", 32)
    assert generate(pipe, LATENTS).std() > 10


def test_existing_output_needs_force(tiny, tmp_path):
    _, folder, _ = tiny("sd1")
    out = tmp_path / "mlx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        convert(folder, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "mlx_sd.json").write_text("{}")  # a folder written by mlx-sd convert: --force replaces it
    convert(folder, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "mlx_sd.json").read_text() != "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["mlx"]
    with pytest.raises(ValueError, match="the model being converted is in it"):
        convert(out, out, force=True)


@pytest.mark.parametrize("exception", [KeyboardInterrupt, MemoryError])
def test_interrupted_conversion_leaves_nothing(tiny, tmp_path, monkeypatch, exception):
    _, folder, _ = tiny("sd1")
    real = convert_module._convert_component
    calls = []

    def fail_on_the_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise exception()
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "_convert_component", fail_on_the_second)
    with pytest.raises(exception):
        convert(folder, tmp_path / "mlx")
    assert list(tmp_path.iterdir()) == []
    # an existing output survives a failed --force conversion untouched
    (tmp_path / "mlx").mkdir()
    (tmp_path / "mlx" / "mlx_sd.json").write_text("old")
    calls.clear()
    with pytest.raises(exception):
        convert(folder, tmp_path / "mlx", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["mlx"] and (tmp_path / "mlx" / "mlx_sd.json").read_text() == "old"


class Payload:
    """Unpickling this creates `marker`: proof that a file was, or was not, unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_checkpoints_are_refused_unread(tiny, tmp_path):
    marker = tmp_path / "unpickled"
    for suffix in (".ckpt", ".bin", ".pt", ".pth", ".CKPT"):
        path = tmp_path / f"model{suffix}"
        path.write_bytes(pickle.dumps(Payload(marker)))
        with pytest.raises(ModelLoadError, match="never unpickles files: use a .safetensors file"):
            convert(path, tmp_path / "mlx")
    assert not marker.exists() and not (tmp_path / "mlx").exists()
    # a diffusers folder holding pickle weights only
    _, folder, _ = tiny("sd1")
    pickled = tmp_path / "pickled"
    for f in folder.rglob("*"):
        if f.is_file():
            target = pickled / f.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            if f.suffix == ".safetensors":
                target = target.with_name(
                    "pytorch_model.bin" if "text_encoder" in str(target) else "diffusion_pytorch_model.bin"
                )
                target.write_bytes(pickle.dumps(Payload(marker)))
            else:
                target.write_bytes(f.read_bytes())
    with pytest.raises(ModelLoadError, match="holds only pickle weights"):
        convert(pickled, tmp_path / "mlx")
    assert not marker.exists() and not (tmp_path / "mlx").exists()


def test_corrupt_and_unrecognised_files(tiny, tmp_path):
    _, _, single = tiny("sd1")
    data = single.read_bytes()
    cases = {
        "truncated.safetensors": (data[: len(data) // 2], "not a valid safetensors file"),
        "garbage.safetensors": (b"\x00" * 64, "not a valid safetensors file"),
        "lora.safetensors": (
            None,
            "not a Stable Diffusion checkpoint in the original LDM layout: expected model.diffusion_model",
        ),
        "notes.txt": (b"hello", "expected a single-file .safetensors checkpoint or a model folder"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is None:
            mx.save_safetensors(str(path), {"lora_unet_down.alpha": mx.zeros((2,))})
        else:
            path.write_bytes(content)
        with pytest.raises((ModelLoadError, ValueError), match=message) as e:
            convert(path, tmp_path / "mlx")
        assert "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="no such file"):
        convert(tmp_path / "missing.safetensors", tmp_path / "mlx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(single, tmp_path / "no" / "mlx")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cases)


def test_hub_sources_download_configs_and_safetensors_only(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    _, folder, single = tiny("sd1")
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    convert("someone/sd-model", tmp_path / "a", dtype="float32")
    convert(single, tmp_path / "b", dtype="float32", config="someone/sd-configs")
    probes = [(repo, p) for repo, p in asked if p == CONTROLNET_PROBE]  # is it a ControlNet? (configs only)
    assert probes == [("someone/sd-model", CONTROLNET_PROBE)]
    (repo, patterns), (config_repo, config_patterns) = [a for a in asked if a[1] != CONTROLNET_PROBE]
    assert repo == "someone/sd-model" and "*/diffusion_pytorch_model.safetensors" in patterns
    assert config_repo == "someone/sd-configs"
    assert all(not p.endswith((".safetensors", ".bin", ".ckpt")) for p in config_patterns)
    assert "*/config.json" in config_patterns and "tokenizer*/*.txt" in config_patterns


def test_peak_memory_stays_within_one_and_a_half_components(tiny, tmp_path):
    """One component at a time, each source tensor freed once converted: the peak is about the largest float32
    component plus its float16 copy (1.5x) since the tiny text encoders are mostly their token embedding; all
    components at once would be over 3x."""
    _, folder, _ = tiny("sdxl")
    sizes = [folder_bytes(folder, name) for name in COMPONENTS]  # float32 source
    assert sum(sizes) > 3 * max(sizes)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    convert(folder, tmp_path / "mlx")
    assert mx.get_peak_memory() - start <= 1.55 * max(sizes)  # measured 1.49x


def test_cli(tiny, tmp_path):
    _, folder, single = tiny("sd1")
    runner = CliRunner()
    result = runner.invoke(convert_command, [str(folder), str(tmp_path / "q"), "-q", "--q-bits", "8"])
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'q'}: sd1 (8-bit, group size 64)" in result.output
    assert json.loads((tmp_path / "q" / "unet" / "config.json").read_text())["quantization"]["bits"] == 8
    result = runner.invoke(convert_command, [str(folder), str(tmp_path / "q")])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("Error: ") and "already exists; pass --force" in result.output
    result = runner.invoke(
        convert_command, [str(folder), str(tmp_path / "c"), "-q", "--q-convs", "--q-group-size", "32"]
    )
    assert result.exit_code == 0 and "(8-bit, group size 32, convolutions quantized)" in result.output, result.output
    assert json.loads((tmp_path / "c" / "unet" / "config.json").read_text())["quantization"]["convolutions"]
    assert any("quantized 8-bit (group 32) with convolutions" in line for line in describe(tmp_path / "c"))
    shutil.rmtree(tmp_path / "c")
    for flag in (["--q-bits", "4"], ["--q-convs"]):
        result = runner.invoke(convert_command, [str(folder), str(tmp_path / "r"), *flag])
        assert result.exit_code == 2 and "need -q/--quantize" in result.output
    result = runner.invoke(convert_command, [str(folder), str(tmp_path / "r"), "--config", str(folder)])
    assert result.exit_code == 1 and "applies to single-file checkpoints only" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_float16_weights_compute_in_float32_on_the_cpu(tiny, tmp_path, monkeypatch):
    """On MLX's CPU backend a float16 model keeps float16 weights at rest, the VAE's too (force_upcast: float32
    at rest elsewhere), and runs its activations in float32 (activations.compute_dtype): the image of the float32
    model with the same float16-rounded weights."""
    _, folder, _ = tiny("sd1")
    out = convert(folder, tmp_path / "mlx")
    half = StableDiffusion.from_pretrained(out, dtype="float16")
    full = StableDiffusion.from_pretrained(out, dtype="float32")
    assert half.compute_dtype == mx.float32 and half.unet.conv_in.weight.dtype == mx.float16
    for name in ("unet", "vae", "text_encoder"):
        assert {v.dtype for _, v in tree_flatten(getattr(half, name).parameters())} == {mx.float16}, name
    assert vae_dtype(mx.float16) == mx.float16
    monkeypatch.setattr("mlx_sd.loading.compute_dtype", lambda dtype: dtype)  # a GPU: float16 arithmetic
    assert vae_dtype(mx.float16) == mx.float32 and vae_dtype(mx.float16, force_upcast=False) == mx.float16
    assert vae_dtype(mx.bfloat16) == mx.bfloat16
    monkeypatch.undo()
    a, b = generate(half, LATENTS), generate(full, LATENTS)
    assert np.array_equal(a, b)  # each layer's weights promoted to float32: the same arithmetic
    c = half.encode_prompt(["a"], [""], 1.0)
    assert c.embeds.dtype == mx.float32 and half.predict(LATENTS, mx.array([1.0]), c).dtype == mx.float32


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_linear_dequantizes_on_the_cpu(bits):
    """quantize_model's Linear layers multiply float32 inputs by their dequantized weight on the CPU backend (MLX's
    CPU quantized_matmul runs at ~2 GFLOP/s, and in float16 with float16 scales): the float64 product of the
    dequantized weight within float32 rounding (measured 9e-7), quantized_matmul's within float16's (9e-4)."""
    model = nn.Sequential(nn.Linear(128, 96), nn.Linear(96, 64, bias=False))
    model.set_dtype(mx.float16)
    quantize_model(model, bits, 32)
    assert all(type(layer) is QuantizedLinear for layer in model.layers)
    x = mx.random.normal((3, 128), key=mx.random.key(bits))
    for layer in model.layers:
        got = layer(x)
        assert got.dtype == mx.float32
        scales, biases = layer.scales.astype(mx.float32), layer.biases.astype(mx.float32)
        w = mx.dequantize(layer.weight, scales, biases, 32, bits)  # the quantized values, exactly
        exact = np.array(x, np.float64) @ np.array(w, np.float64).T
        exact += np.array(layer.bias, np.float64) if "bias" in layer else 0
        np.testing.assert_allclose(np.array(got), exact, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.array(got), np.array(nn.QuantizedLinear.__call__(layer, x)), rtol=0, atol=5e-3)
        x = got

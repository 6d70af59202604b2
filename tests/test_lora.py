"""LoRA files in every key layout, applied by mlx_sd and by diffusers + peft to the same tiny random pipelines.

Tolerance (float32, same initial latents): final 8-bit images within 0.5/255 mean and 2/255 max absolute difference
(helpers.assert_images_close). Each LoRA changes the image by far more than that (asserted), so that the parity means
something. LoHa and LoKr, which diffusers cannot load, are compared with diffusers running on weights merged in numpy by
the reference formulas. Scale changes and unloading must give back bit-identical outputs.
"""

import copy
import hashlib
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_unflatten
from PIL import Image
from safetensors.torch import save_file

from helpers import SD15, SDXL, assert_images_close, make_pipeline, real_config, run_both
from mlx_sd import StableDiffusion
from mlx_sd.adapter_files import describe_adapter, embedding_hash, extract_lora_tags, find_lora, lora_hash
from mlx_sd.lora import bake_loras
from mlx_sd.lora_keys import ldm_unet_paths
from mlx_sd.lora_layers import LoRABranch, layer_table
from mlx_sd.pipeline import Freed
from mlx_sd.quantize import QuantizedConv2d, quantize_model
from mlx_sd.single_file import _unet
from mlx_sd.unet import UNet2DConditionModel, UNetConfig
from mlx_sd.weights import ModelLoadError

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
RESNET = ("conv1", "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
FIXED = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_2")
SIZE = dict(negative_prompt="", sampler="euler", width=48, height=48, steps=3, guidance_scale=5.0)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """family -> (diffusers pipeline, mlx_sd pipeline); tests leave both without LoRAs."""
    cache, folders = {}, {}

    def get(family):
        if family not in cache:
            folder = folders[family] = tmp_path_factory.mktemp(family)
            reference = make_pipeline(family, folder)
            cache[family] = (reference, StableDiffusion.from_pretrained(folder, dtype="float32"))
        return cache[family]

    get.folders = folders
    yield get
    for reference, ours in cache.values():
        reference.unload_lora_weights()
        ours.unload_lora()


# --- LoRA files with random weights ------------------------------------------------------------------------------


def unet_layers(unet, convs=True):
    """(diffusers module path, torch module) of the UNet layers a LoRA trains: the transformer blocks' and, with
    convs (LoCon), the resnets', samplers', time embeddings' and the first and last convolutions."""
    layers = []
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if ".attentions." in name and name.endswith(ATTENTION) or convs and (name.endswith(RESNET) or name in FIXED):
            layers.append((name, module))
    return layers


def text_layers(encoder):
    """(path with the `text_model.` prefix that LoRA files use, module) of a CLIP text encoder's Linear layers."""
    return [
        ("text_model." + n.removeprefix("text_model."), m)
        for n, m in encoder.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n
    ]


def factors(module, rank, gen, strength):
    """Random (down, up) in PyTorch layout: a 3x3 conv gets a 3x3 down kernel and a 1x1 up kernel (LoCon)."""
    if isinstance(module, torch.nn.Conv2d):
        o, i, kh, kw = module.weight.shape
        down = torch.randn(rank, i, kh, kw, generator=gen) / (i * kh * kw) ** 0.5
        up = torch.randn(o, rank, 1, 1, generator=gen) * strength
    else:
        o, i = module.weight.shape
        down = torch.randn(rank, i, generator=gen) / i**0.5
        up = torch.randn(o, rank, generator=gen) * strength
    return down, up


def kohya_file(path, reference, rank=4, alpha=2.0, strength=0.6, seed=0, ldm=False, text=True, convs=True, unet=True):
    """A Kohya / A1111 LoRA (LoCon with convs): lora_unet_* (diffusers or LDM block names), lora_te*_*."""
    gen = torch.Generator().manual_seed(seed)
    layers = [("lora_unet_", n, m) for n, m in unet_layers(reference.unet, convs)] if unet else []
    if ldm:
        ldm_names = ldm_unet_paths([n for _, n, _ in layers])
        layers = [(p, ldm_names[n], m) for p, n, m in layers]
    if text:
        two = hasattr(reference, "text_encoder_2")
        layers += [("lora_te1_" if two else "lora_te_", n, m) for n, m in text_layers(reference.text_encoder)]
        if two:
            layers += [("lora_te2_", n, m) for n, m in text_layers(reference.text_encoder_2)]
    tensors = {}
    for prefix, name, module in layers:
        key = prefix + name.replace(".", "_")
        down, up = factors(module, rank, gen, strength)
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
    save_file(tensors, path)
    return path


def peft_file(path, reference, rank=4, strength=0.5, seed=1, text=True):
    """A diffusers / PEFT LoRA: unet.<path>.lora_A.weight / lora_B.weight, text_encoder.<path>... (no alpha)."""
    gen = torch.Generator().manual_seed(seed)
    layers = [(f"unet.{n}", m) for n, m in unet_layers(reference.unet, convs=False)]
    if text:
        layers += [(f"text_encoder.{n}", m) for n, m in text_layers(reference.text_encoder)]
    tensors = {}
    for name, module in layers:
        down, up = factors(module, rank, gen, strength)
        tensors |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    save_file(tensors, path)
    return path


def old_diffusers_file(path, reference, rank=4, strength=0.6, seed=2):
    """The older diffusers attention-processor layout: unet.<block>.attn1.processor.to_q_lora.down.weight."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet_layers(reference.unet, convs=False):
        head, _, last = name.removesuffix(".0").rpartition(".")
        if last not in ("to_q", "to_k", "to_v", "to_out"):
            continue
        down, up = factors(module, rank, gen, strength)
        key = f"unet.{head}.processor.{last}_lora"
        tensors |= {f"{key}.down.weight": down, f"{key}.up.weight": up}
    save_file(tensors, path)
    return path


def generate(ours):
    """mlx_sd's image for fixed latents, as uint8 -> float64."""
    latents = mx.array(np.random.default_rng(7).standard_normal((1, 6, 6, 4)).astype(np.float32))
    images = ours.generate("a photo of an astronaut riding a horse", seed=0, latents=latents, **SIZE)
    return np.asarray(images[0], np.float64)


def run(reference, ours):
    return run_both(reference, ours, "euler", 48, 48, 3, 5.0, prompt="a photo of an astronaut riding a horse")


def assert_changed(images, plain):
    """The LoRA moves the image by far more than the parity tolerance."""
    change = np.abs(images - plain)
    print(f"LoRA changes the image by mean {change.mean():.2f}/255, max {change.max():.0f}/255")
    assert change.mean() > 3 and change.max() > 30


# --- parity with diffusers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,layout",
    [("sd1", "kohya"), ("sdxl", "kohya_ldm"), ("sd2v", "peft"), ("sd1", "old_diffusers"), ("sdxl", "peft")],
)
def test_layouts_match_diffusers(pipelines, tmp_path, family, layout):
    reference, ours = pipelines(family)
    plain, _ = run(reference, ours)
    path = tmp_path / "style.safetensors"
    if layout.startswith("kohya"):
        kohya_file(path, reference, ldm=layout == "kohya_ldm")
    elif layout == "peft":
        peft_file(path, reference)
    else:
        old_diffusers_file(path, reference)
    reference.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="style")
    reference.set_adapters(["style"], adapter_weights=[0.8])
    assert ours.load_lora(path, scale=0.8) == "style"
    try:
        images, expected = run(reference, ours)
        assert_images_close(images, expected)
        assert_changed(images, plain)
    finally:
        reference.unload_lora_weights()
        ours.unload_lora()


def test_two_loras_at_their_own_scales_match_diffusers(pipelines, tmp_path):
    reference, ours = pipelines("sd1")
    kohya_file(tmp_path / "a.safetensors", reference, strength=0.4)
    peft_file(tmp_path / "b.safetensors", reference, strength=0.4)
    for name in "ab":
        reference.load_lora_weights(str(tmp_path), weight_name=f"{name}.safetensors", adapter_name=name)
        ours.load_lora(tmp_path / f"{name}.safetensors")
    reference.set_adapters(["a", "b"], adapter_weights=[0.7, -0.5])
    ours.set_lora_scale("a", 0.7)
    ours.set_lora_scale("b", -0.5)
    assert ours.loras == {"a": 0.7, "b": -0.5}
    try:
        assert_images_close(*run(reference, ours))
    finally:
        reference.unload_lora_weights()
        ours.unload_lora()


def test_fused_lora_matches_diffusers(pipelines, tmp_path):
    reference, ours = pipelines("sdxl")
    kohya_file(tmp_path / "fused.safetensors", reference, ldm=True, seed=3)
    reference.load_lora_weights(str(tmp_path), weight_name="fused.safetensors", adapter_name="fused")
    reference.fuse_lora(lora_scale=0.6)
    ours.load_lora(tmp_path / "fused.safetensors", scale=0.6)
    try:
        assert_images_close(*run(reference, ours))
    finally:
        reference.unfuse_lora()
        reference.unload_lora_weights()
        ours.unload_lora()


# --- LyCORIS LoHa / LoKr and full deltas: diffusers on weights merged in numpy ------------------------------------


def lycoris_file(path, reference, seed=4):
    """LoHa on attention layers (and with Tucker cores on 3x3 convs), LoKr on feed-forward and resnet convs, full
    deltas (diff + diff_b) on time-embedding projections. Returns the file and {module path: (dW, db)} by the
    reference formulas (../shared/reference/adapters-and-apis.md), computed in numpy."""
    rng = np.random.default_rng(seed)
    tensors, merged = {}, {}

    def rand(*shape, std=1.0):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    for name, module in unet_layers(reference.unet):
        w = module.weight.detach().numpy()
        out, inner = w.shape[0], w[0].size
        key, alpha, db = "lora_unet_" + name.replace(".", "_"), 3.0, None
        if name.endswith(("to_q", "to_v", "proj_out")) or (name.endswith("conv2") and w.ndim == 4):
            r = 4
            if w.ndim == 4 and w.shape[2] == 3:  # Tucker: factors (r, out), (r, in), core (r, r, kh, kw)
                f = {n: rand(r, d, std=0.5) for n, d in (("w1_a", out), ("w1_b", w.shape[1]), ("w2_a", out))}
                f["w2_b"], f["t1"], f["t2"] = rand(r, w.shape[1], std=0.5), rand(r, r, 3, 3, std=0.3), rand(r, r, 3, 3)
                cp = lambda t, a, b: np.einsum("ijkl,jr,ip->prkl", t, b, a)  # noqa: E731  LyCORIS make_weight_cp
                dw = cp(f["t1"], f["w1_a"], f["w1_b"]) * cp(f["t2"], f["w2_a"], f["w2_b"])
            else:
                f = {
                    "w1_a": rand(out, r),
                    "w1_b": rand(r, inner, std=0.3),
                    "w2_a": rand(out, r),
                    "w2_b": rand(r, inner),
                }
                dw = (f["w1_a"] @ f["w1_b"]) * (f["w2_a"] @ f["w2_b"])
            tensors |= {f"{key}.hada_{n}": v for n, v in f.items()}
            dw = dw * alpha / r
        elif name.endswith(("ff.net.2", "conv1")):
            r, (a, c) = 2, (2, out // 2)
            w1 = rand(a, 2 if w.shape[1] % 2 == 0 else 1, std=0.5)
            d = w.shape[1] // w1.shape[1]
            w2a, w2b = rand(c, r), rand(r, d * int(np.prod(w.shape[2:])), std=0.3)
            tensors |= {f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b}
            dw = np.kron(w1, w2a @ w2b) * alpha / r  # (a c, b d kh kw): the (out, in, kh, kw) order of torch
        elif name.endswith("time_emb_proj"):
            dw, db, alpha = rand(*w.shape, std=0.05), rand(out, std=0.2), None
            tensors |= {f"{key}.diff": dw, f"{key}.diff_b": db}
        else:
            continue
        if alpha is not None:
            tensors[f"{key}.alpha"] = np.float32(alpha)
        merged[name] = (dw.reshape(w.shape), db)
    save_file({k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()}, path)
    return path, merged


def merged_reference(reference, merged, scale):
    """A copy of the diffusers pipeline with scale * (dW, db) added to its UNet layers."""
    copy_ = copy.deepcopy(reference)
    modules = dict(copy_.unet.named_modules())
    with torch.no_grad():
        for name, (dw, db) in merged.items():
            modules[name].weight += scale * torch.from_numpy(dw)
            if db is not None:
                modules[name].bias += scale * torch.from_numpy(db)
    return copy_


def test_loha_lokr_and_full_deltas_match_numpy_merge(pipelines, tmp_path):
    reference, ours = pipelines("sd1")
    plain = generate(ours)
    path, merged = lycoris_file(tmp_path / "lyco.safetensors", reference)
    kinds = {m.split(".")[-1].split("_")[0] for m in mx.load(str(path))}
    assert {"hada", "lokr", "diff", "alpha"} <= kinds
    ours.load_lora(path, scale=0.9)
    try:
        images, expected = run(merged_reference(reference, merged, 0.9), ours)
        assert_images_close(images, expected)
        assert_changed(images, plain)
    finally:
        ours.unload_lora()


# --- exact restoring, quantized layers, low memory ---------------------------------------------------------------


def parameters(ours):
    """Every UNet and text-encoder parameter, as numpy."""
    trees = {"unet": ours.unet.parameters(), "text_encoder": ours.text_encoder.parameters()}
    return {f"{c}.{k}": np.array(v) for c, tree in trees.items() for k, v in tree_flatten(tree)}


def test_scale_changes_and_unloading_are_exact(pipelines, tmp_path):
    """Bit-identical outputs: a scale set back, a LoRA turned off or unloaded, all LoRAs unloaded."""
    reference, ours = pipelines("sd1")
    original, plain = parameters(ours), generate(ours)
    kohya_file(tmp_path / "a.safetensors", reference, strength=0.4)
    lycoris_file(tmp_path / "b.safetensors", reference)
    ours.load_lora(tmp_path / "b.safetensors", scale=0.5)
    only_b = generate(ours)
    ours.load_lora(tmp_path / "a.safetensors", scale=0.7)
    both = generate(ours)
    assert_changed(both, only_b)
    ours.set_lora_scale("a", -0.3)
    assert not np.array_equal(generate(ours), both)
    ours.set_lora_scale("a", 0.7)
    assert np.array_equal(generate(ours), both)
    ours.set_lora_scale("a", 0)
    assert np.array_equal(generate(ours), only_b)
    ours.unload_lora("a")
    assert np.array_equal(generate(ours), only_b)
    ours.load_lora(tmp_path / "a.safetensors", scale=0.7)
    ours.unload_lora()
    assert ours.loras == {}
    after = parameters(ours)
    assert after.keys() == original.keys() and all(np.array_equal(after[k], original[k]) for k in original)
    assert np.array_equal(generate(ours), plain)


def dequantized(model):
    """A float copy of a quantized model: each quantized layer replaced by a float one with its dequantized weights."""
    replacements = []
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, QuantizedConv2d)):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
            if isinstance(m, nn.QuantizedLinear):
                layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            else:
                o, kh, kw, i = m.kernel_shape
                layer = nn.Conv2d(i, o, (kh, kw), m.stride, m.padding, bias="bias" in m)
                w = w.reshape(m.kernel_shape)
            layer.weight = w
            if "bias" in m:
                layer.bias = m.bias
            replacements.append((path, layer))
    model.update_modules(tree_unflatten(replacements))
    return model


def test_quantized_layers_get_a_branch(pipelines, tmp_path):
    """8-bit UNet (with convolutions) and text encoder: the LoRA runs beside the quantized layers (LoRA and LoHa /
    LoKr / full deltas), equal to a float model holding the dequantized weights with the LoRA merged; unloading puts
    the very same quantized layers back."""
    reference, ours = pipelines("sd1")
    folder = pipelines.folders["sd1"]
    kohya_file(tmp_path / "a.safetensors", reference, strength=0.4)
    lycoris_file(tmp_path / "b.safetensors", reference)
    quantized, floats = (StableDiffusion.from_pretrained(folder, dtype="float32") for _ in range(2))
    for pipe in (quantized, floats):
        for model in (pipe.unet, pipe.text_encoder):
            quantize_model(model, 8, 32, convolutions=True)
    dequantized(floats.unet), dequantized(floats.text_encoder)
    layers = dict(quantized.unet.named_modules())
    plain = generate(quantized)
    for pipe in (quantized, floats, ours):
        pipe.load_lora(tmp_path / "a.safetensors", scale=0.8)
        pipe.load_lora(tmp_path / "b.safetensors", scale=0.5)
    try:
        branched = dict(quantized.unet.named_modules())
        attention = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        assert isinstance(branched[attention], LoRABranch) and branched[attention].base is layers[attention]
        images = generate(quantized)
        assert_images_close(images, generate(floats))
        assert_changed(images, plain)
        change = np.abs(images - generate(ours))
        print(f"8-bit + LoRA branch vs float + merged LoRA: mean {change.mean():.2f}/255, max {change.max():.0f}/255")
        quantized.unload_lora()
        assert all(m is layers[p] for p, m in quantized.unet.named_modules())
        assert np.array_equal(generate(quantized), plain)
    finally:
        ours.unload_lora()


@pytest.mark.parametrize("component", ["text_encoder", "unet"])
def test_low_memory_reapplies_loras(pipelines, tmp_path, component):
    """low_memory frees each model after its phase and reads it again for the next generation: the LoRA is applied
    to each new copy (and the freed copy's original weights are not kept)."""
    reference, ours = pipelines("sd1")
    folder = pipelines.folders["sd1"]
    unet = component == "unet"
    kohya_file(tmp_path / "lora.safetensors", reference, unet=unet, text=not unet, strength=2.0)
    low = StableDiffusion.from_pretrained(folder, dtype="float32", low_memory=True)
    plain = generate(low)
    low.load_lora(tmp_path / "lora.safetensors", scale=0.9)
    ours.load_lora(tmp_path / "lora.safetensors", scale=0.9)
    try:
        first = generate(low)
        assert isinstance(getattr(low, component), Freed) and component not in low.adapters._attached
        assert np.array_equal(generate(low), first)
        assert_changed(first, plain)
        assert_images_close(first, generate(ours))
    finally:
        ours.unload_lora()


# --- bad input ----------------------------------------------------------------------------------------------------


def small_kohya(path, extra=None, layers=("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",)):
    """A Kohya file for the tiny SD 1.x UNet's 32-wide attention layers, plus `extra` tensors."""
    tensors = {}
    for name in layers:
        tensors |= {
            f"lora_unet_{name}.lora_down.weight": torch.ones(2, 32),
            f"lora_unet_{name}.lora_up.weight": torch.ones(32, 2),
        }
    save_file(tensors | (extra or {}), path)
    return path


BAD_FILES = [
    # (what, extra tensors, error)
    (
        "a layer the model lacks",
        {
            "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.ones(2, 32),
            "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.ones(32, 2),
        },
        r"1 of its 2 layers match no layer of the SD 1.x model: lora_unet_down_blocks_7_attentions_0_proj_in",
    ),
    (
        "a shape mismatch",
        {
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(2, 99),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.ones(32, 2),
        },
        r"attn2_to_k changes a weight of 32 x 99, but unet.down_blocks.0.*attn2.to_k is 32 x 32",
    ),
    (
        "an SDXL text encoder",
        {
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 32),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(37, 2),
        },
        r"is an SDXL LoRA; this model is SD 1.x",
    ),
    (
        "DoRA",
        {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale": torch.ones(32, 1)},
        r"is a DoRA .* not support",
    ),
    ("OFT", {"lora_unet_x.oft_blocks": torch.ones(2, 16, 16)}, r"1 OFT layers, which mlx_sd does not support"),
    ("an unknown key", {"something.else": torch.ones(1)}, r"1 keys of no known LoRA layout: something.else"),
    (
        "half a layer",
        {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3)},
        r"incomplete or unknown LoRA layer lora_unet_conv_in: it has down",
    ),
    (
        "factors that do not fit",
        {
            "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
            "lora_unet_conv_in.lora_up.weight": torch.ones(32, 3, 1, 1),
        },
        r"the factors of lora_unet_conv_in do not fit",
    ),
]


@pytest.mark.parametrize("what,extra,error", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_lora_files_are_one_line_errors(pipelines, tmp_path, what, extra, error):
    _, ours = pipelines("sd1")
    before = parameters(ours)
    with pytest.raises(ModelLoadError, match=error) as info:
        ours.load_lora(small_kohya(tmp_path / "bad.safetensors", extra))
    assert "\n" not in str(info.value) and ours.loras == {}
    after = parameters(ours)
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_unreadable_files_scales_and_names(pipelines, tmp_path):
    _, ours = pipelines("sd1")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelLoadError, match="corrupt.safetensors: not a valid safetensors file"):
        ours.load_lora(tmp_path / "corrupt.safetensors")
    (tmp_path / "style.pt").write_bytes(b"not even a pickle")
    with pytest.raises(ModelLoadError, match="pickle checkpoint; mlx_sd never unpickles"):
        ours.load_lora(tmp_path / "style.pt")
    with pytest.raises(ModelLoadError, match="no LoRA file"):
        ours.load_lora(tmp_path / "missing.safetensors")
    good = small_kohya(tmp_path / "good.safetensors")
    for scale in (float("nan"), float("inf"), 10.5, "strong", None):
        with pytest.raises(ValueError, match="LoRA scale must be"):
            ours.load_lora(good, scale=scale)
    ours.load_lora(good, scale=-10)
    try:
        with pytest.raises(ValueError, match="already loaded"):
            ours.load_lora(good)
        with pytest.raises(ValueError, match=r"no LoRA named 'other' is loaded \(loaded: good\)"):
            ours.set_lora_scale("other", 1.0)
        with pytest.raises(ValueError, match="finite"):
            ours.set_lora_scale("good", float("nan"))
        assert ours.loras == {"good": -10.0}
    finally:
        ours.unload_lora()


# --- prompt tags, LoRA folders, hashes, descriptions, baking ------------------------------------------------------


def test_extract_lora_tags():
    prompt, loras = extract_lora_tags("a castle <lora:ghibli_style:0.8>, at dusk <lora:LCM-LoRA> <lyco:detail: -1.5 >")
    assert prompt == "a castle , at dusk  "
    assert loras == [("ghibli_style", 0.8), ("LCM-LoRA", 1.0), ("detail", -1.5)]
    assert extract_lora_tags("no tags (here:1.2)") == ("no tags (here:1.2)", [])
    for bad, error in [
        ("<lora:../secret:1>", "invalid LoRA name"),
        ("<lora:sub/dir>", "invalid LoRA name"),
        ("<lora::1>", "invalid LoRA name"),
        ("<lora:x:nan>", "finite"),
        ("<lora:x:11>", "between -10 and 10"),
        ("<lora:x:1:0.5>", "unsupported LoRA tag"),
        ("<lora:x> <lora:x:0.5>", "named twice"),
        (" ".join(f"<lora:l{i}>" for i in range(17)), "more than 16"),
    ]:
        with pytest.raises(ValueError, match=error):
            extract_lora_tags(bad)


def test_find_lora(tmp_path):
    path = small_kohya(tmp_path / "style.safetensors")
    assert find_lora("style", tmp_path) == path
    with pytest.raises(ModelLoadError, match=r"no LoRA 'other': .*other.safetensors does not exist"):
        find_lora("other", tmp_path)
    (tmp_path / "old.pt").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="old.pt is a pickle file"):
        find_lora("old", tmp_path)
    with pytest.raises(ModelLoadError, match="LoRA folder .*nowhere does not exist"):
        find_lora("style", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="invalid LoRA name"):
        find_lora("../style", tmp_path / "sub")


def test_hashes_follow_a1111(tmp_path):
    """LoRA: sha256 of what follows the safetensors header (kohya's addnet hash); embedding: of the whole file."""
    path = small_kohya(tmp_path / "style.safetensors")
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert lora_hash(path) == hashlib.sha256(data[8 + n :]).hexdigest()[:12]
    assert embedding_hash(path) == hashlib.sha256(data).hexdigest()[:12]
    save_file({"x.lora_down.weight": torch.ones(2, 32)}, tmp_path / "meta.safetensors", metadata={"note": "x" * 50})
    assert lora_hash(tmp_path / "meta.safetensors") != embedding_hash(tmp_path / "meta.safetensors")[:12]
    (tmp_path / "short.safetensors").write_bytes(b"\xff" * 12)
    with pytest.raises(ModelLoadError, match="header is cut off"):
        lora_hash(tmp_path / "short.safetensors")


def test_describe_adapter(pipelines, tmp_path):
    reference, _ = pipelines("sd1")
    kohya_file(tmp_path / "locon.safetensors", reference, rank=4, alpha=2.0)
    lines = describe_adapter(tmp_path / "locon.safetensors")
    n_unet, n_text = len(unet_layers(reference.unet)), len(text_layers(reference.text_encoder))
    convs = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1 for _, m in unet_layers(reference.unet))
    assert lines == [
        f"format: Kohya / A1111 LoCon ({n_unet + n_text})",
        "family: unknown",
        f"layers: {n_unet + n_text} (text_encoder {n_text}, unet {n_unet}), {convs} with 3x3 or larger convolution "
        "kernels",
        "rank: 4",
        "alpha: 2",
    ]
    path, _ = lycoris_file(tmp_path / "lyco.safetensors", reference)
    assert all(f"{kind} (" in describe_adapter(path)[0] for kind in ("LoHa", "LoKr", "full deltas"))
    save_file(
        {
            "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(8, 768),
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(320, 8),
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.ones(16, 2048),
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.ones(1280, 16),
        },
        tmp_path / "xl.safetensors",
    )
    assert describe_adapter(tmp_path / "xl.safetensors") == [
        "format: diffusers / PEFT LoRA (2)",
        "family: SDXL",
        "layers: 2 (unet 2)",
        "rank: 8 to 16",
        "alpha: none (scale 1)",
    ]
    with pytest.raises(ModelLoadError, match="not a textual-inversion embedding"):
        describe_adapter(small_kohya(tmp_path / "odd.safetensors", {"odd": torch.ones(1), "more": torch.ones(1)}))


def test_bake_loras_equals_the_merged_lora(pipelines, tmp_path):
    reference, ours = pipelines("sd1")
    folder = pipelines.folders["sd1"]
    kohya_file(tmp_path / "a.safetensors", reference)
    lycoris_file(tmp_path / "b.safetensors", reference)
    loras = [(tmp_path / "a.safetensors", 0.8), (tmp_path / "b.safetensors", -0.4)]
    baked = StableDiffusion.from_pretrained(folder, dtype="float32")
    original = parameters(baked)
    bake_loras({"unet": baked.unet, "text_encoder": baked.text_encoder}, loras, "sd1")
    ours.load_lora(loras[0][0], 0.8)
    merged_a = parameters(ours)
    ours.unload_lora()
    changed = [k for k in original if not np.array_equal(merged_a[k], original[k])]
    assert len(changed) > 50
    ours.load_lora(loras[0][0], 0.8)
    ours.load_lora(loras[1][0], -0.4)
    try:
        merged, result = parameters(ours), parameters(baked)
        assert all(np.allclose(result[k], merged[k], rtol=1e-6, atol=1e-6) for k in merged)
    finally:
        ours.unload_lora()
    quantize_model(baked.unet, 8, 32)
    with pytest.raises(ValueError, match="cannot bake a LoRA into the quantized layer"):
        bake_loras({"unet": baked.unet, "text_encoder": baked.text_encoder}, loras[:1])


@pytest.mark.parametrize("model", [SD15, SDXL])
def test_ldm_block_names_invert_single_file_mapping(model):
    """Kohya SDXL files name UNet layers by LDM blocks: our diffusers -> LDM names are what single_file.py (the LDM
    checkpoint loader) maps back, for every layer of the real UNets."""
    unet = UNet2DConditionModel(UNetConfig.from_dict(real_config(model, "unet")))  # lazy: no weights evaluated
    paths = list(layer_table(unet))
    ldm = ldm_unet_paths(paths)
    assert len(ldm) == len(paths)
    family = "sdxl" if model == SDXL else "sd1"
    renamed, unknown = _unet({f"{ldm[p]}.weight": p for p in paths}, family)
    assert unknown == [] and all(renamed[f"{p}.weight"] == p for p in paths)


def test_peft_adapter_metadata_sets_alpha(pipelines, tmp_path):
    """diffusers writes the PEFT LoraConfig (r, lora_alpha, alpha_pattern) into the file's metadata: scale alpha / r."""
    reference, ours = pipelines("sd1")
    path = peft_file(tmp_path / "meta.safetensors", reference, text=False, strength=0.3)
    tensors = mx.load(str(path))
    targets = sorted({k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in tensors})
    attn1 = [t for t in targets if t.endswith("attn1.to_q")][0]
    config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {f"^{attn1}": 2}, "target_modules": targets}
    metadata = {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()})}
    mx.save_safetensors(str(path), tensors, metadata=metadata)
    reference.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="meta")
    ours.load_lora(path)
    try:
        assert_images_close(*run(reference, ours))
        patches = ours.adapters.loras["meta"].patches
        assert patches[("unet", attn1)].scale == 0.5 and {p.scale for p in patches.values()} == {0.5, 2.0}
    finally:
        reference.unload_lora_weights()
        ours.unload_lora()


# --- command line, prompt tags, infotext, convert --lora, info ----------------------------------------------------


def cli_run(*args):
    from click.testing import CliRunner

    from mlx_sd.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_lora_options_tags_and_embeddings_equal_the_api(pipelines, tmp_path):
    """--lora PATH:SCALE, a <lora:NAME:W> tag with --lora-dir, and an embedding named in the prompt (from
    --embeddings-dir) give the API's images; the PNG keeps the tag and carries A1111's Lora / TI hashes, and
    --from-png with the same folders gives the same image."""
    from mlx_sd.adapter_files import embedding_hash, lora_hash

    reference, ours = pipelines("sd1")
    folder = pipelines.folders["sd1"]
    loras, embeddings = tmp_path / "loras", tmp_path / "embeddings"
    loras.mkdir()
    embeddings.mkdir()
    style = kohya_file(loras / "style.safetensors", reference)
    dim = ours.text_encoder.config.hidden_size
    save_file(
        {"emb_params": torch.randn(2, dim, generator=torch.Generator().manual_seed(3))}, embeddings / "mood.safetensors"
    )
    common = ["--model", folder, "--dtype", "float32", "-W", 48, "-H", 48, "--steps", 2, "--seed", 3]
    dirs = ["--lora-dir", loras, "--embeddings-dir", embeddings]

    result = cli_run("generate", "a castle, mood", *common, "--lora", f"{style}:0.7", *dirs, "-o", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    ours.load_lora(style, 0.7)
    ours.load_textual_inversion(embeddings / "mood.safetensors")
    try:
        expected = ours.generate("a castle, mood", width=48, height=48, steps=2, seed=3)
    finally:
        ours.unload_lora()
        ours.unload_textual_inversion()
    written = Image.open(tmp_path / "a.png")
    assert np.array_equal(np.asarray(written), np.asarray(expected[0]))
    text = written.text["parameters"]
    assert f'Lora hashes: "style: {lora_hash(style)}"' in text
    assert f'TI hashes: "mood: {embedding_hash(embeddings / "mood.safetensors")}"' in text

    result = cli_run("generate", "a castle <lora:style:0.7>, mood", *common, *dirs, "-o", tmp_path / "b.png")
    assert result.exit_code == 0, result.output
    tagged = Image.open(tmp_path / "b.png")
    assert np.array_equal(np.asarray(tagged), np.asarray(written))  # the tag is the same LoRA at the same scale
    assert tagged.text["parameters"].startswith("a castle <lora:style:0.7>, mood\n")
    result = cli_run("generate", "--from-png", tmp_path / "b.png", "--model", folder, "--dtype", "float32", *dirs,
                     "-o", tmp_path / "c.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(tagged))


@pytest.mark.parametrize(
    "extra,code,message",
    [
        (["--lora", "x.safetensors:nan"], 2, "LoRA scale must be a finite number"),
        (["--lora", "x.safetensors:11"], 2, "LoRA scale must be a finite number between -10 and 10"),
        (["<lora:missing:0.5>"], 1, "no LoRA 'missing'"),
        (["<lora:../up:1>"], 2, "invalid LoRA name '../up'"),
        (["<lora:a:1:2>"], 2, "unsupported LoRA tag '<lora:a:1:2>'"),
        (["--lora", "LORADIR/notes.txt"], 1, "notes.txt"),
    ],
)
def test_cli_lora_errors_are_one_line(pipelines, tmp_path, extra, code, message):
    pipelines("sd1")
    folder = pipelines.folders["sd1"]
    (tmp_path / "notes.txt").write_text("not a LoRA")
    prompt = "a castle " + (extra[0] if extra[0].startswith("<") else "")
    options = [] if extra[0].startswith("<") else [a.replace("LORADIR", str(tmp_path)) for a in extra]
    args = ["generate", prompt, "--model", folder, "--dtype", "float32", "--lora-dir", tmp_path, *options]
    result = cli_run(*args, "-o", tmp_path / "out.png")
    assert result.exit_code == code and message in result.output, result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "out.png").exists()


def test_convert_bakes_loras_before_quantizing(pipelines, tmp_path):
    """`mlx-sd convert --lora PATH:SCALE`: the converted model's image equals the source with the LoRA loaded,
    and its manifest records the file, scale and hash."""
    from mlx_sd.adapter_files import lora_hash
    from mlx_sd.convert import convert_command

    reference, ours = pipelines("sd1")
    style = kohya_file(tmp_path / "style.safetensors", reference)
    args = [pipelines.folders["sd1"], tmp_path / "baked", "--dtype", "float32", "--lora", f"{style}:0.6"]
    from click.testing import CliRunner

    result = CliRunner().invoke(convert_command, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "baked" / "mlx_sd.json").read_text())
    assert manifest["loras"] == [{"file": "style.safetensors", "scale": 0.6, "hash": lora_hash(style)}]
    baked = generate(StableDiffusion.from_pretrained(tmp_path / "baked", dtype="float32"))
    ours.load_lora(style, 0.6)
    try:
        merged = generate(ours)
    finally:
        ours.unload_lora()
    assert np.abs(baked - merged).max() <= 1  # the same merge; float32 rounding of the saved weights at most
    assert_changed(baked, generate(ours))


def test_info_describes_a_lora(pipelines, tmp_path):
    from mlx_sd.info import describe

    reference, _ = pipelines("sd1")
    path = kohya_file(tmp_path / "style.safetensors", reference)
    lines = describe(path)
    assert lines[0] == f"{path}:" and lines[1] == "  format: Kohya / A1111 LoCon (101)"
    assert "  rank: 4" in lines and "  alpha: 2" in lines

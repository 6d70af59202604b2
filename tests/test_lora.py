"""LoRA files in every key layout, applied by mlx_sd and by diffusers + peft to the same tiny random pipelines.

Tolerance (float32, same initial latents): final 8-bit images within 0.5/255 mean and 2/255 max absolute difference
(helpers.assert_images_close). Each LoRA changes the image by far more than that (asserted), so that the parity means
something. LoHa and LoKr, which diffusers cannot load, are compared with diffusers running on weights merged in numpy by
the reference formulas. Scale changes and unloading must give back bit-identical outputs.
"""


import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import assert_images_close, make_pipeline, run_both
from mlx_sd import StableDiffusion
from mlx_sd.lora_formats import _ldm_unet_paths

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
RESNET = ("conv1", "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
FIXED = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_2")
SIZE = dict(sampler="euler", width=48, height=48, steps=3, guidance_scale=5.0)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """family -> (diffusers pipeline, mlx_sd pipeline); tests leave both without LoRAs."""
    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            reference = make_pipeline(family, folder)
            cache[family] = (reference, StableDiffusion.from_pretrained(folder, dtype="float32"))
        return cache[family]

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


def kohya_file(path, reference, rank=4, alpha=2.0, strength=0.6, seed=0, ldm=False, text=True, convs=True):
    """A Kohya / A1111 LoRA (LoCon with convs): lora_unet_* (diffusers or LDM block names), lora_te*_*."""
    gen = torch.Generator().manual_seed(seed)
    layers = [("lora_unet_", n, m) for n, m in unet_layers(reference.unet, convs)]
    if ldm:
        ldm_names = _ldm_unet_paths([n for _, n, _ in layers])
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


def generate(ours, **kw):
    """mlx_sd's image for fixed latents, as uint8 -> float64."""
    latents = mx.array(np.random.default_rng(7).standard_normal((1, 6, 6, 4)).astype(np.float32))
    settings = {**SIZE, **kw}
    images = ours.generate("a photo of an astronaut riding a horse", seed=0, latents=latents, **settings)
    return np.asarray(images[0], np.float64)


def run(reference, ours, **kw):
    return run_both(reference, ours, "euler", 48, 48, 3, 5.0, prompt="a photo of an astronaut riding a horse", **kw)


def assert_changes_image(ours, reference):
    """The LoRA moves the image by much more than the parity tolerance."""
    images, _ = run(reference, ours)
    return images


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
        change = np.abs(images - plain)
        print(f"LoRA changes the image by mean {change.mean():.2f}/255, max {change.max():.0f}/255")
        assert change.mean() > 5 and change.max() > 30
    finally:
        reference.unload_lora_weights()
        ours.unload_lora()

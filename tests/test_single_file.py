"""Single-file LDM checkpoints: mlx_sd.single_file against diffusers' `from_single_file` on the same file.

Random diffusers components shaped like SD 1.x, 2.x and XL are exported to one LDM-layout file by
tests/ldm_export.py; diffusers' `from_single_file` loading that file back into the original weights proves the
exporter, and `split_components` must then give exactly the original state dicts. The mapping only renames,
splits and reshapes, so every comparison is bit-exact (tolerance 0).
"""

import gc
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors import safe_open

from helpers import SD15, SD21, SDXL, real_config, write_tokenizer
from ldm_export import export_ldm, text_model_key, text_model_keys
from mlx_sd.single_file import FAMILIES, detect_family, load_single_file, split_components
from mlx_sd.weights import ModelLoadError

REAL = {"sd1": SD15, "sd2": SD21, "sdxl": SDXL}

# Tiny widths and depths; every other field (block types, projection type, activation, the 23 OpenCLIP layers of
# SD 2.x that make diffusers drop exactly `resblocks.23`) stays that of the real config. Three UNet levels keep
# the real layout of down/up blocks with and without attention, so every LDM block-index case occurs.
TINY_UNET = dict(block_out_channels=[32, 32, 64], layers_per_block=2, norm_num_groups=8, sample_size=8)
TINY_VAE = dict(block_out_channels=[16, 16, 32, 32], norm_num_groups=8, sample_size=32)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, projection_dim=32)
TINY = {
    "sd1": dict(
        unet=dict(
            attention_head_dim=2,
            cross_attention_dim=32,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        ),
        text_encoder=dict(TINY_CLIP, num_hidden_layers=3),
    ),
    "sd2": dict(
        unet=dict(
            attention_head_dim=[2, 2, 4],
            cross_attention_dim=32,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        ),
        text_encoder=TINY_CLIP,
    ),  # num_hidden_layers stays 23
    # SDXL: the two encoders need different widths (diffusers tells them apart by width) and a non-square
    # bigG projection (the real one is square, which would hide a missing transpose from shape checks).
    "sdxl": dict(
        unet=dict(
            attention_head_dim=[2, 2, 4],
            transformer_layers_per_block=[1, 1, 2],
            cross_attention_dim=32 + 48,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=40 + 6 * 8,
        ),
        text_encoder=dict(TINY_CLIP, num_hidden_layers=3),
        text_encoder_2=dict(
            hidden_size=48, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, projection_dim=40
        ),
    ),
}


def _config(model, component, **overrides):
    config = {k: v for k, v in real_config(model, component).items() if not k.startswith("_")}
    config.update(overrides)
    return config


def build_components(family, tiny=True, seed=0):
    """Random diffusers/transformers modules of `family`: every parameter random, so no two are alike."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    real = REAL[family]
    sizes = TINY[family] if tiny else {}
    unet_overrides = dict(TINY_UNET, **sizes.get("unet", {})) if tiny else {}
    vae_overrides = {}
    if tiny:
        n = len(TINY_VAE["block_out_channels"])
        vae_overrides = dict(
            TINY_VAE, down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n
        )
    modules = {
        "unet": UNet2DConditionModel(**_config(real, "unet", **unet_overrides)),
        "vae": AutoencoderKL(**_config(real, "vae", **vae_overrides)),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**_config(real, "text_encoder", **sizes.get("text_encoder", {})))),
    }
    if family == "sdxl":
        config = CLIPTextConfig(**_config(real, "text_encoder_2", **sizes.get("text_encoder_2", {})))
        modules["text_encoder_2"] = CLIPTextModelWithProjection(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules.values():
            for p in m.parameters():
                p.normal_(generator=g)
            m.eval()
    return modules


def write_config_folder(family, folder, modules):
    """A diffusers pipeline folder for `from_single_file(config=...)`: the modules' configs (and weights),
    the real tokenizer(s) and scheduler."""
    import diffusers
    from transformers import CLIPTokenizer

    real = REAL[family]
    scheduler_config = real_config(real, "scheduler", "scheduler_config.json")
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    sources = folder.parent / f"{folder.name}_tokenizers"
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(real, sources / "tokenizer"))
    if family == "sdxl":
        tokenizer_2 = CLIPTokenizer.from_pretrained(write_tokenizer(real, sources / "tokenizer_2", "tokenizer_2"))
        pipe = diffusers.StableDiffusionXLPipeline(
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler, **modules
        )
    else:
        pipe = diffusers.StableDiffusionPipeline(
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **modules,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def reference_state(name, module):
    """The state dict diffusers' from_single_file gives for this module, text encoders with `text_model.` keys."""
    sd = module.state_dict()
    return text_model_keys(sd) if name.startswith("text_encoder") else sd


def export(family, modules, path, sgm=False):
    return export_ldm(path, family, **{k: m.state_dict() for k, m in modules.items()}, sgm=sgm)


def diffusers_from_single_file(family, path, folder, **skipped):
    """diffusers' own loader; `name=None` keyword arguments skip components."""
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    return cls.from_single_file(str(path), config=str(folder), local_files_only=True, **skipped)


def mismatches(ours, ref):
    """Keys whose values differ (bit-exact comparison), plus missing/extra keys."""
    bad = [f"missing {k}" for k in sorted(ref.keys() - ours.keys())]
    bad += [f"extra {k}" for k in sorted(ours.keys() - ref.keys())]
    for k in sorted(ref.keys() & ours.keys()):
        a, b = np.array(ours[k]), ref[k].numpy()
        if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b):
            bad.append(f"{k}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}")
    return bad


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    modules = build_components(family)
    write_config_folder(family, folder / "pipeline", modules)
    path = export(family, modules, folder / f"{family}.safetensors")
    return family, modules, path, folder / "pipeline"


def test_exporter_against_diffusers_from_single_file(exported):
    family, modules, path, folder = exported
    pipe = diffusers_from_single_file(family, path, folder)
    for name, module in modules.items():
        loaded = getattr(pipe, name).state_dict()
        ref = module.state_dict()
        assert loaded.keys() == ref.keys(), name
        bad = [k for k in ref if not torch.equal(loaded[k], ref[k])]
        assert not bad, f"{name}: from_single_file differs from the original at {bad[:5]}"


def test_split_components_gives_the_original_state_dicts(exported):
    family, modules, path, _ = exported
    got_family, components = load_single_file(path)
    assert got_family == family
    assert components.keys() == modules.keys()
    for name, module in modules.items():
        bad = mismatches(components[name], reference_state(name, module))
        assert not bad, f"{family} {name}: {bad[:5]}"


@pytest.mark.parametrize("exported", ["sd2"], indirect=True)
def test_sgm_layout_sd2(exported, tmp_path):
    """SD 2.x saved by Stability's sgm code (SD-Turbo): OpenCLIP under conditioner.embedders.0.model."""
    family, modules, _, _ = exported
    got_family, components = load_single_file(export(family, modules, tmp_path / "turbo.safetensors", sgm=True))
    assert got_family == "sd2"
    bad = mismatches(components["text_encoder"], reference_state("text_encoder", modules["text_encoder"]))
    assert not bad, bad[:5]


def test_detect_family_by_context_width():
    """Without text encoder keys the UNet's cross-attention width decides."""
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    conv_in = {"model.diffusion_model.input_blocks.0.0.weight": mx.zeros((8, 4, 3, 3))}
    for width, family in ((768, "sd1"), (1024, "sd2"), (2048, "sdxl")):
        assert detect_family({**conv_in, key: mx.zeros((8, width))}) == family
    with pytest.raises(ValueError, match="768 .SD 1.x., 1024 .SD 2.x. or 2048"):
        detect_family({**conv_in, key: mx.zeros((8, 512))})


def test_unrecognised_files(exported, tmp_path):
    family, _, path, _ = exported
    weights = mx.load(str(path))
    with pytest.raises(ValueError, match="expected model.diffusion_model"):
        detect_family({"encoder.layers.0.weight": mx.zeros((2,))})
    inpainting = dict(weights)
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    inpainting[conv_in] = mx.zeros((32, 9, 3, 3))
    with pytest.raises(ValueError, match="9 input channels"):
        detect_family(inpainting)
    for extra in (
        "lora_unet_down.alpha",
        "model.diffusion_model.input_blocks.1.0.weird.weight",
        "first_stage_model.decoder.mid.attn_1.foo.weight",
    ):
        with pytest.raises(ValueError, match=f"unrecognised keys .*{extra}"):
            split_components({**weights, extra: mx.zeros((2,))}, family)
    no_vae = {k: v for k, v in weights.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(ValueError, match="no vae weights"):
        split_components(no_vae, family)
    with pytest.raises(ValueError, match="unknown family"):
        split_components(weights, "sd3")


@pytest.mark.parametrize("exported", ["sd1"], indirect=True)
def test_pickle_and_corrupt_files_are_refused(exported, tmp_path):
    _, _, path, _ = exported
    for suffix in (".ckpt", ".bin", ".pt", ".pth", ".CKPT", ".Bin"):
        pickle = tmp_path / f"model{suffix}"
        pickle.write_bytes(b"\x80\x04 not read")
        with pytest.raises(ModelLoadError, match="never unpickles.*safetensors") as e:
            load_single_file(pickle)
        assert "\n" not in str(e.value)
    data = path.read_bytes()
    for name, content in (
        ("truncated", data[: len(data) // 2]),
        ("garbage", b"not a safetensors file" * 4),
        ("empty", b""),
    ):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="not a valid safetensors file") as e:
            load_single_file(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no such file"):
        load_single_file(tmp_path / "missing.safetensors")


@pytest.fixture
def scratch(tmp_path):
    """tmp_path, removed afterwards: the full-size files take about 10 GB."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.fullsize
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_fullsize_round_trip(family, scratch):
    """The real SD 1.5 / 2.1 configs with random weights, against the saved diffusers folder read one tensor at
    a time, so that at most one loaded copy of the weights is in memory besides the file being read."""
    modules = build_components(family, tiny=False)
    folder = write_config_folder(family, scratch / "pipeline", modules)
    path = export(family, modules, scratch / "model.safetensors")
    del modules
    gc.collect()

    def compare(name, loaded):
        keys, bad = set(), []
        for file in sorted((folder / name).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    key = text_model_key(k) if name.startswith("text_encoder") else k
                    keys.add(key)
                    if key in loaded and not np.array_equal(np.array(loaded[key]), f.get_tensor(k).numpy()):
                        bad.append(key)
        assert keys == loaded.keys(), f"{name}: {sorted(keys ^ loaded.keys())[:5]}"
        assert not bad, f"{name}: {bad[:5]}"

    got_family, components = load_single_file(path)
    assert got_family == family
    assert components.keys() == {"unet", "vae", "text_encoder"}
    for name in list(components):
        compare(name, components.pop(name))
    gc.collect()

    names = ("unet", "vae", "text_encoder")
    for name in names:  # one component per call keeps one loaded component next to the file's tensors
        pipe = diffusers_from_single_file(family, path, folder, **{n: None for n in names if n != name})
        compare(name, {k: v.numpy() for k, v in reference_state(name, getattr(pipe, name)).items()})
        del pipe
        gc.collect()

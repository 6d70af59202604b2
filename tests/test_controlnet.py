"""ControlNets: mlx_sd.controlnet against diffusers' ControlNetModel and its ControlNet pipelines on the same random
weights, float32.

Component tolerance: max abs difference <= 1e-5 x max(1, max |reference|) (measured ~1e-6: summation order only);
full size 1e-4 relative. End to end (tiny pipelines, the same latents and noise): final 8-bit images within
0.5/255 mean and 2/255 max absolute difference, and the ControlNet must change the image by more than that.
"""

import json

import diffusers
import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import (
    DIFFUSERS_SCHEDULERS,
    XL,
    assert_images_close,
    control_image,
    controlnet_config,
    injected_noise,
    make_controlnet,
    make_pipeline,
    nchw_to_nhwc,
    to_mx,
    wake_zero_convs,
)
from ldm_export import controlnet_to_ldm
from mlx_sd import ModelLoadError, StableDiffusion
from mlx_sd.controlnet import (
    ControlNetConfig,
    ControlNetModel,
    ControlSpec,
    canny,
    is_controlnet,
    ldm_to_diffusers,
    load_controlnet,
    sanitize,
    single_file_config,
)
from mlx_sd.convert import convert, convert_controlnet
from mlx_sd.weights import load_strict

PROMPT = "a photo of an astronaut riding a horse on mars"


# --- the model ---------------------------------------------------------------------------------------


def ours_from(ref, dtype=mx.float32):
    """mlx_sd's ControlNetModel with the weights of the diffusers ControlNet `ref`."""
    model = ControlNetModel(ControlNetConfig.from_dict(dict(ref.config)))
    return load_strict(model, sanitize({k: to_mx(v) for k, v in ref.state_dict().items()}), "controlnet", dtype)


def run_models(ref, ours, batch, h, w, scale=0.7, guess_mode=False, seed=1):
    """Both ControlNets on the same random inputs: [(ours, reference) NHWC arrays] for every residual."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    cond = torch.rand(batch, ref.config.conditioning_channels, 8 * h, 8 * w, generator=g)
    context = torch.randn(batch, 77, ref.config.cross_attention_dim, generator=g)
    t = torch.tensor([999.0, 500.5, 1.0][:batch])
    extra, ours_extra = {}, {}
    if ref.config.addition_embed_type == "text_time":
        text_embeds = torch.randn(batch, ref.config.projection_class_embeddings_input_dim - 6 * 8, generator=g)
        time_ids = torch.tensor([[8.0 * h, 8.0 * w, 0, 0, 8.0 * h, 8.0 * w]] * batch)
        extra = dict(added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})
        ours_extra = dict(text_embeds=to_mx(text_embeds), time_ids=to_mx(time_ids))
    with torch.no_grad():
        down, mid = ref(x, t, context, cond, scale, guess_mode=guess_mode, return_dict=False, **extra)
    got_down, got_mid = ours(
        nchw_to_nhwc(x), to_mx(t), to_mx(context), nchw_to_nhwc(cond), scale, guess_mode, **ours_extra
    )
    return [(np.array(o), r.permute(0, 2, 3, 1).numpy()) for o, r in zip([*got_down, got_mid], [*down, mid])]


def assert_residuals_close(pairs, rel=1e-5):
    assert len(pairs) > 2
    scale = max(1.0, max(np.abs(r).max() for _, r in pairs))
    diff = max(np.abs(o - r).max() for o, r in pairs)
    print(f"\nControlNet residuals vs diffusers: max abs diff {diff:.3g} (max |reference| {scale:.3g})")
    assert all(o.shape == r.shape for o, r in pairs)
    assert diff <= rel * scale


@pytest.mark.parametrize("family", ["sd1", "sd2v", "sdxl"])
@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_matches_diffusers(family, guess_mode):
    """Tiny random ControlNets from the real configs, odd latent sizes, two timesteps in one batch."""
    ref = make_controlnet(family)
    pairs = run_models(ref, ours_from(ref), 2, 7, 9, guess_mode=guess_mode)
    assert_residuals_close(pairs)
    assert np.abs(pairs[0][1]).max() > 0.01  # the zero convolutions were woken: the residuals are not zeros


def test_bgr_channel_order_and_global_pooling_match_diffusers():
    """controlnet_conditioning_channel_order "bgr" flips the control image; global_pool_conditions (the shuffle
    ControlNet) averages the residuals over height and width and ignores guess mode's scales."""
    ref = make_controlnet("sd1", controlnet_conditioning_channel_order="bgr", global_pool_conditions=True)
    pairs = run_models(ref, ours_from(ref), 2, 5, 6, guess_mode=True)
    assert pairs[0][1].shape[1:3] == (1, 1)
    assert_residuals_close(pairs)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_control_type": 8}, "ControlNet-Union"),
        ({"_class_name": "ControlNetXSAdapter"}, "ControlNetXSAdapter"),
        ({"controlnet_conditioning_channel_order": "rbg"}, "channel_order"),
        ({"mid_block_type": "UNetMidBlock2D"}, "mid_block_type"),
        ({"class_embed_type": "projection"}, "class_embed_type"),
        ({"conditioning_embedding_out_channels": [16, -1]}, "conditioning"),
        ({"down_block_types": ["CrossAttnDownBlock2D", "SimpleDownBlock2D"]}, "SimpleDownBlock2D"),
    ],
)
def test_config_rejects_what_is_not_implemented(change, message):
    config = {**controlnet_config("sd1"), **change}
    with pytest.raises(ValueError, match=message) as error:
        ControlNetConfig.from_dict(config)
    assert "\n" not in str(error.value)


@pytest.mark.fullsize
def test_fullsize_sd15_controlnet_matches_diffusers():
    """The real SD 1.5 ControlNet config (361M parameters), random weights, 16 x 12 latents; one float32 copy of
    the weights per framework (~3.5 GB in all)."""
    torch.manual_seed(0)
    ref = diffusers.ControlNetModel.from_config(controlnet_config("sd1")).eval()
    wake_zero_convs(ref)
    ours = ours_from(ref)
    pairs = run_models(ref, ours, 2, 12, 16)
    scale = max(np.abs(r).max() for _, r in pairs)
    diff = max(np.abs(o - r).max() for o, r in pairs)
    print(f"\nfull-size SD 1.5 ControlNet: max|ref|={scale:.4g} max abs diff={diff:.3g} rel={diff / scale:.3g}")
    assert diff <= 1e-4 * scale


# --- single files and bundled configs ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_single_file_with_ldm_keys_loads_the_same_weights(tmp_path, family, prefix):
    """An A1111/LDM-keyed file written from a diffusers ControlNet (ldm_export) loads into the same weights; the
    A1111 files put everything under control_model., thibaud's SD 2.1 files have no prefix."""
    ref = make_controlnet(family)
    ref.save_pretrained(tmp_path / "diffusers", safe_serialization=True)
    path = tmp_path / "control_v11p_canny.safetensors"
    save_file(controlnet_to_ldm(ref.state_dict(), prefix), str(path))
    ours = load_controlnet(path, "float32", config=tmp_path / "diffusers")
    expected = ours_from(ref)
    assert ours.name == "control_v11p_canny"
    for (key, got), (_, want) in zip(
        sorted(tree_items(ours.parameters())), sorted(tree_items(expected.parameters())), strict=True
    ):
        assert np.array_equal(np.array(got), np.array(want)), key


def test_the_ldm_exporter_agrees_with_diffusers_from_single_file(tmp_path):
    """diffusers' own single-file loader reads the exporter's file into the original weights."""
    ref = make_controlnet("sd1")
    ref.save_pretrained(tmp_path / "diffusers", safe_serialization=True)
    save_file(controlnet_to_ldm(ref.state_dict()), str(tmp_path / "cn.safetensors"))
    loaded = diffusers.ControlNetModel.from_single_file(
        str(tmp_path / "cn.safetensors"), config=str(tmp_path / "diffusers"), local_files_only=True
    )
    want, got = ref.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_single_file_with_diffusers_keys_and_a_config_json(tmp_path):
    ref = make_controlnet("sd1")
    ref.save_pretrained(tmp_path / "diffusers", safe_serialization=True)
    path = tmp_path / "diffusers_sd15_canny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = load_controlnet(path, "float32", config=tmp_path / "diffusers" / "config.json")
    assert_residuals_close(run_models(ref, ours, 1, 4, 4))


def tree_items(params):
    from mlx.utils import tree_flatten

    return tree_flatten(params)


def _meta_state(config):
    """The parameter names and shapes of a full-size diffusers ControlNet, without its memory (meta device)."""
    with torch.device("meta"):
        model = diffusers.ControlNetModel.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "family, change",
    [
        ("sd1", {}),
        ("sd2", {}),
        ("sdxl", {}),
        ("sdxl", {"transformer_layers_per_block": [0, 0, 1]}),  # a smaller SDXL ControlNet, as -small / -mid
        ("sd1", {"conditioning_channels": 1}),
    ],
)
def test_bundled_configs_build_the_models_of_full_size_single_files(family, change):
    """A full-size single file's config (the bundled one of its family, with the transformer depths and conditioning
    channels read from the weights) builds a model of the diffusers parameter names and shapes; its A1111/LDM
    keys map back to the diffusers names. Shapes only: no full-size memory is used."""
    state = _meta_state({**controlnet_config(family), **change})
    weights = {k: mx.zeros(s) for k, s in state.items()}  # lazy: never evaluated
    config = single_file_config(weights)
    ours = ControlNetModel(ControlNetConfig.from_dict(config))
    ours_shapes = {k: tuple(v.shape) for k, v in tree_items(ours.parameters())}
    assert ours_shapes == {k: tuple(v.shape) for k, v in sanitize(weights).items()}
    ldm = controlnet_to_ldm({k: torch.empty(s, device="meta") for k, s in state.items()})
    mapped = ldm_to_diffusers({k: mx.zeros(tuple(v.shape)) for k, v in ldm.items()})
    assert {k: tuple(v.shape) for k, v in mapped.items()} == state


def test_single_file_errors_are_one_line(tmp_path):
    sd = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "cond_stage_model.x": torch.zeros(1),
    }
    save_file(sd, str(tmp_path / "a.safetensors"))
    union = {
        "control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
        "control_add_embedding.w": torch.zeros(2),
    }
    save_file(union, str(tmp_path / "union.safetensors"))
    odd = {
        "control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
        "control_model.zero_convs.0.1.weight": torch.zeros(1),
    }
    save_file(odd, str(tmp_path / "odd.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    ref = make_controlnet("sd1")  # tiny: 32-wide cross-attention, no family's bundled config fits it
    save_file(controlnet_to_ldm(ref.state_dict()), str(tmp_path / "tiny.safetensors"))
    cases = [
        ("a.safetensors", "not a ControlNet checkpoint"),
        ("union.safetensors", "ControlNet-Union"),
        ("odd.safetensors", "unrecognised ControlNet keys: control_model.zero_convs.0.1.weight"),
        ("junk.safetensors", "not a valid safetensors file"),
        ("tiny.safetensors", "cross-attention width 32"),
        ("missing.safetensors", "no such file"),
        ("control_sd15_canny.pth", "pickle"),
    ]
    for name, message in cases:
        with pytest.raises(ModelLoadError, match=message) as error:
            load_controlnet(tmp_path / name, "float32")
        assert "\n" not in str(error.value)


# --- folders, converting -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_controlnet(tmp_path_factory):
    """A tiny SD 1.x diffusers ControlNet saved as a diffusers folder: (reference, folder)."""
    folder = tmp_path_factory.mktemp("controlnet")
    ref = make_controlnet("sd1", seed=3)
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


def test_diffusers_folder_and_pipeline_folder(saved_controlnet, tmp_path):
    ref, folder = saved_controlnet
    assert_residuals_close(run_models(ref, load_controlnet(folder, "float32"), 1, 4, 5))
    pipeline = tmp_path / "pipeline"
    ref.save_pretrained(pipeline / "controlnet", safe_serialization=True)
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionControlNetPipeline"}))
    assert_residuals_close(run_models(ref, load_controlnet(pipeline, "float32"), 1, 4, 5))
    assert is_controlnet(folder) and not is_controlnet(tmp_path)


def test_convert_then_load_gives_the_same_model(saved_controlnet, tmp_path):
    ref, folder = saved_controlnet
    out = convert_controlnet(folder, tmp_path / "mlx", dtype="float32")
    manifest = json.loads((out / "mlx_sd.json").read_text())
    assert (manifest["kind"], manifest["family"], manifest["quantization"]) == ("controlnet", None, None)
    assert is_controlnet(out)
    assert_residuals_close(run_models(ref, load_controlnet(out, "float32"), 1, 4, 5))


def test_quantized_convert_equals_quantizing_at_load(saved_controlnet, tmp_path):
    """8-bit in groups of 32 (the tiny model's widths): the saved folder rebuilds the same quantized layers."""
    ref, folder = saved_controlnet
    out = convert_controlnet(folder, tmp_path / "q8", dtype="float32", quantize=8, q_group_size=32)
    loaded = load_controlnet(out, "float32")
    assert any(k.endswith(".scales") for k, _ in tree_items(loaded.parameters()))
    in_memory = load_controlnet(folder, "float32")
    from mlx_sd.quantize import quantize_model

    quantize_model(in_memory, 8, 32)
    a = run_models(ref, loaded, 1, 4, 5)
    b = run_models(ref, in_memory, 1, 4, 5)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, b))
    with pytest.raises(ModelLoadError, match="already quantized"):
        load_controlnet(out, "float32", quantize=8)
    with pytest.raises(FileExistsError, match="already exists"):
        convert_controlnet(folder, out)


# --- end to end --------------------------------------------------------------------------------------


def _photo(width, height, seed=0):
    """A smooth odd-sized RGB image with some noise: the input of image-to-image and inpainting."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([np.sin(xs / 7.0 + c) * 80 + np.cos(ys / 5.0 - c) * 60 + 128 for c in range(3)], -1)
    return Image.fromarray(np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8))


def _mask(width, height):
    ys, xs = np.mgrid[0:height, 0:width]
    ellipse = ((xs - width * 0.6) / (width * 0.25)) ** 2 + ((ys - height * 0.45) / (height * 0.3)) ** 2
    return Image.fromarray(np.where(ellipse < 1, 255, 0).astype(np.uint8), "L")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (diffusers components, mlx_sd pipeline, [(diffusers ControlNet, mlx_sd ControlNet)] x 2, folder)."""
    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            components = make_pipeline(family, folder).components
            nets = []
            for i in range(2):
                ref = make_controlnet(family, seed=10 + i)
                ref.save_pretrained(folder / f"controlnet_{i}", safe_serialization=True)
                nets.append((ref, load_controlnet(folder / f"controlnet_{i}", "float32")))
            cache[family] = (components, StableDiffusion.from_pretrained(folder, dtype="float32"), nets, folder)
        return cache[family]

    return get


def run_both(monkeypatch, models, family, units, task="", sampler="euler", steps=4, guidance=7.5, size=(64, 64), **kw):
    """diffusers' StableDiffusion[XL]ControlNet[Img2Img|Inpaint]Pipeline and mlx_sd with the same ControlNets,
    `units` [(net index, scale, start, end)]; returns (ours, expected, ours without ControlNets) as arrays."""
    components, ours, nets, _ = models(family)
    xl = family in XL
    refs = [nets[i][0] for i, *_ in units]
    cls = getattr(diffusers, f"StableDiffusion{'XL' if xl else ''}ControlNet{task}Pipeline")
    pipe = cls(
        **components,
        controlnet=refs if len(refs) > 1 else refs[0],
        **(dict(add_watermarker=False) if xl else dict(requires_safety_checker=False)),
    )
    name, overrides = DIFFUSERS_SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, name).from_config(components["scheduler"].config, **overrides)
    pipe.set_progress_bar_config(disable=True)

    control = kw.get("control", control_image())
    guess_mode = kw.get("guess_mode", False)
    width, height = size if size else (control.width - control.width % 8, control.height - control.height % 8)
    rng = np.random.default_rng(steps * 100 + width + height)
    noise = rng.standard_normal((1, height // 8, width // 8, 4)).astype(np.float32)
    image_noise = rng.standard_normal(noise.shape).astype(np.float32)
    to_torch = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    per_unit = (lambda values: list(values)) if len(units) > 1 else (lambda values: values[0])
    args = dict(
        prompt=PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        guess_mode=guess_mode,
        controlnet_conditioning_scale=per_unit([u[1] for u in units]),
        control_guidance_start=per_unit([u[2] for u in units]),
        control_guidance_end=per_unit([u[3] for u in units]),
    )
    if size:
        args.update(width=width, height=height)
    controls = per_unit([control] * len(units))
    ours_args = dict(width=size and width, height=size and height, latents=mx.array(noise))
    if task:
        image = _photo(width + 3, height + 5)
        args.update(image=image, control_image=controls, strength=kw["strength"])
        ours_args.update(image=image, strength=kw["strength"], image_noise=mx.array(image_noise))
        if task == "Inpaint":
            args["mask_image"] = ours_args["mask"] = _mask(width + 3, height + 5)
        with injected_noise(monkeypatch, pipe, to_torch(noise), to_torch(image_noise)) as draws, torch.no_grad():
            expected = pipe(**args).images
        assert draws["noise"] == 1 and draws["posterior"] >= 1
    else:
        args.update(image=controls, latents=to_torch(noise))
        with torch.no_grad():
            expected = pipe(**args).images

    specs = [ControlSpec(nets[i][1], control, scale, start, end, guess_mode) for i, scale, start, end in units]
    common = dict(steps=steps, guidance_scale=guidance, sampler=sampler, seed=0, **ours_args)
    got = ours.generate(PROMPT, controlnet=specs, **common)
    without = ours.generate(PROMPT, **{**common, "width": width, "height": height})
    as_array = lambda images: np.stack([np.asarray(i, np.float64) for i in images])  # noqa: E731
    return as_array(got), as_array(expected), as_array(without)


E2E_CASES = {
    # id: (family, units [(net, scale, start, end)], keyword arguments)
    "sd1": ("sd1", [(0, 1.0, 0.0, 1.0)], {}),
    "sd1-default-size-from-control": ("sd1", [(0, 0.8, 0.0, 1.0)], dict(size=None, sampler="ddim")),
    "sd1-odd-nonsquare": ("sd1", [(1, 1.2, 0.0, 1.0)], dict(size=(72, 56), sampler="dpmpp_2m")),
    "sd1-multi-windows": ("sd1", [(0, 0.8, 0.0, 0.5), (1, 0.6, 0.25, 1.0)], dict(size=(48, 64))),
    "sd1-guess-mode": ("sd1", [(0, 1.0, 0.0, 1.0)], dict(guess_mode=True)),
    "turbo-no-guidance": ("turbo", [(0, 1.5, 0.0, 1.0)], dict(steps=2, guidance=0.0, size=(64, 48))),
    "sd2v": ("sd2v", [(0, 1.0, 0.0, 1.0)], dict(sampler="ddim", size=(56, 64))),
    "sd1-img2img": ("sd1", [(0, 1.0, 0.0, 0.7)], dict(task="Img2Img", strength=0.6, steps=5, size=(64, 48))),
    "sd1-inpaint": ("sd1", [(0, 0.9, 0.0, 1.0)], dict(task="Inpaint", strength=0.75, size=(64, 48))),
    "sdxl": ("sdxl", [(0, 1.0, 0.0, 1.0)], dict(size=(72, 56))),
    "sdxl-multi-guess": ("sdxl", [(0, 0.7, 0.0, 0.75), (1, 0.5, 0.0, 1.0)], dict(guess_mode=True, steps=3)),
}


@pytest.mark.parametrize("case", E2E_CASES)
def test_pipeline_matches_diffusers(monkeypatch, models, case):
    family, units, kw = E2E_CASES[case]
    ours, expected, without = run_both(monkeypatch, models, family, units, **kw)
    assert_images_close(ours, expected)
    effect = np.abs(ours - without)
    print(f"{case}: the ControlNets change the image by mean {effect.mean():.2f}/255, max {effect.max():.0f}/255")
    # more than twice the mean and four times the max tolerance: parity is not that of two unguided images
    assert effect.mean() > 1.0 and effect.max() > 8


# --- inputs and errors -------------------------------------------------------------------------------


def test_controlnet_for_another_family_is_a_one_line_error(models):
    _, ours, _, _ = models("sd1")
    _, _, xl_nets, _ = models("sdxl")
    spec = ControlSpec(xl_nets[0][1], control_image())
    with pytest.raises(ModelLoadError, match="is for an unknown family .*text_time.* but the model is") as error:
        ours.generate(PROMPT, width=64, height=64, steps=1, controlnet=spec)
    assert "\n" not in str(error.value)


def test_control_image_errors_and_spec_checks(models, tmp_path):
    _, ours, nets, _ = models("sd1")
    net = nets[0][1]
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    with pytest.raises(ValueError, match="cannot read image"):
        ours.generate(PROMPT, width=64, height=64, steps=1, controlnet=ControlSpec(net, text))
    bad = [
        (dict(scale=-1), "scale"),
        (dict(scale=float("nan")), "scale"),
        (dict(start=0.5, end=0.5), "start and end"),
        (dict(end=1.5), "start and end"),
        (dict(preprocess="depth"), "unknown control preprocessor"),
        (dict(preprocess="canny", thresholds=(200, 100)), "thresholds"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message) as error:
            ControlSpec(net, control_image(), **kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="ControlSpec"):
        ours.generate(PROMPT, width=64, height=64, steps=1, controlnet=[net])


def test_canny_preprocessing(models):
    """canny() draws the shapes' outlines; preprocess="canny" is the same as passing canny()'s image."""
    _, ours, nets, _ = models("sd1")
    edges = np.asarray(canny(control_image(), 100, 200))
    assert set(np.unique(edges)) == {0, 255} and edges.shape == (45, 67, 3)
    # the disc (centre x 23.5, y 22.5, radius 13.5): an edge where row 22 crosses its outline, none at its centre
    assert edges[22, 8:13].max() == 255 and edges[20:25, 20:27].max() == 0
    common = dict(width=64, height=48, steps=2, seed=1)
    a = ours.generate(PROMPT, controlnet=ControlSpec(nets[0][1], control_image(), preprocess="canny"), **common)
    b = ours.generate(PROMPT, controlnet=ControlSpec(nets[0][1], canny(control_image())), **common)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert (
        'ControlNet 0: "Module: canny, Model: ' in a.parameters and "Threshold A: 100, Threshold B: 200" in a.parameters
    )


def test_canny_without_opencv_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match=r'pip install "mlx_sd\[controlnet\]"'):
        canny(control_image())


def test_low_memory_gives_the_same_image(models):
    """low_memory runs the guidance halves as two UNet calls: the residuals must be split with them."""
    _, ours, nets, folder = models("sd1")
    spec = ControlSpec(nets[0][1], control_image(), 0.9)
    common = dict(width=64, height=48, steps=2, seed=2, controlnet=spec)
    low_memory = StableDiffusion.from_pretrained(folder, dtype="float32", low_memory=True)
    a, b = ours.generate(PROMPT, **common), low_memory.generate(PROMPT, **common)
    assert np.abs(np.asarray(a[0], np.float64) - np.asarray(b[0], np.float64)).max() <= 1


def test_the_control_image_is_embedded_once_per_generation(models, monkeypatch):
    """The conditioning embedding depends on the control image only: made once per ControlNet and generation
    (at batch 1, then repeated), not at every step for every image. Two ControlNets, 3 steps, 2 images, guided."""
    _, ours, nets, _ = models("sd1")
    batches, embedding = [], type(nets[0][1].controlnet_cond_embedding)
    call = embedding.__call__
    monkeypatch.setattr(embedding, "__call__", lambda self, x: batches.append(len(x)) or call(self, x))
    specs = [ControlSpec(net, control_image(), 0.8) for _, net in nets]
    ours.generate(PROMPT, width=64, height=48, steps=3, seed=2, num_images=2, controlnet=specs)
    assert batches == [1, 1]


def test_a1111_units_read_like_the_extension_writes_them(models, monkeypatch):
    """The ControlNet settings of a generation as A1111's ControlNet extension writes them (its infotext), and
    through mlx_sd's A1111 infotext parser."""
    from mlx_sd.controlnet import a1111_units
    from mlx_sd.infotext import parse_a1111_parameters

    _, _, nets, _ = models("sd1")
    monkeypatch.setattr(nets[0][1], "name", "control_v11p_sd15_canny")
    specs = [
        ControlSpec(nets[0][1], control_image(), 0.8, 0.0, 0.6, preprocess="canny", thresholds=(100, 200)),
        ControlSpec(nets[0][1], control_image(), 1.25, 0.1, 1.0, guess_mode=True),
    ]
    units = a1111_units([spec.settings() for spec in specs])
    assert units == {
        "ControlNet 0": "Module: canny, Model: control_v11p_sd15_canny, Weight: 0.8, Resize Mode: Just Resize, "
        "Low Vram: False, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 0.6, "
        "Pixel Perfect: False, Control Mode: Balanced",
        "ControlNet 1": "Module: none, Model: control_v11p_sd15_canny, Weight: 1.25, Resize Mode: Just Resize, "
        "Low Vram: False, Guidance Start: 0.1, Guidance End: 1, Pixel Perfect: False, "
        "Control Mode: ControlNet is more important",
    }
    text = "a cat\nSteps: 2, Seed: 1, " + ", ".join(f"{k}: {json.dumps(v)}" for k, v in units.items())
    parsed = parse_a1111_parameters(text)
    assert {k: parsed[k] for k in units} == units


# --- command line ------------------------------------------------------------------------------------


def test_cli_controlnets_equal_the_api_and_are_recorded(models, tmp_path):
    """`--controlnet DIR --control-image IMG` (paired, repeatable) gives the API's image with ControlSpecs, and
    the PNG records the ControlNets as A1111's extension does."""
    from click.testing import CliRunner

    from mlx_sd.cli import cli

    _, ours, nets, folder = models("sd1")
    image = tmp_path / "control.png"
    control_image().save(image)
    args = ["generate", PROMPT, "--model", folder, "--dtype", "float32", "-W", 64, "-H", 48, "--steps", 2]
    args += ["--seed", 4, "--controlnet", folder / "controlnet_0", "--control-image", image, "--control-scale", 0.7]
    args += ["--controlnet", folder / "controlnet_1", "--control-image", image, "--control-end", 1, "--control-end"]
    result = CliRunner().invoke(cli, [str(a) for a in [*args, 0.5, "-o", tmp_path / "out.png"]])
    assert result.exit_code == 0, result.output
    # one --control-scale applies to both; --control-end is given per ControlNet
    specs = [ControlSpec(nets[0][1], image, 0.7, 0, 1), ControlSpec(nets[1][1], image, 0.7, 0, 0.5)]
    expected = ours.generate(PROMPT, width=64, height=48, steps=2, seed=4, controlnet=specs)
    written = Image.open(tmp_path / "out.png")
    assert np.array_equal(np.asarray(written), np.asarray(expected[0]))
    assert 'ControlNet 1: "Module: none, Model: ' in written.text["parameters"]
    assert "Weight: 0.7" in written.text["parameters"] and "Guidance End: 0.5" in written.text["parameters"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--controlnet", "CN"], "give one --control-image per --controlnet: 1 ControlNet(s), 0 image(s)"),
        (
            ["--controlnet", "CN", "--control-image", "IMG", "--control-scale", 1, "--control-scale", 2],
            "give --control-scale once, or once per --controlnet (1), not 2",
        ),  # fmt: skip
        (["--controlnet", "CN", "--control-image", "IMG", "--control-scale", -1], "control scale must be between 0"),
        (
            ["--controlnet", "CN", "--control-image", "IMG", "--control-start", 0.9, "--control-end", 0.2],
            "control start and end must satisfy 0 <= start < end <= 1",
        ),  # fmt: skip
    ],
)
def test_cli_controlnet_usage_errors(models, tmp_path, extra, message):
    from click.testing import CliRunner

    from mlx_sd.cli import cli

    _, _, _, folder = models("sd1")
    control_image().save(tmp_path / "c.png")
    extra = [folder / "controlnet_0" if a == "CN" else tmp_path / "c.png" if a == "IMG" else a for a in extra]
    args = ["generate", PROMPT, "--model", folder, "--dtype", "float32", "-o", tmp_path / "out.png", *extra]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 2 and result.output == f"Error: {message}\n" or message in result.output, result.output
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert not (tmp_path / "out.png").exists()


def test_mlx_sd_convert_takes_controlnets(saved_controlnet, tmp_path):
    """`mlx-sd convert` dispatches a ControlNet source to convert_controlnet, with convert's folder safety."""
    from click.testing import CliRunner

    from mlx_sd.convert import convert_command

    ref, folder = saved_controlnet
    result = CliRunner().invoke(convert_command, [str(folder), str(tmp_path / "cn"), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cn" / "mlx_sd.json").read_text())["kind"] == "controlnet"
    assert_residuals_close(run_models(ref, load_controlnet(tmp_path / "cn", "float32"), 1, 4, 5))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(convert_command, [str(folder), str(tmp_path / "docs"), "--force"])
    assert result.exit_code == 1 and "refusing to replace" in result.output
    assert (tmp_path / "docs" / "notes.txt").read_text() == "mine"
    assert convert(folder, tmp_path / "again", dtype="float32") == tmp_path / "again"

"""Image-to-image and inpainting end to end: diffusers' Img2Img / Inpaint pipelines (SD and SDXL) and mlx_sd on the
same tiny random weights, with the same random numbers.

diffusers draws two kinds of numbers from `generator`: the VAE posterior sample (`retrieve_latents(...,
sample_mode="sample")`: mean + std * eps, for the input image and, when inpainting, for the masked image) and the
noise added at the start step (`randn_tensor` in `prepare_latents`). The reference here draws neither: the posterior
sample uses `image_noise` and `prepare_latents` uses `noise`, the same arrays mlx_sd gets as `image_noise=` and
`latents=`. (diffusers' own `latents=` argument cannot serve: the inpaint pipelines then start from pure noise
whatever the strength.) Samplers without per-step noise only (euler, ddim, dpmpp_2m).

Tolerance (float32): final 8-bit images within 0.5/255 mean and 2/255 max absolute difference.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import DIFFUSERS_SCHEDULERS, XL, assert_images_close, injected_noise, make_pipeline
from mlx_sd import StableDiffusion

PROMPT = "a photo of an astronaut riding a horse on mars"


def _test_image(width=67, height=45, seed=0):
    """An odd-sized RGB image with smooth structure and some noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    channels = [np.sin(xs / 7.0 + c) * 80 + np.cos(ys / 5.0 - c) * 60 + 128 for c in range(3)]
    image = np.stack(channels, -1) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _test_mask(width=67, height=45):
    """White (repaint) on black, the size of _test_image: an ellipse with a soft edge, and thin stripes (3 px of
    every 7) on the left that a mask blur of 2 px or more dissolves below the 0.5 threshold."""
    ys, xs = np.mgrid[0:height, 0:width]
    ellipse = ((xs - width * 0.6) / (width * 0.25)) ** 2 + ((ys - height * 0.45) / (height * 0.3)) ** 2
    mask = np.clip((1.2 - ellipse) * 400, 0, 255)
    mask[(xs < width * 0.3) & (xs % 7 < 3) & (ys > 4) & (ys < height - 5)] = 255
    return Image.fromarray(mask.astype(np.uint8), "L")


def _inpainting_unet(unet, seed=1):
    """A 9-input-channel copy of `unet` (latents + mask + masked-image latents), like the inpainting checkpoints:
    the same weights, with conv_in widened by random filters for the 5 extra channels."""
    from diffusers import UNet2DConditionModel

    inpainting = UNet2DConditionModel.from_config(unet.config, in_channels=9)
    state = unet.state_dict()
    weight = state["conv_in.weight"]  # (out, 4, 3, 3)
    extra = torch.randn((weight.shape[0], 5, *weight.shape[2:]), generator=torch.Generator().manual_seed(seed))
    state["conv_in.weight"] = torch.cat([weight, extra * weight.std()], dim=1)
    inpainting.load_state_dict(state)
    return inpainting.float().eval()


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """(family, inpainting UNet?) -> (diffusers components, mlx_sd pipeline) on the same saved folder."""
    cache = {}

    def get(family, inpainting=False):
        key = (family, inpainting)
        if key not in cache:
            folder = tmp_path_factory.mktemp(family + ("_inpainting" if inpainting else ""))
            components = make_pipeline(family, folder).components
            if inpainting:
                # saved as the Hub's inpainting repos are: a 9-channel unet/ and the inpaint pipeline's class name
                components["unet"] = _inpainting_unet(components["unet"])
                components["unet"].save_pretrained(folder / "unet", safe_serialization=True)
                index = json.loads((folder / "model_index.json").read_text())
                index["_class_name"] = (
                    "StableDiffusionXLInpaintPipeline" if family in XL else "StableDiffusionInpaintPipeline"
                )
                (folder / "model_index.json").write_text(json.dumps(index, indent=2))
            cache[key] = (components, StableDiffusion.from_pretrained(folder, dtype="float32"))
        return cache[key]

    return get


def _reference_pipeline(components, family, task, sampler):
    import diffusers

    xl = family in XL
    cls = getattr(diffusers, f"StableDiffusion{'XL' if xl else ''}{task}Pipeline")
    extra = dict(add_watermarker=False) if xl else dict(requires_safety_checker=False)
    pipe = cls(**components, **extra)
    name, overrides = DIFFUSERS_SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, name).from_config(components["scheduler"].config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_both(
    monkeypatch,
    pipelines,
    family,
    sampler,
    steps,
    strength,
    guidance_scale=7.5,
    num_images=1,
    mask=None,
    mask_blur=0,
    inpainting_unet=False,
    width=None,
    height=None,
    image=None,
    negative_prompt="",
    ours_image=None,
    ours_mask=None,
):
    """Runs diffusers' Img2Img (no mask) or Inpaint pipeline and mlx_sd; returns (ours, expected) as float arrays.

    mlx_sd gets `ours_image` / `ours_mask` (e.g. the file) where given, else the same PIL images as diffusers."""
    components, ours = pipelines(family, inpainting_unet)
    task = "Img2Img" if mask is None else "Inpaint"
    reference = _reference_pipeline(components, family, task, sampler)
    image = _test_image() if image is None else image
    if task == "Img2Img":
        # diffusers' img2img pipelines take no size: the image's own, rounded down to multiples of 8
        assert width is None and height is None
        w, h = image.size
        width, height = w - w % 8, h - h % 8
    rng = np.random.default_rng(steps * 100 + int(strength * 1000))
    shape = (num_images, height // 8, width // 8, 4)
    noise = rng.standard_normal(shape).astype(np.float32)
    # diffusers encodes the one input image once and repeats its latents for every image of the batch
    image_noise = np.repeat(rng.standard_normal((1, *shape[1:])).astype(np.float32), num_images, axis=0)
    to_torch = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731

    kwargs = dict(
        negative_prompt=negative_prompt or None,
        num_inference_steps=steps,
        strength=strength,
        guidance_scale=guidance_scale,
        num_images_per_prompt=num_images,
    )
    if task == "Inpaint":
        diffusers_mask = reference.mask_processor.blur(mask, blur_factor=mask_blur) if mask_blur else mask
        kwargs.update(mask_image=diffusers_mask, width=width, height=height)
        if mask_blur:  # the blur must reach the latent-resolution mask, or the case tests nothing about it
            sharp, blurred = (
                reference.mask_processor.preprocess(m, height=height, width=width)[..., ::8, ::8]
                for m in (mask, diffusers_mask)
            )
            assert not torch.equal(sharp, blurred)
    with injected_noise(monkeypatch, reference, to_torch(noise), to_torch(image_noise)[:1]) as draws, torch.no_grad():
        expected = reference(PROMPT, image=image, **kwargs).images
    assert draws["noise"] == 1 and draws["posterior"] >= 1

    images = ours.generate(
        PROMPT,
        negative_prompt=negative_prompt or None,
        image=image if ours_image is None else ours_image,
        strength=strength,
        mask=mask if ours_mask is None else ours_mask,
        mask_blur=mask_blur,
        width=width if task == "Inpaint" else None,
        height=height if task == "Inpaint" else None,
        steps=steps,
        guidance_scale=guidance_scale,
        sampler=sampler,
        seed=0,
        num_images=num_images,
        latents=mx.array(noise),
        image_noise=mx.array(image_noise),
    )
    ours_array = np.stack([np.asarray(i, np.float64) for i in images])
    expected_array = np.stack([np.asarray(i, np.float64) for i in expected])
    diff = np.abs(ours_array - expected_array) if ours_array.shape == expected_array.shape else None
    if diff is not None:
        print(
            f"{family} {task} {sampler} steps={steps} strength={strength}: "
            f"mean {diff.mean():.4f}/255, max {diff.max():.0f}/255"
        )
    return ours_array, expected_array


IMG2IMG_CASES = [
    # family, sampler, steps, strength, guidance, num_images (the pipeline default 0.8: test_img2img_from_a_file)
    ("sd1", "ddim", 4, 0.5, 5.0, 2),
    ("sd1", "dpmpp_2m_karras", 3, 1.0, 7.5, 1),  # full schedule; diffusers still noises the image latents
    ("sd1", "dpmpp_2m", 10, 0.15, 1.0, 1),  # int(1.5) = 1 step left
    ("sd1", "heun", 4, 0.5, 7.5, 1),  # two timesteps per step: the tail starts at 2 * (steps - kept)
    ("sd2v", "ddim", 4, 0.6, 7.5, 1),
    ("turbo", "euler", 2, 0.5, 0.0, 1),  # the SD-Turbo img2img recipe: steps * strength = 1
    ("sdxl", "euler", 10, 0.3, 7.5, 1),  # the SDXL img2img default strength: 3 of 10 steps
    ("sdxl", "dpmpp_2m_karras", 3, 0.75, 5.0, 2),
]


@pytest.mark.parametrize("family,sampler,steps,strength,guidance,num_images", IMG2IMG_CASES)
def test_img2img_matches_diffusers(monkeypatch, pipelines, family, sampler, steps, strength, guidance, num_images):
    assert_images_close(*run_both(monkeypatch, pipelines, family, sampler, steps, strength, guidance, num_images))


def test_img2img_from_a_file_with_a_negative_prompt(monkeypatch, pipelines, tmp_path):
    path = tmp_path / "input.png"
    _test_image(45, 61, seed=3).save(path)
    # diffusers is given the PIL image, mlx_sd the path: loading must not change it
    # the SD img2img default strength: int(4 * 0.8) = 3 of 4 steps
    ours, expected = run_both(
        monkeypatch,
        pipelines,
        "sd1",
        "euler",
        4,
        0.8,
        7.5,
        image=Image.open(path).convert("RGB"),
        ours_image=path,
        negative_prompt="blurry",
    )
    assert expected.shape[1:3] == (56, 40)
    assert_images_close(ours, expected)


INPAINT_CASES = [
    # family, inpainting UNet (9 channels)?, sampler, steps, strength, guidance, num_images, mask blur, (width, height)
    ("sd1", False, "euler", 4, 1.0, 7.5, 1, 0, (64, 48)),  # the SD inpaint default strength
    ("sd1", False, "ddim", 4, 0.6, 5.0, 2, 2, (64, 48)),
    ("sd1", False, "dpmpp_2m", 4, 0.25, 7.5, 1, 0, (48, 64)),  # one step, and the last step pastes the image back
    ("sd2v", False, "dpmpp_2m_karras", 3, 0.75, 7.5, 1, 0, (64, 40)),
    ("sd1", True, "ddim", 4, 0.5, 7.5, 1, 3, (72, 48)),  # (strength 1: test_inpaint_with_a_mask_file)
    ("sdxl", False, "euler", 4, 0.9999, 7.5, 1, 0, (64, 48)),  # the SDXL inpaint default: int(3.9996) = 3 steps
    ("sdxl", True, "euler", 3, 1.0, 7.5, 2, 0, (64, 48)),
    ("sdxl", True, "ddim", 4, 0.6, 1.0, 1, 0, (64, 40)),
]


@pytest.mark.parametrize(
    "family,inpainting_unet,sampler,steps,strength,guidance,num_images,mask_blur,size", INPAINT_CASES
)
def test_inpaint_matches_diffusers(
    monkeypatch, pipelines, family, inpainting_unet, sampler, steps, strength, guidance, num_images, mask_blur, size
):
    ours, expected = run_both(
        monkeypatch,
        pipelines,
        family,
        sampler,
        steps,
        strength,
        guidance,
        num_images,
        mask=_test_mask(),
        mask_blur=mask_blur,
        inpainting_unet=inpainting_unet,
        width=size[0],
        height=size[1],
    )
    assert_images_close(ours, expected)


def test_inpaint_with_a_mask_file(monkeypatch, pipelines, tmp_path):
    path = tmp_path / "mask.png"
    _test_mask().convert("RGB").save(path)
    # diffusers is given what diffusers.utils.load_image makes of the file, mlx_sd the path
    ours, expected = run_both(
        monkeypatch,
        pipelines,
        "sd1",
        "euler",
        4,
        1.0,
        7.5,
        mask=Image.open(path).convert("RGB"),
        ours_mask=str(path),
        inpainting_unet=True,
        width=64,
        height=48,
    )
    assert_images_close(ours, expected)


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_strength_outside_0_1_is_an_error(pipelines, strength):
    _, ours = pipelines("turbo")
    with pytest.raises(ValueError, match="strength") as error:
        ours.generate("a cat", image=_test_image(), strength=strength, steps=2)
    assert "\n" not in str(error.value)


def test_strength_leaving_no_step_is_an_error(pipelines):
    # int(4 * 0.2) = 0 steps: diffusers' inpaint pipelines raise, its img2img pipelines fail on an empty schedule
    _, ours = pipelines("turbo")
    with pytest.raises(ValueError, match="strength") as error:
        ours.generate("a cat", image=_test_image(), strength=0.2, steps=4)
    assert "\n" not in str(error.value)


def test_bad_inputs_raise_one_line_errors(pipelines, tmp_path):
    _, ours = pipelines("sd1")
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    image, mask = _test_image(), _test_mask()
    cases = [
        (dict(image=str(text)), f"cannot read image {text}"),
        (dict(image=image, mask=str(text)), f"cannot read image {text}"),
        (dict(image=tmp_path / "missing.png"), "cannot read image"),
        (dict(image=image, mask=mask.resize((64, 45))), "same size: image is 67x45, mask is 64x45"),
        (dict(image=image, mask=Image.new("L", image.size, 0)), "mask is empty"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            ours.generate("a cat", width=64, height=48, steps=2, **kwargs)
        assert "\n" not in str(error.value)

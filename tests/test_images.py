"""Image and mask preprocessing against diffusers' VaeImageProcessor, configured as the pipelines configure it.

The reference is what a diffusers user gets: `diffusers.utils.load_image` (RGB, EXIF orientation applied) for
files, then the img2img/inpaint pipelines' `image_processor.preprocess(image, height=, width=)` and the inpaint
pipelines' `mask_processor.preprocess(mask, height=, width=)`, with `mask_processor.blur` applied first for a
blurred mask. Tolerance: exact (both sides do the same PIL resize and the same float32 arithmetic).
"""

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_sd.images import check_image_and_mask, default_size, load_image, preprocess_image, preprocess_mask

SIZES = [(64, 48), (48, 64), (72, 40), (64, 64), (16, 8)]  # (width, height), incl. up- and downscaling


@pytest.fixture(scope="module")
def processors():
    from diffusers.image_processor import VaeImageProcessor

    image_processor = VaeImageProcessor(vae_scale_factor=8)
    # StableDiffusionInpaintPipeline / StableDiffusionXLInpaintPipeline.__init__
    mask_processor = VaeImageProcessor(
        vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
    return image_processor, mask_processor


def _noise(rng, width, height, channels):
    # a smooth gradient plus noise: Lanczos ringing and clipping both show up
    ys, xs = np.mgrid[0:height, 0:width]
    base = (xs / width * 180 + ys / height * 60)[..., None]
    return np.clip(base + rng.normal(0, 50, (height, width, channels)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Named odd-sized inputs: PIL images of several modes and paths to PNG and JPEG files."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("images")
    rgb = Image.fromarray(_noise(rng, 67, 45, 3))
    rgba = Image.fromarray(_noise(rng, 67, 45, 4), "RGBA")
    gray = Image.fromarray(_noise(rng, 45, 67, 1)[..., 0], "L")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    rgba.save(folder / "rgba.png")
    rgb.save(folder / "photo.jpg", quality=90)
    # a JPEG whose EXIF says "rotate 90 degrees clockwise to display": load_image must transpose it
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_noise(rng, 53, 37, 3)).save(folder / "rotated.jpg", exif=exif)
    return {
        "rgb": rgb,
        "rgba": rgba,
        "gray": gray,
        "palette": palette,
        "png": str(folder / "rgba.png"),
        "jpeg": str(folder / "photo.jpg"),
        "rotated_jpeg": folder / "rotated.jpg",
    }


def _reference_image(processor, image, width=None, height=None):
    from diffusers.utils import load_image as diffusers_load_image

    image = diffusers_load_image(str(image) if not isinstance(image, Image.Image) else image)
    return processor.preprocess(image, height=height, width=width).permute(0, 2, 3, 1).numpy()  # (1, H, W, C)


@pytest.mark.parametrize("name", ["rgb", "rgba", "gray", "palette", "png", "jpeg", "rotated_jpeg"])
@pytest.mark.parametrize("width,height", SIZES)
def test_preprocess_image_matches_diffusers(processors, images, name, width, height):
    expected = _reference_image(processors[0], images[name], width, height)
    ours = preprocess_image(images[name], width, height)
    assert ours.dtype == mx.float32 and ours.shape == (1, height, width, 3)
    assert expected.min() < -0.5 and expected.max() > 0.5  # not a flat image
    np.testing.assert_array_equal(np.array(ours), expected)


@pytest.mark.parametrize("name", ["rgb", "gray", "png", "rotated_jpeg"])
def test_default_size_matches_the_img2img_pipelines(processors, images, name):
    # StableDiffusion(XL)Img2ImgPipeline call image_processor.preprocess(image) with no size: the image's own
    # size rounded down to multiples of vae_scale_factor
    expected = _reference_image(processors[0], images[name])
    width, height = default_size(images[name])
    assert (height, width) == expected.shape[1:3]
    np.testing.assert_array_equal(np.array(preprocess_image(images[name], width, height)), expected)


def test_default_size_rounds_down():
    assert default_size(Image.new("RGB", (67, 45))) == (64, 40)
    assert default_size(Image.new("RGB", (64, 64))) == (64, 64)
    assert default_size(Image.new("RGB", (1023, 769)), multiple=16) == (1008, 768)


def test_load_image_applies_exif_orientation(images):
    image = load_image(images["rotated_jpeg"])
    assert image.mode == "RGB" and image.size == (37, 53)


def _masks(rng):
    """Odd-sized masks: shapes with soft (anti-aliased) edges, values crowded around 0.5, colours, several modes."""
    ys, xs = np.mgrid[0:45, 0:67]
    ellipse = ((xs - 30) / 20.0) ** 2 + ((ys - 25) / 14.0) ** 2
    soft = np.clip((1.3 - ellipse) * 255, 0, 255).astype(np.uint8)
    near_half = rng.integers(120, 136, (45, 67)).astype(np.uint8)  # 127/255 < 0.5 <= 128/255
    colour = np.stack([soft, rng.integers(0, 256, (45, 67)), 255 - soft], -1).astype(np.uint8)
    return {
        "soft_l": Image.fromarray(soft, "L"),
        "soft_rgb": Image.fromarray(soft, "L").convert("RGB"),
        "near_half": Image.fromarray(near_half, "L"),
        "colour": Image.fromarray(colour),
        "binary_1bit": Image.fromarray(soft > 127).convert("1"),
        "palette": Image.fromarray(colour).convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "rgba": Image.fromarray(np.concatenate([colour, rng.integers(0, 256, (45, 67, 1))], -1).astype(np.uint8)),
    }


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    masks = _masks(np.random.default_rng(1))
    folder = tmp_path_factory.mktemp("masks")
    for name, source in [("png", "soft_rgb"), ("png_l", "soft_l"), ("png_1bit", "binary_1bit")]:
        masks[source].save(folder / f"{name}.png")
        masks[name] = str(folder / f"{name}.png")
    return masks


def _reference_mask(processor, mask, width, height, blur_radius=0):
    from diffusers.utils import load_image as diffusers_load_image

    if not isinstance(mask, Image.Image):
        mask = diffusers_load_image(mask)
    if blur_radius:
        mask = processor.blur(mask, blur_factor=blur_radius)
    return processor.preprocess(mask, height=height, width=width).permute(0, 2, 3, 1).numpy()  # (1, H, W, 1)


MASKS = ["soft_l", "soft_rgb", "near_half", "colour", "binary_1bit", "palette", "rgba", "png", "png_l", "png_1bit"]


@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("width,height", SIZES)
def test_preprocess_mask_matches_diffusers(processors, masks, name, width, height):
    # PIL masks go to the mask processor as they are (any mode), files through load_image, as a diffusers user does
    expected = _reference_mask(processors[1], masks[name], width, height)
    ours = np.array(preprocess_mask(masks[name], width, height))
    assert ours.dtype == np.float32 and ours.shape == (1, height, width, 1)
    assert set(np.unique(expected)) == {0.0, 1.0}  # both regions present: the comparison means something
    np.testing.assert_array_equal(ours, expected)


def test_mask_binarizes_at_one_half(processors):
    values = np.array([[0, 126, 127, 128, 129, 255]], np.uint8).repeat(8, 0).repeat(8, 1)  # (8, 48)
    mask = Image.fromarray(values, "L")
    ours = np.array(preprocess_mask(mask, 48, 8))[0, 0, ::8, 0]
    np.testing.assert_array_equal(ours, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(np.array(preprocess_mask(mask, 48, 8)), _reference_mask(processors[1], mask, 48, 8))


@pytest.mark.parametrize("blur_radius", [1, 3.5, 8])
@pytest.mark.parametrize("name", ["soft_l", "soft_rgb", "colour", "rgba", "png", "binary_1bit"])
def test_blurred_mask_matches_diffusers(processors, masks, name, blur_radius):
    # diffusers' blur cannot filter "1" (or "P") images; mlx_sd blurs them as "L", the reference does the same
    reference = masks[name].convert("L") if name == "binary_1bit" else masks[name]
    expected = _reference_mask(processors[1], reference, 72, 40, blur_radius)
    unblurred = _reference_mask(processors[1], masks[name], 72, 40)
    assert not np.array_equal(expected, unblurred)  # the blur changes the mask
    np.testing.assert_array_equal(np.array(preprocess_mask(masks[name], 72, 40, blur_radius=blur_radius)), expected)


def test_valid_image_and_mask_pass_the_check(images, masks):
    check_image_and_mask(images["rgb"], masks["soft_l"])
    check_image_and_mask(images["png"], masks["png"])


@pytest.mark.parametrize(
    "mask,message",
    [
        (Image.new("L", (64, 45), 255), "same size: image is 67x45, mask is 64x45"),
        (Image.new("RGB", (45, 67), "white"), "same size"),
        (Image.new("L", (67, 45), 0), "mask is empty"),
        (Image.new("RGB", (67, 45), (127, 127, 127)), "mask is empty"),  # binarizes to all zeros
    ],
)
def test_bad_masks_raise_one_line_errors(images, mask, message):
    with pytest.raises(ValueError, match=message) as error:
        check_image_and_mask(images["rgb"], mask)
    assert "\n" not in str(error.value)


def test_unreadable_files_raise_one_line_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), "red").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    for path, reason in [
        (text, "not an image file"),
        (tmp_path / "missing.png", "No such file"),
        (tmp_path, "Is a directory"),
        (truncated, ""),
    ]:
        for call in (
            lambda p: load_image(p),
            lambda p: preprocess_image(p, 64, 64),
            lambda p: preprocess_mask(p, 64, 64),
            lambda p: check_image_and_mask(p, p),
        ):
            with pytest.raises(ValueError, match=f"cannot read image {path}: {reason}") as error:
                call(path)
            assert "\n" not in str(error.value)

"""Input images and masks for image-to-image and inpainting, prepared as diffusers' VaeImageProcessor does."""

import struct

import mlx.core as mx
import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

# VaeImageProcessor's default `resample` ("lanczos"); `reducing_gap` stays None.
RESAMPLE = Image.Resampling.LANCZOS


def open_image(path):
    """The image file `path`, fully read; ValueError naming the file if it is not an image Pillow reads (a
    truncated or corrupt file, or more pixels than PIL.Image.MAX_IMAGE_PIXELS allows: a decompression bomb)."""
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened
    except UnidentifiedImageError:
        raise ValueError(f"cannot read image {path}: not an image file Pillow can open") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ValueError(f"cannot read image {path}: {reason.splitlines()[0][:200]}") from None


def load_image(image):
    """A PIL image or a path -> RGB PIL image with its EXIF orientation applied (diffusers.utils.load_image)."""
    if not isinstance(image, Image.Image):
        path, image = image, open_image(image)
        try:
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, KeyError, TypeError) as e:
            raise ValueError(f"cannot read image {path}: bad EXIF data ({e})") from None
    else:
        image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def default_size(image, multiple=8):
    """(width, height) of `image` rounded down to multiples of `multiple`: the size the pipelines use by default."""
    width, height = load_image(image).size
    return width - width % multiple, height - height % multiple


def preprocess_image(image, width, height):
    """PIL image or path -> (1, height, width, 3) float32 in [-1, 1], resized with Lanczos to (width, height)."""
    image = load_image(image).resize((width, height), resample=RESAMPLE)
    pixels = np.asarray(image).astype(np.float32) / 255.0  # (H, W, 3)
    return mx.array(2.0 * pixels[None] - 1.0)


def preprocess_mask(mask, width, height, blur_radius=0):
    """PIL image or path (loaded as RGB) -> (1, height, width, 1) float32 in {0, 1}, 1 where white (repaint).

    The inpaint pipelines' mask_processor: resize (Lanczos), grayscale, then binarize at 0.5. A `blur_radius` > 0
    first blurs the full-size mask like VaeImageProcessor.blur (PIL GaussianBlur), which softens the edge's position.
    """
    # A PIL mask keeps its mode, as the mask processor receives it (PIL resizes "1" and "P" images with NEAREST).
    mask = ImageOps.exif_transpose(mask) if isinstance(mask, Image.Image) else load_image(mask)
    if blur_radius > 0:
        if mask.mode in ("1", "P"):  # GaussianBlur cannot filter these modes (diffusers' blur raises)
            mask = mask.convert("L")
        mask = mask.filter(ImageFilter.GaussianBlur(blur_radius))
    mask = mask.resize((width, height), resample=RESAMPLE).convert("L")
    values = np.asarray(mask).astype(np.float32) / 255.0  # (H, W)
    return mx.array((values >= 0.5).astype(np.float32)[None, :, :, None])


def check_image_and_mask(image, mask):
    """Raises ValueError for an image and mask of different sizes, or a mask with nothing to repaint."""
    image, mask = load_image(image), load_image(mask)
    if image.size != mask.size:
        raise ValueError(
            f"image and mask must have the same size: image is {image.width}x{image.height}, "
            f"mask is {mask.width}x{mask.height}"
        )
    if mask.convert("L").getextrema()[1] < 128:  # binarized at 0.5, no pixel would be repainted
        raise ValueError("mask is empty: it has no white pixels (white marks the area to repaint)")

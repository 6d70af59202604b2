"""Shared test helpers: the real SD configs (tests/configs) and torch <-> MLX conversion."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

CONFIGS = Path(__file__).parent / "configs"
TOKENIZER_ASSETS = Path(__file__).parent.parent / "mlx_sd" / "assets" / "clip_tokenizer"

SD15 = "runwayml--stable-diffusion-v1-5"
SD21_BASE = "stabilityai--stable-diffusion-2-1-base"
SD21 = "stabilityai--stable-diffusion-2-1"
SD_TURBO = "stabilityai--sd-turbo"
SDXL = "stabilityai--stable-diffusion-xl-base-1.0"
SDXL_TURBO = "stabilityai--sdxl-turbo"


def real_config(model, component, name="config.json"):
    """The real config of one component of a real checkpoint, e.g. real_config(SD15, "unet")."""
    return json.loads((CONFIGS / model / component / name).read_text())


def write_tokenizer(model, dest, component="tokenizer"):
    """Writes a complete tokenizer folder (real vocabulary + the model's own special-token files) to dest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    src = CONFIGS / model / component
    if not src.is_dir():  # sd-turbo ships the SD 2.x tokenizer
        src = CONFIGS / SD21 / "tokenizer"
    for f in src.iterdir():
        shutil.copy(f, dest / f.name)
    for f in TOKENIZER_ASSETS.iterdir():
        shutil.copy(f, dest / f.name)
    return dest


def to_mx(t):
    """torch tensor -> MLX array (float32 unless integer)."""
    return mx.array(t.detach().cpu().numpy())


def to_np(a):
    return np.array(a.astype(mx.float32) if a.dtype in (mx.float16, mx.bfloat16) else a)


def nchw_to_nhwc(t):
    return to_mx(t.permute(0, 2, 3, 1))


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass
    yield

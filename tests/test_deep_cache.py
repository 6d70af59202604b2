"""unet.DeepCache (opt-in): the UNet's deep features reused between calls; the shallow path's wiring is exact."""

import mlx.core as mx
import numpy as np
import pytest

from helpers import make_pipeline
from mlx_sd import StableDiffusion
from mlx_sd.settings import GenerationSettings
from mlx_sd.unet import DeepCache, UNet2DConditionModel, UNetMidBlock2DCrossAttn

SETTINGS = dict(width=64, height=48, steps=6, guidance_scale=7.5, sampler="euler", seed=4)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    make_pipeline(request.param, folder)
    return folder


def unet_inputs(pipe):
    """A guided batch of 2 (latents, conditioning) for the tiny UNet."""
    x = mx.array(np.random.default_rng(0).standard_normal((2, 6, 8, 4)).astype(np.float32))
    conditioning = pipe.encode_prompt(["a cat"], ["blurry"], 7.5)
    extra = dict(conditioning.extra)
    if pipe.size_conditioning:
        extra["time_ids"] = mx.array([[48.0, 64.0, 0.0, 0.0, 48.0, 64.0]] * 2)
    return x, conditioning.embeds, extra


def test_shallow_call_on_the_full_calls_features_is_the_full_call(folder, monkeypatch):
    """With the features that a full call kept for the same inputs, the shallow path recomputes exactly the full
    output; it runs neither the mid block nor the deeper blocks; every `interval`-th call is full."""
    pipe = StableDiffusion.from_pretrained(folder, dtype="float32")
    x, embeds, extra = unet_inputs(pipe)
    expected = np.array(pipe.unet(x, 500, embeds, **extra))
    mids = []
    mid = UNetMidBlock2DCrossAttn.__call__
    monkeypatch.setattr(UNetMidBlock2DCrossAttn, "__call__", lambda m, *a: mids.append(1) or mid(m, *a))
    cache = DeepCache(2)
    outputs = [np.array(pipe.unet(x, 500, embeds, **extra, cache=cache)) for _ in range(3)]
    assert len(mids) == 2 and cache.calls == 3  # calls 0 and 2 full, call 1 shallow
    for out in outputs:
        np.testing.assert_array_equal(out, expected)


def test_generation_with_deep_cache(folder, monkeypatch):
    """deep_cache=3 over 6 steps: 2 full and 4 shallow UNet calls, another image than without (the tiny random
    model says nothing of the quality), written to and read back from the infotext; low_memory's guidance
    halves keep one cache each and give the batch-2 image; deep_cache=1 changes nothing."""
    pipe = StableDiffusion.from_pretrained(folder, dtype="float32")
    plain = np.asarray(pipe.generate("a cat", **SETTINGS)[0], np.int16)
    assert np.array_equal(np.asarray(pipe.generate("a cat", **SETTINGS, deep_cache=1)[0], np.int16), plain)
    shallow = []
    call = UNet2DConditionModel.shallow
    monkeypatch.setattr(UNet2DConditionModel, "shallow", lambda m, *a: shallow.append(1) or call(m, *a))
    images = pipe.generate("a cat", **SETTINGS, deep_cache=3)
    assert len(shallow) == 4
    cached = np.asarray(images[0], np.int16)
    assert np.abs(cached - plain).max() > 0
    assert "DeepCache interval: 3" in images.parameters
    assert GenerationSettings.from_infotext(images.parameters)[0].deep_cache == 3
    lean = StableDiffusion.from_pretrained(folder, dtype="float32", low_memory=True)
    halves = np.asarray(lean.generate("a cat", **SETTINGS, deep_cache=3)[0], np.int16)
    assert len(shallow) == 4 + 8  # two halves per step
    assert np.abs(halves - cached).max() <= 1


def test_shallow_call_adds_controlnet_residuals_to_its_skips(folder):
    """ControlNet residuals on a shallow call: the first two (conv_in's and the first layer's skips), as the full
    call adds them; the result is again exactly the full call's."""
    pipe = StableDiffusion.from_pretrained(folder, dtype="float32")
    unet = pipe.unet
    x, embeds, extra = unet_inputs(pipe)
    emb = unet.embedding(x, 500, extra.get("text_embeds"), extra.get("time_ids"))
    h = unet.conv_in(x)
    shapes = [h.shape]
    for block in unet.down_blocks:
        h, states = block(h, emb, embeds)
        shapes += [s.shape for s in states]
    keys = mx.random.split(mx.random.key(1), len(shapes) + 1)
    residuals = dict(
        down_residuals=[mx.random.normal(s, key=k) for s, k in zip(shapes, keys)],
        mid_residual=mx.random.normal(h.shape, key=keys[-1]),
    )
    expected = np.array(unet(x, 500, embeds, **extra, **residuals))
    cache = DeepCache(2)
    for _ in range(2):
        np.testing.assert_array_equal(np.array(unet(x, 500, embeds, **extra, **residuals, cache=cache)), expected)

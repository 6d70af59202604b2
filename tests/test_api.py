"""The Python API beyond one image: A1111 prompts, callbacks, cancelling, low memory, unloading, previews."""

import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from helpers import assert_images_close, make_pipeline, run_both
from mlx_sd import GenerationCancelled, StableDiffusion
from mlx_sd.pipeline import Freed
from mlx_sd.prompts import chunk_prompt
from mlx_sd.unet import UNet2DConditionModel

LONG = ", ".join(
    f"a detailed {w} in the style of an old master"
    for w in ["castle", "river", "forest", "mountain", "village", "bridge", "harbour", "meadow", "lighthouse"]
)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    reference = make_pipeline("sd1", folder)
    return folder, reference, StableDiffusion.from_pretrained(folder, dtype="float32")


def reference_hidden(reference, ids):
    with torch.no_grad():
        return reference.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()


def test_long_prompts_are_chunks_encoded_separately(sd1):
    _, reference, ours = sd1
    chunks = chunk_prompt(ours.tokenizer, LONG)
    assert len(chunks) == 2
    expected = np.concatenate(list(reference_hidden(reference, chunks.ids)), axis=0)[None]  # (1, 154, D)
    embeds = np.array(ours.encode_prompt([LONG], [""], 0.0).embeds)
    np.testing.assert_allclose(embeds, expected, atol=1e-5, rtol=1e-5)


def test_negative_prompt_is_padded_to_the_same_chunks(sd1):
    _, reference, ours = sd1
    conditioning = ours.encode_prompt([LONG], ["blurry"], 7.5)
    negative = chunk_prompt(ours.tokenizer, "blurry")
    empty = chunk_prompt(ours.tokenizer, "")
    expected = np.concatenate([reference_hidden(reference, negative.ids)[0], reference_hidden(reference, empty.ids)[0]])
    assert conditioning.embeds.shape[1] == 154
    np.testing.assert_allclose(np.array(conditioning.embeds[0]), expected, atol=1e-5, rtol=1e-5)


def test_weighted_prompt_follows_a1111(sd1):
    _, reference, ours = sd1
    prompt = "a (red:1.5) house on a [hill]"
    chunks = chunk_prompt(ours.tokenizer, prompt)
    assert sorted(set(np.round(chunks.weights[0], 4))) == [round(1 / 1.1, 4), 1.0, 1.5]
    z = reference_hidden(reference, chunks.ids).astype(np.float64)  # (1, 77, D)
    weighted = z * chunks.weights[..., None]
    expected = weighted * (z.mean() / weighted.mean())  # A1111 "Original" emphasis
    embeds = np.array(ours.encode_prompt([prompt], [""], 0.0).embeds)
    np.testing.assert_allclose(embeds, expected, atol=1e-5, rtol=1e-4)
    assert np.abs(embeds - z).max() > 0.1  # the weights changed something


def test_truncated_long_prompt_matches_diffusers(sd1):
    _, reference, ours = sd1
    with pytest.warns(UserWarning, match="cut off"):
        ours_images, expected = run_both(reference, ours, "euler", 48, 48, 2, 7.5, prompt=LONG, truncate_prompt=True)
    assert_images_close(ours_images, expected)


def test_callback_gets_every_step_and_cancel_stops(sd1):
    _, _, ours = sd1
    seen = []
    # euler: one model call per step (the sd1 default, PLMS, makes n + 1; Heun and DPM2 2n - 1)
    settings = dict(width=32, height=32, seed=1, sampler="euler")
    ours.generate("a cat", steps=3, callback=lambda i, n, x: seen.append((i, n, x.shape)), **settings)
    assert seen == [(1, 3, (1, 4, 4, 4)), (2, 3, (1, 4, 4, 4)), (3, 3, (1, 4, 4, 4))]

    cancel = threading.Event()
    steps = []

    def stop_after_two(i, n, x):
        steps.append(i)
        if i == 2:
            cancel.set()

    with pytest.raises(GenerationCancelled, match="before step 3 of 5"):
        ours.generate("a cat", steps=5, callback=stop_after_two, cancel=cancel, **settings)
    assert steps == [1, 2]


def test_result_reports_timings_and_peak_memory(sd1):
    _, _, ours = sd1
    images = ours.generate("a cat", width=32, height=32, steps=2, seed=5)
    assert set(images.timings) == {"text_encoder", "denoise", "vae"}
    assert images.peak_memory > 0 and images.settings.seed == 5 and "Seed: 5," in images.parameters


def test_low_memory_keeps_one_phase_of_models_and_gives_the_same_image(sd1):
    """low_memory: no model in memory once loaded, then the text encoders while encoding, the UNet while denoising,
    the VAE while decoding; each read again from the folder for its phase of the next generation."""
    folder, _, ours = sd1
    expected = ours.generate("a cat", width=32, height=32, steps=2, seed=2)[0]
    lean = StableDiffusion.from_pretrained(folder, dtype="float32", low_memory=True)
    assert lean.parameters() == [] and all(isinstance(getattr(lean, name), Freed) for name in lean.models)
    in_memory = []

    def record(*_):
        in_memory.append({name for name in lean.models if isinstance(getattr(lean, name), nn.Module)})

    first = lean.generate("a cat", width=32, height=32, steps=2, seed=2, callback=record)[0]
    assert in_memory and all(names == {"unet"} for names in in_memory)
    assert isinstance(lean.text_encoder, Freed) and isinstance(lean.unet, Freed) and isinstance(lean.vae, nn.Module)
    assert lean.unet.config.sample_size == ours.unet.config.sample_size  # configs stay for checking settings
    second = lean.generate("a cat", width=32, height=32, steps=2, seed=2)[0]  # everything read again
    # low_memory runs the guided batch's halves as two calls: float32 rounding may differ by a last bit, which
    # can move a pixel by one level; the two low_memory images take the same path and are identical
    assert np.array_equal(np.asarray(first), np.asarray(second))
    difference = np.abs(np.asarray(first, np.int16) - np.asarray(expected, np.int16))
    assert difference.max() <= 1 and difference.mean() < 0.01
    # a pipeline made from components has no folder to read models again from: low_memory keeps them
    made = StableDiffusion(
        {name: getattr(ours, name) for name in ("tokenizer", "text_encoder", "unet", "vae")}, ours.scheduler_config
    )
    made.low_memory = True
    made.generate("a cat", width=32, height=32, steps=1, seed=2)
    assert all(isinstance(getattr(made, name), nn.Module) for name in made.models)
    with pytest.raises(RuntimeError, match="no model folder"):
        made.free("unet")


def test_unload_and_context_manager(sd1):
    folder, _, _ = sd1
    with StableDiffusion.from_pretrained(folder, dtype="float32") as pipe:
        pipe.generate("a cat", width=32, height=32, steps=1, seed=0)
    assert pipe.unet is None and pipe.vae is None
    with pytest.raises(RuntimeError, match="unloaded"):
        pipe.generate("a cat", width=32, height=32, steps=1, seed=0)


def test_decode_preview_is_the_linear_latent_map(sd1):
    _, _, ours = sd1
    # left half one latent colour, right half another (uniform regions survive the bilinear upscale)
    colours = np.array([[0.9, -0.4, 0.3, -0.6], [-0.5, 0.8, -0.2, 0.7]], np.float32)
    latents = np.concatenate([np.broadcast_to(colours[0], (1, 4, 3, 4)), np.broadcast_to(colours[1], (1, 4, 3, 4))], 2)
    preview = np.asarray(ours.decode_preview(mx.array(latents))[0], np.float64)
    assert preview.shape == (32, 48, 3)
    factors = np.array(
        [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
    )
    rgb = np.clip((colours @ factors) / 2 + 0.5, 0, 1) * 255
    np.testing.assert_allclose(preview[:, :16], np.broadcast_to(rgb[0], (32, 16, 3)), atol=1)
    np.testing.assert_allclose(preview[:, -16:], np.broadcast_to(rgb[1], (32, 16, 3)), atol=1)


def test_tiled_decode_decodes_each_image_in_blended_tiles(sd1):
    """Above 64 x 64 latents (512 px) the final latents are decoded by decode_tiled, image by image; low_memory
    pipelines do so unless told otherwise. 80 x 8 latents: two tiles blended over 16 latents."""
    folder, _, ours = sd1
    final = {}

    def keep(step, total, latents):
        final["latents"] = latents

    kwargs = dict(width=640, height=64, steps=2, seed=4, num_images=2, guidance_scale=0)
    tiled = ours.generate("a wide harbour", tiled_decode=True, callback=keep, **kwargs)
    z = final["latents"] / ours.vae.config.scaling_factor
    per_image = [np.array(ours.vae.decode_tiled(z[i : i + 1]))[0] for i in range(2)]
    expected = np.clip(np.stack(per_image) / 2 + 0.5, 0, 1)
    for image, want in zip(tiled, expected):
        assert np.abs(np.asarray(image, dtype=np.float64) - want * 255).max() <= 0.5 + 1e-3  # to_pil rounding
    untiled = ours.generate("a wide harbour", **kwargs)
    difference = [np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b)).mean() for a, b in zip(tiled, untiled)]
    assert all(0 < d < 0.1 * 255 for d in difference)  # tiles see less context: close, but not the same
    lean = StableDiffusion.from_pretrained(folder, dtype="float32", low_memory=True)
    for a, b in zip(lean.generate("a wide harbour", **kwargs), tiled):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(lean.generate("a wide harbour", tiled_decode=False, **kwargs), untiled):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_low_memory_splits_guidance_into_two_unet_calls(tmp_path, monkeypatch):
    """low_memory runs the negative and positive halves as separate UNet calls (SDXL: with their pooled
    embeddings and time ids) and gives the same image."""
    make_pipeline("sdxl", tmp_path)
    kwargs = dict(negative_prompt="blurry", width=48, height=40, steps=2, guidance_scale=5.0, seed=3, num_images=2)
    expected = StableDiffusion.from_pretrained(tmp_path, dtype="float32").generate("a cat", **kwargs)
    lean = StableDiffusion.from_pretrained(tmp_path, dtype="float32", low_memory=True)
    batches = []
    call = UNet2DConditionModel.__call__
    monkeypatch.setattr(
        UNet2DConditionModel, "__call__", lambda m, x, *a, **k: batches.append(x.shape[0]) or call(m, x, *a, **k)
    )
    images = lean.generate("a cat", **kwargs)
    assert batches == [2] * 4  # 2 steps x (negative, positive), each of the 2 images
    for a, b in zip(images, expected):
        assert np.abs(np.asarray(a, np.float64) - np.asarray(b)).max() <= 1

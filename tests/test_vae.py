"""Parity of mlx_sd.vae.AutoencoderKL with diffusers' AutoencoderKL on the same random weights."""

import gc
import time

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.torch import load_file, save_file

from helpers import SD15, SDXL, nchw_to_nhwc, random_vae, real_config, to_np
from mlx_sd import convolution
from mlx_sd.norms import NORM_BLOCK
from mlx_sd.vae import AutoencoderConfig, AutoencoderKL, GroupNorm, sanitize
from mlx_sd.weights import ModelLoadError, load_strict, read_json, read_safetensors

TINY = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "sample_size": 32,
}
TINY_VARIANTS = {
    "attention": TINY,
    "no_attention_no_quant": {
        **TINY,
        "norm_num_groups": 32,
        "mid_block_add_attention": False,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
}
# float32 on both sides; the tiny model's outputs are O(1) and differ by ~3e-6 (summation order in convs,
# GroupNorm and attention), so 1e-4 leaves margin while any layout or wiring error shows up at O(0.1).
TINY_TOL = {"atol": 1e-4, "rtol": 1e-4}


def reference_outputs(model, image, latents):
    with torch.no_grad():
        dist = model.encode(image).latent_dist
        sample = model.decode(latents).sample
    return dist.mean, dist.logvar, sample


def load_ours(folder):
    config = AutoencoderConfig.from_dict(read_json(folder / "config.json"))
    return load_strict(AutoencoderKL(config), sanitize(read_safetensors(folder)), "vae")


def run_ours(model, image, latents):
    mean, logvar = model.encode(nchw_to_nhwc(image))
    sample = model.decode(nchw_to_nhwc(latents))
    mx.eval(mean, logvar, sample)
    return mean, logvar, sample


def assert_close(ours, ref, **tol):
    for name, a, b in zip(("mean", "logvar", "decoded"), ours, ref):
        np.testing.assert_allclose(to_np(a), b.permute(0, 2, 3, 1).numpy(), err_msg=name, **tol)


def max_abs_diffs(ours, ref):
    return {
        name: float(np.abs(to_np(a) - b.permute(0, 2, 3, 1).numpy()).max())
        for name, a, b in zip(("mean", "logvar", "decoded"), ours, ref)
    }


@pytest.fixture(scope="module", params=sorted(TINY_VARIANTS))
def tiny(request, tmp_path_factory):
    """(folder saved by save_pretrained, image, latents, diffusers outputs) for one tiny config."""
    torch.manual_seed(0)
    model = random_vae(TINY_VARIANTS[request.param])
    with torch.no_grad():
        if model.quant_conv is not None:  # push two logvar channels past diffusers' clamp to [-30, 20]
            model.quant_conv.bias[4] += 40.0
            model.quant_conv.bias[5] -= 60.0
        # With no input bias, the low-amplitude second sample below gives the first GroupNorms a variance
        # near their eps, so a wrong eps (1e-5 instead of 1e-6) fails the test.
        model.encoder.conv_in.bias.zero_()
        model.decoder.conv_in.bias.zero_()
    image = torch.rand(2, 3, 48, 32) * 2 - 1  # non-square
    image[1] *= 1e-3
    latents = torch.randn(2, 4, 6, 5)  # non-square
    latents[1] *= 1e-3
    folder = tmp_path_factory.mktemp(f"vae_{request.param}")
    model.save_pretrained(folder)
    ref = reference_outputs(model, image, latents)
    if model.quant_conv is not None:
        assert ref[1].max() == 20.0 and ref[1].min() == -30.0  # the clamp is exercised
    return folder, image, latents, ref


def test_tiny_parity(tiny):
    folder, image, latents, ref = tiny
    ours = run_ours(load_ours(folder), image, latents)
    assert ours[0].shape == (2, 24, 16, 4) and ours[2].shape == (2, 12, 10, 3)
    print("tiny max abs diff", folder.name, max_abs_diffs(ours, ref))
    assert_close(ours, ref, **TINY_TOL)


def legacy_weights(weights, conv_shaped):
    """The same weights under the pre-0.14 attention names, optionally with conv-shaped (O, I, 1, 1) projections."""
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in weights.items():
        for new, old in renames.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if conv_shaped and value.ndim == 2:
                    value = value[:, :, None, None].contiguous()  # (O, I) -> (O, I, 1, 1)
        legacy[key] = value
    return legacy


@pytest.mark.parametrize("tiny", ["attention"], indirect=True)
@pytest.mark.parametrize("conv_shaped", [False, True])
def test_legacy_attention_names(tiny, tmp_path, conv_shaped):
    folder, image, latents, ref = tiny
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    legacy = legacy_weights(weights, conv_shaped)
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(legacy, tmp_path / "diffusion_pytorch_model.safetensors")
    ours = run_ours(load_ours(tmp_path), image, latents)
    assert_close(ours, ref, **TINY_TOL)


@pytest.mark.parametrize("tiny", ["attention"], indirect=True)
def test_legacy_names_are_what_diffusers_accepts(tiny, tmp_path):
    """Guards the legacy fixture above: diffusers itself loads those names to the same outputs."""
    folder, image, latents, ref = tiny
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    legacy = legacy_weights(weights, conv_shaped=False)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(legacy, tmp_path / "diffusion_pytorch_model.safetensors")
    reloaded = TorchAutoencoderKL.from_pretrained(tmp_path, low_cpu_mem_usage=False).eval()
    for a, b in zip(reference_outputs(reloaded, image, latents), ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_strict_loading_names_bad_keys(tiny):
    folder = tiny[0]
    config = AutoencoderConfig.from_dict(read_json(folder / "config.json"))
    weights = sanitize(read_safetensors(folder))
    del weights["decoder.up_blocks.1.resnets.1.conv2.weight"]
    weights["decoder.up_blocks.1.upsamplers.0.conv.weight"] = mx.zeros((3, 3, 3, 3))
    with pytest.raises(ModelLoadError) as err:
        load_strict(AutoencoderKL(config), weights, "vae")
    assert "decoder.up_blocks.1.resnets.1.conv2.weight" in str(err.value)
    assert "decoder.up_blocks.1.upsamplers.0.conv.weight" in str(err.value)


def test_config_from_dict():
    config = AutoencoderConfig.from_dict(real_config(SDXL, "vae"))
    assert config.scaling_factor == 0.13025 and config.force_upcast
    assert config.block_out_channels == [128, 256, 512, 512] and config.layers_per_block == 2
    config = AutoencoderConfig.from_dict(real_config(SD15, "vae"))
    assert config.scaling_factor == 0.18215 and config.shift_factor is None and config.use_quant_conv
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        AutoencoderKL(AutoencoderConfig.from_dict({**TINY, "down_block_types": ["AttnDownEncoderBlock2D"] * 2}))


def test_parity_on_the_cpu_blocked_paths(monkeypatch, tmp_path):
    """64-channel blocks at 128 x 128 pixels: on the CPU the resnets' convolutions take the numpy path (the
    second writing over the first's output) and the GroupNorms' squares run in blocks of 4 rows; the same
    tolerance against diffusers as the tiny models'."""
    config = {**TINY, "block_out_channels": [64, 64], "norm_num_groups": 32}
    torch.manual_seed(0)
    reference = random_vae(config)
    image, latents = torch.rand(1, 3, 128, 128) * 2 - 1, torch.randn(1, 4, 64, 64)
    ref = reference_outputs(reference, image, latents)
    reference.save_pretrained(tmp_path)
    ours_model = load_ours(tmp_path)
    monkeypatch.setattr("mlx_sd.norms.NORM_BLOCK", 4 * 128 * 64)
    calls = []
    numpy_conv = convolution._numpy_conv3x3
    monkeypatch.setattr(convolution, "_numpy_conv3x3", lambda *a: calls.append(a[-1]) or numpy_conv(*a))
    ours = run_ours(ours_model, image, latents)
    if mx.default_device() == mx.cpu:
        assert True in calls  # an overwriting call ran
    assert_close(ours, ref, **TINY_TOL)


# Full size: 24 resnets deep with random weights; float32 summation-order noise grows with depth and the
# 512-channel convs, so the tolerance is relative to the output scale (measured diffs are ~1e-5 of it).
@pytest.mark.fullsize
@pytest.mark.parametrize("model_name", [SD15, SDXL])
def test_fullsize_parity(model_name, tmp_path):
    torch.manual_seed(0)
    reference = random_vae(real_config(model_name, "vae"))
    image = torch.rand(1, 3, 64, 48) * 2 - 1
    latents = torch.randn(1, 4, 8, 6)
    start = time.perf_counter()
    ref = reference_outputs(reference, image, latents)
    torch_s = time.perf_counter() - start
    reference.save_pretrained(tmp_path)
    del reference
    gc.collect()

    ours_model = load_ours(tmp_path)
    start = time.perf_counter()
    ours = run_ours(ours_model, image, latents)
    mlx_s = time.perf_counter() - start
    assert ours[0].shape == (1, 8, 6, 4) and ours[2].shape == (1, 64, 48, 3)
    diffs = max_abs_diffs(ours, ref)
    scales = {name: float(r.abs().max()) for name, r in zip(("mean", "logvar", "decoded"), ref)}
    print(f"\n{model_name} vae: max abs diff {diffs}, ref max abs {scales}, torch {torch_s:.2f} s, mlx {mlx_s:.2f} s")
    for name in diffs:
        assert diffs[name] <= 1e-4 * max(scales[name], 1.0), name


@pytest.mark.parametrize("shape, groups", [((2, 37, 41, 64), 32), ((1, 512, 512, 128), 32)])
def test_group_norm_matches_torch_in_less_memory(shape, groups):
    """Against torch's GroupNorm in float64: max abs error <= 2e-4 (measured 3.1e-6 at 1M values per group of
    mean 1 and deviation 3, where MLX's nn.GroupNorm errs by 4e-3); on the CPU backend the peak above the input
    stays under 1.2x the input's size, its output and a block of squared deviations, where the input spans
    several blocks (MLX's transposing version: 5x; one pass over the whole input: 2x)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    weight, bias = rng.standard_normal(shape[-1]).astype(np.float32), rng.standard_normal(shape[-1]).astype(np.float32)
    norm = GroupNorm(groups, shape[-1], eps=1e-6, pytorch_compatible=True)
    norm.weight, norm.bias = mx.array(weight), mx.array(bias)
    x_mx = mx.array(x)
    mx.eval(x_mx, norm.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    got = norm(x_mx)
    mx.eval(got)
    peak = mx.get_peak_memory() - base
    ref = torch.nn.GroupNorm(groups, shape[-1], eps=1e-6).double()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(weight))
        ref.bias.copy_(torch.from_numpy(bias))
        expected = ref(torch.from_numpy(x).double().permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.array(got), expected, atol=2e-4, rtol=0)
    if mx.default_device() == mx.cpu:  # the squares of the small input are one block
        assert peak <= (1.2 if x.size > NORM_BLOCK else 2.1) * x.nbytes


def test_decoder_peak_memory(monkeypatch):
    """On the CPU the decoder's peak above its weights and latents stays under 1.5x its largest activation
    (a 128-channel upsampler output at 256 x 256 here) and 24 MiB of blocks (two workers' residual rows, 8 MiB
    at most here): the last block's 128 -> 64 resnet holds its input and its 64-channel first convolution, whose
    buffer the second writes over, and nothing more. (A loop over the blocks kept each block's input alive
    through its later resnets, and the GroupNorm's squared deviations and a second output took their full sizes:
    the SD VAE at 512 x 512, 646 -> 395 MiB.)"""
    if mx.default_device() != mx.cpu:
        pytest.skip("the blocked paths are CPU paths")
    config = AutoencoderConfig(
        block_out_channels=(64, 128, 128, 128),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    # smaller blocks for MLX's own (unfolding) convolutions at 32 x 32 and 64 x 64, so that the peak is the
    # numpy path's at 256 x 256, as at full size
    monkeypatch.setattr("mlx_sd.convolution.CONV_BLOCK", 2**20)
    monkeypatch.setattr("mlx_sd.convolution.width", lambda: 2)  # the numpy path's row blocks two at a time
    vae = AutoencoderKL(config)
    z = mx.random.normal((1, 32, 32, 4), key=mx.random.key(0))
    mx.eval(vae.parameters(), z)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    image = vae.decode(z)
    mx.eval(image)
    largest = 256 * 256 * 128 * 4
    assert image.shape == (1, 256, 256, 3)
    assert mx.get_peak_memory() - base < 1.5 * largest + 24 * 2**20

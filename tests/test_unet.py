"""Parity of mlx_sd.unet with diffusers' UNet2DConditionModel on the same random weights (float32)."""

import gc
import json
import time

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.embeddings import get_timestep_embedding
from mlx.utils import tree_flatten

from helpers import SD15, SD21, SD21_BASE, SD_TURBO, SDXL, SDXL_TURBO, nchw_to_nhwc, real_config, to_mx
from mlx_sd.quantize import quantize_model
from mlx_sd.unet import (
    UNet2DConditionModel,
    UNetConfig,
    compile_unet,
    sanitize,
    timestep_embedding,
    upsample_nearest,
)
from mlx_sd.weights import ModelLoadError, load_strict, read_safetensors

CA, D, CU, U = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
TEXT_EMBED_DIM = 24
TINY_COMMON = dict(block_out_channels=[32, 32, 64], layers_per_block=2, norm_num_groups=8, cross_attention_dim=32)
TINY = {
    # SD 1.x: 1x1 conv proj_in/proj_out, one int head count for every block
    "sd1": dict(TINY_COMMON, attention_head_dim=2, down_block_types=[CA, CA, D], up_block_types=[U, CU, CU]),
    # SD 2.x: linear projections, per-block head counts, upcast_attention
    "sd2": dict(
        TINY_COMMON,
        attention_head_dim=[2, 4, 4],
        down_block_types=[CA, CA, D],
        up_block_types=[U, CU, CU],
        use_linear_projection=True,
        upcast_attention=True,
    ),
    # SDXL: DownBlock2D first, per-block transformer depth, text_time added conditioning
    "sdxl": dict(
        TINY_COMMON,
        attention_head_dim=[1, 2, 4],
        down_block_types=[D, CA, CA],
        up_block_types=[CU, CU, U],
        transformer_layers_per_block=[1, 1, 2],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TEXT_EMBED_DIM + 6 * 8,
    ),
}
# float32 on both sides, outputs of magnitude ~1: only summation order differs (measured max 1.8e-6);
# tight enough that tanh-approximate gelu (5e-5) fails
ATOL, RTOL = 2e-5, 2e-5


def randomize_norms(model):
    """Default init leaves GroupNorm/LayerNorm at weight 1, bias 0; random affines catch swapped norms."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)


def make_inputs(cfg, batch, height, width, seq_len=7):
    """Random torch inputs (NCHW sample) for a UNet built from the diffusers config dict `cfg`."""
    ctx_dim = cfg["cross_attention_dim"]
    inputs = dict(
        sample=torch.randn(batch, cfg.get("in_channels", 4), height, width),
        encoder_hidden_states=torch.randn(batch, seq_len, ctx_dim),
    )
    if cfg.get("addition_embed_type") == "text_time":
        text_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        sizes = [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 512.0, 16.0, 8.0, 832.0, 1216.0]]
        inputs["text_embeds"] = torch.randn(batch, text_dim)
        inputs["time_ids"] = torch.tensor(sizes * batch)[:batch]
    return inputs


def run_torch(model, inputs, timestep):
    added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
    with torch.no_grad():
        out = model(inputs["sample"], timestep, inputs["encoder_hidden_states"], added_cond_kwargs=added or None).sample
    return out.numpy()


def run_mlx(model, inputs, timestep):
    extra = {k: to_mx(inputs[k]) for k in ("text_embeds", "time_ids") if k in inputs}
    out = model(nchw_to_nhwc(inputs["sample"]), timestep, to_mx(inputs["encoder_hidden_states"]), **extra)
    mx.eval(out)
    return np.array(out).transpose(0, 3, 1, 2)  # NHWC -> NCHW


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    """(diffusers config, torch model, our model loaded from the torch model's save_pretrained folder)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: OpenMP threads only spin on the shared cores
    torch.manual_seed(0)
    ref = TorchUNet(**TINY[request.param]).eval()
    randomize_norms(ref)
    folder = tmp_path_factory.mktemp(f"unet_{request.param}")
    ref.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    ours = UNet2DConditionModel(UNetConfig.from_dict(config))
    load_strict(ours, sanitize(read_safetensors(folder)), "unet")
    yield config, ref, ours, folder
    torch.set_num_threads(threads)


# (10, 7) is not a multiple of 2**2: diffusers forwards upsample_size and interpolates 3x2 -> 5x4 -> 10x7
@pytest.mark.parametrize("size", [(10, 7), (8, 12)])
def test_unet_matches_diffusers(tiny, size):
    config, ref, ours, _ = tiny
    inputs = make_inputs(config, 2, *size)
    expected = run_torch(ref, inputs, torch.tensor([999.0, 500.5]))
    got = run_mlx(ours, inputs, mx.array([999.0, 500.5]))
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "torch_t, mlx_t",
    [(999.0, 999.0), (10, 10), (torch.tensor(500.5), mx.array(500.5))],
    ids=["float", "int", "0-d"],
)
def test_unet_scalar_timesteps(tiny, torch_t, mlx_t):
    config, ref, ours, _ = tiny
    inputs = make_inputs(config, 2, 6, 5)
    np.testing.assert_allclose(run_mlx(ours, inputs, mlx_t), run_torch(ref, inputs, torch_t), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dim, flip, shift", [(320, True, 0), (256, True, 0), (33, False, 1)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    t = [0.0, 1.0, 10.0, 500.5, 999.0, 1024.0]
    expected = get_timestep_embedding(torch.tensor(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    got = np.array(timestep_embedding(mx.array(t), dim, flip, shift))
    # torch's float32 exp is not correctly rounded: a few frequencies differ by an ulp, times t ~1e3 gives 6e-5
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "src, dst", [((3, 2), (5, 4)), ((4, 5), (7, 10)), ((5, 7), (10, 13)), ((14, 6), (20, 10)), ((3, 5), (6, 10))]
)
def test_upsample_nearest_matches_torch_exactly(src, dst):
    x = torch.randn(1, 3, *src)
    expected = F.interpolate(x, size=dst, mode="nearest").permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.array(upsample_nearest(nchw_to_nhwc(x), dst)), expected)


def test_compiled_unet_reads_current_weights_and_structure(tiny):
    """compile_unet equals the eager UNet, and follows weights replaced after its first call (LoRA merges) and
    modules replaced by others (quantized layers, wrappers with the same parameters)."""
    config, _, _, folder = tiny
    unet = load_strict(UNet2DConditionModel(UNetConfig.from_dict(config)), sanitize(read_safetensors(folder)), "unet")
    inputs = make_inputs(config, 2, 8, 6)
    compiled = compile_unet(unet)

    def check():  # within float32 rounding: eagerly the CPU attention's softmax runs in numpy, traced in MLX
        expected, got = run_mlx(unet, inputs, 500.0), run_mlx(compiled, inputs, 500.0)
        np.testing.assert_allclose(got, expected, atol=5e-6, rtol=1e-6)
        return got

    first = check()
    attn = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    attn.to_q.weight = attn.to_q.weight + 0.5  # merged in place of the old array
    unet.conv_out.weight = unet.conv_out.weight * 2
    second = check()
    assert np.abs(second - first).max() > 1e-2

    class Doubled(type(attn.to_v)):  # same parameters, another computation
        def __call__(self, x):
            return 2 * super().__call__(x)

    doubled = Doubled(*attn.to_v.weight.shape[::-1], bias=False)
    doubled.weight = attn.to_v.weight
    attn.to_v = doubled
    third = check()
    assert np.abs(third - second).max() > 1e-3
    quantize_model(unet, 8, 32)
    assert np.abs(check() - third).max() > 0


def test_compiled_unet_takes_controlnet_residuals(tiny):
    """compile_unet with ControlNet's down_residuals / mid_residual equals the eager UNet with them."""
    config, _, ours, _ = tiny
    inputs = make_inputs(config, 2, 8, 6)
    sample, context = nchw_to_nhwc(inputs["sample"]), to_mx(inputs["encoder_hidden_states"])
    emb = mx.zeros((2, ours.time_embedding.linear_2.weight.shape[0]))
    x = ours.conv_in(sample)
    shapes = [x.shape]
    for block in ours.down_blocks:  # the skips' shapes
        x, states = block(x, emb, context)
        shapes += [s.shape for s in states]
    down = [mx.random.normal(shape, key=mx.random.key(i)) for i, shape in enumerate(shapes)]
    residuals = dict(down_residuals=down, mid_residual=mx.random.normal(x.shape, key=mx.random.key(99)))
    extra = {k: to_mx(inputs[k]) for k in ("text_embeds", "time_ids") if k in inputs}
    expected = ours(sample, 500.0, context, **extra, **residuals)
    without = ours(sample, 500.0, context, **extra)
    got = compile_unet(ours)(sample, 500.0, context, **extra, **residuals)
    # within float32 rounding: eagerly the CPU attention's softmax runs in numpy, traced in MLX
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=5e-6, rtol=1e-6)
    assert np.abs(np.array(expected) - np.array(without)).max() > 1e-3


def test_unet_in_row_blocks_matches_diffusers(tiny, monkeypatch):
    """The UNet with its 3x3 convolutions in blocks of 3 rows (convolution.conv3x3: norms, activations,
    upsampling and residuals inside the blocks) against diffusers; same tolerance as whole images."""
    config, ref, ours, _ = tiny
    monkeypatch.setattr("mlx_sd.convolution.CONV_BLOCK", 9 * 2 * 12 * 64 * 3)
    inputs = make_inputs(config, 2, 16, 12)
    expected = run_torch(ref, inputs, torch.tensor([999.0, 500.5]))
    np.testing.assert_allclose(run_mlx(ours, inputs, mx.array([999.0, 500.5])), expected, atol=ATOL, rtol=RTOL)


def test_loaded_weights_are_row_major(tiny):
    """sanitize's OIHW -> OHWI transposes are views; loaded, every weight is in row-major order (a strided
    kernel is copied by MLX's convolution at every call)."""
    _, _, ours, _ = tiny
    weights = tree_flatten(ours.parameters())
    mx.eval([v for _, v in weights])
    strided = [k for k, v in weights if not np.asarray(v).flags["C_CONTIGUOUS"]]
    assert not strided
    assert any(v.ndim == 4 for _, v in weights)


def test_loading_holds_one_array_more_than_the_weights(tiny, tmp_path):
    """load_component evaluates the weights one array at a time, each source array freed once copied to
    row-major order: MLX's peak while loading stays within the loaded weights plus their largest array."""
    from mlx_sd.loading import load_component

    config, _, _, folder = tiny
    (tmp_path / "unet").symlink_to(folder)
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    model = load_component(tmp_path, "unet", mx.float32)
    weights = [v for _, v in tree_flatten(model.parameters())]
    total, largest = sum(v.nbytes for v in weights), max(v.nbytes for v in weights)
    assert mx.get_peak_memory() - base <= total + largest
    assert total > 4 * largest  # the bound is not loose: a second copy of the 4-D kernels would exceed it


def test_strict_loading_names_missing_and_unexpected_keys(tiny):
    config, _, _, folder = tiny
    weights = sanitize(read_safetensors(folder))
    weights.pop("mid_block.attentions.0.proj_in.weight")
    weights["mid_block.attentions.0.bogus.weight"] = mx.zeros((4,))
    with pytest.raises(ModelLoadError) as err:
        load_strict(UNet2DConditionModel(UNetConfig.from_dict(config)), weights, "unet")
    assert "mid_block.attentions.0.proj_in.weight" in str(err.value)
    assert "mid_block.attentions.0.bogus.weight" in str(err.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(class_embed_type="timestep"), "class_embed_type"),
        (dict(time_cond_proj_dim=256), "time_cond_proj_dim"),
        (dict(addition_embed_type="text"), "addition_embed_type"),
        (dict(down_block_types=["AttnDownBlock2D", CA, D]), "AttnDownBlock2D"),
        (dict(transformer_layers_per_block=[[1, 1], [1, 1], [1, 1]]), "transformer_layers_per_block"),
    ],
)
def test_unsupported_config_raises(change, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_dict({**TINY["sd1"], **change})


@pytest.mark.parametrize("model", [SD15, SD21_BASE, SD21, SD_TURBO, SDXL, SDXL_TURBO])
def test_real_configs_have_diffusers_keys_and_shapes(model):
    """Every real config builds a model whose parameters are exactly diffusers' keys and (OHWI) shapes."""
    cfg = real_config(model, "unet")
    with torch.device("meta"):
        ref = TorchUNet.from_config(cfg)
    config = UNetConfig.from_dict(cfg)
    heads = cfg["attention_head_dim"]  # SD's attention_head_dim is the number of heads
    assert config.num_attention_heads == (heads if isinstance(heads, list) else [heads] * len(cfg["down_block_types"]))
    assert config.upcast_attention == bool(cfg.get("upcast_attention"))
    # lazy zeros: nothing is allocated, load_strict only checks keys and shapes
    weights = sanitize({k: mx.zeros(tuple(v.shape)) for k, v in ref.state_dict().items()})
    load_strict(UNet2DConditionModel(config), weights, "unet")


@pytest.mark.fullsize
@pytest.mark.parametrize("model, size", [(SD15, (16, 8)), (SD21, (12, 10)), (SDXL, (10, 6))])
def test_fullsize_unet_matches_diffusers(model, size):
    """Random weights from the real config; one float32 model copy in memory at a time."""
    cfg = real_config(model, "unet")
    times = {}
    start = time.perf_counter()
    torch.manual_seed(0)
    ref = TorchUNet.from_config(cfg).eval()
    randomize_norms(ref)
    times["torch init"] = time.perf_counter() - start

    inputs = make_inputs(cfg, 2, *size, seq_len=77)
    start = time.perf_counter()
    expected = run_torch(ref, inputs, torch.tensor([999.0, 500.5]))
    times["torch forward"] = time.perf_counter() - start

    start = time.perf_counter()
    state = ref.state_dict()
    del ref
    gc.collect()
    weights = {k: mx.array(state.pop(k).numpy()) for k in list(state)}  # frees each torch tensor as it goes
    weights = sanitize(weights)
    for v in weights.values():
        mx.eval(v)  # one transposed copy at a time
    ours = load_strict(UNet2DConditionModel(UNetConfig.from_dict(cfg)), weights, "unet")
    del weights
    times["convert + load"] = time.perf_counter() - start

    start = time.perf_counter()
    got = run_mlx(ours, inputs, mx.array([999.0, 500.5]))
    times["mlx forward"] = time.perf_counter() - start
    del ours
    mx.clear_cache()  # hand the weights' memory back before the next full-size model

    diff = np.abs(got - expected).max()
    scale = np.abs(expected).max()
    print(
        f"\n{model} {size}: max|ref|={scale:.4g} max abs diff={diff:.3g} rel={diff / scale:.3g} "
        + " ".join(f"{k}={v:.1f}s" for k, v in times.items())
    )
    # float32 on both sides through up to 70 transformer blocks: measured max abs diff 3e-6 to 4.4e-6 for
    # outputs of magnitude ~1 (relative ~4e-6); 1e-4 relative leaves room for summation-order noise
    np.testing.assert_allclose(got, expected, atol=1e-4 * scale, rtol=1e-4)

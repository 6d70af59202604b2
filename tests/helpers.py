"""Shared test helpers: the real SD configs (tests/configs), torch <-> MLX conversion, tiny random diffusers
pipelines shaped like the real checkpoints, and image comparisons against diffusers."""

import json
import shutil
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import diffusers
import mlx.core as mx
import numpy as np
import torch

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


def random_vae(config):
    """A diffusers AutoencoderKL with default-initialised convs/linears and random GroupNorm affine params."""
    model = diffusers.AutoencoderKL.from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return model


# Shrinks the real configs: every architectural flag (projection type, heads per block, upcast, activation,
# eos rule, scheduler settings) stays that of the real checkpoint; only the widths and depths change.
TINY_UNET = dict(
    block_out_channels=[32, 64],
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=8,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
)
TINY_VAE = dict(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=64)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, projection_dim=32)

FAMILIES = {
    # name: (real checkpoint, per-block heads, unet overrides)
    "sd1": (SD15, 2, {}),
    "sd2v": (SD21, [2, 4], {}),
    "turbo": (SD_TURBO, [2, 4], {}),
    # SDXL: two text encoders side by side (32 + 32), pooled projection 32 + 6 time ids x 8
    "sdxl": (
        SDXL,
        [2, 4],
        dict(
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[1, 2],
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        ),
    ),
}
FAMILIES["sdxl_turbo"] = (SDXL_TURBO, *FAMILIES["sdxl"][1:])
XL = ("sdxl", "sdxl_turbo")


def _randomize_norms(model, generator):
    """Random weights for the norm layers too, so that no layer is an identity."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=generator))


def make_pipeline(family, folder, seed=0):
    """Builds a random tiny diffusers StableDiffusionPipeline of `family`, saves it to `folder`, returns it."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.schedulers import (
        DDIMScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    real, heads, extra = FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    unet_cfg = {k: v for k, v in real_config(real, "unet").items() if not k.startswith("_")}
    xl = family in XL
    context_dims = TINY_CLIP["hidden_size"] * (2 if xl else 1)
    unet_cfg.update(TINY_UNET, attention_head_dim=heads, cross_attention_dim=context_dims)
    unet_cfg.update(extra)
    unet = UNet2DConditionModel(**unet_cfg)
    vae_cfg = {k: v for k, v in real_config(real, "vae").items() if not k.startswith("_")}
    n = len(TINY_VAE["block_out_channels"])
    vae_cfg.update(TINY_VAE, down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
    vae = AutoencoderKL(**vae_cfg)
    clip_cfg = {k: v for k, v in real_config(real, "text_encoder").items() if not k.startswith("_")}
    clip_cfg.update(TINY_CLIP)
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_cfg))
    encoders = [unet, vae, text_encoder]
    if xl:
        clip2_cfg = {k: v for k, v in real_config(real, "text_encoder_2").items() if not k.startswith("_")}
        clip2_cfg.update(TINY_CLIP)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip2_cfg))
        encoders.append(text_encoder_2)
    for m in encoders:
        m.float()  # the SDXL configs name torch_dtype float16
        _randomize_norms(m, g)
        m.eval()
    # Scale the UNet's output layer so that the latents stay in a useful range over several steps.
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.3)

    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(SDXL if xl else real, folder / "_tokenizer_src"))
    scheduler_cfg = real_config(real, "scheduler", "scheduler_config.json")
    scheduler_cls = {
        "PNDMScheduler": PNDMScheduler,
        "DDIMScheduler": DDIMScheduler,
        "EulerDiscreteScheduler": EulerDiscreteScheduler,
        "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
    }[scheduler_cfg["_class_name"]]
    scheduler = scheduler_cls.from_config(scheduler_cfg)
    if xl:
        tokenizer_2 = CLIPTokenizer.from_pretrained(write_tokenizer(SDXL, folder / "_tokenizer_2_src", "tokenizer_2"))
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    # diffusers writes every scheduler default into the file; the Hub file leaves some out (SD 1.5 has no
    # timestep_spacing), which changes what another sampler class defaults to. Keep the real file.
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_cfg, indent=2))
    pipe.scheduler = scheduler_cls.from_pretrained(folder, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    pipe.saved_scheduler_config = scheduler_cfg  # run_both builds every sampler from it, not from the last one used
    return pipe


_SDE = {"algorithm_type": "sde-dpmsolver++"}
# mlx_sd sampler name -> diffusers class and the options that make it that sampler
DIFFUSERS_SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler_sgm_uniform": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "ddim": ("DDIMScheduler", {}),
    "ddim_sgm_uniform": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2s_a": ("DPMSolverSinglestepScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde_exponential": ("DPMSolverMultistepScheduler", {**_SDE, "use_exponential_sigmas": True}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {**_SDE, "solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis_beta": ("DEISMultistepScheduler", {"use_beta_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
TCD_ETA = 0.3  # mlx_sd's tcd default (TCDScheduler.step's); diffusers' pipelines pass eta=0 unless told


@contextmanager
def injected_step_noise(scheduler, seeds, shape, tcd_eta=TCD_ETA):
    """Makes the diffusers `scheduler` draw mlx_sd's per-step noise: at its i-th step call, the i-th array of
    mlx_sd.pipeline.step_noise(seeds, shape) (what mlx_sd's denoising loop gives its sampler's i-th step), through
    `randn_tensor` in the scheduler's module, or DPMSolverSDEScheduler's Brownian-tree noise sampler. Yields the
    number of noise draws so far (a dict), so that a test can tell that the injection happened."""
    from mlx_sd.pipeline import step_noise

    noises, current, draws = step_noise(seeds, shape), {}, {"count": 0}
    original_step = scheduler.step

    def step(*args, **kwargs):
        current["noise"] = torch.from_numpy(np.array(next(noises))).permute(0, 3, 1, 2)
        if isinstance(scheduler, diffusers.DPMSolverSDEScheduler):
            scheduler.noise_sampler = lambda sigma, sigma_next: randn_tensor(current["noise"].shape)
        if isinstance(scheduler, diffusers.TCDScheduler):
            kwargs["eta"] = tcd_eta  # the pipeline passes its own eta, 0 by default
        return original_step(*args, **kwargs)

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(current["noise"].shape)
        draws["count"] += 1
        return current["noise"].to(dtype or torch.float32)

    module = sys.modules[type(scheduler).__module__]
    with (
        mock.patch.object(module, "randn_tensor", randn_tensor, create=True),
        mock.patch.object(scheduler, "step", step),
    ):
        yield draws


def run_both(
    reference,
    ours,
    sampler,
    width,
    height,
    steps,
    guidance_scale,
    num_images=1,
    negative_prompt=None,
    clip_skip=None,
    prompt="a photo of an astronaut riding a horse on mars",
    truncate_prompt=False,
    reference_scheduler=None,
    reference_kwargs=None,
    ours_kwargs=None,
    **xl,
):
    """The same generation by diffusers and mlx_sd: (ours, expected) as float64 arrays (N, H, W, 3) in 0..255.

    reference_scheduler: (diffusers class name, config overrides) instead of DIFFUSERS_SCHEDULERS[sampler];
    reference_kwargs / ours_kwargs: more arguments for one side only (e.g. eta, or mlx_sd's schedule=)."""
    name, overrides = reference_scheduler or DIFFUSERS_SCHEDULERS[sampler]
    config = getattr(reference, "saved_scheduler_config", reference.scheduler.config)
    reference.scheduler = getattr(diffusers, name).from_config(config, **overrides)
    rng = np.random.default_rng(width * 1000 + height + steps)
    latents = rng.standard_normal((num_images, height // 8, width // 8, 4)).astype(np.float32)
    seeds, shape = list(range(num_images)), (height // 8, width // 8, 4)  # ours: seed 0, image i uses seed + i
    tcd_eta = (reference_kwargs or {}).get("eta", TCD_ETA)
    with torch.no_grad(), injected_step_noise(reference.scheduler, seeds, shape, tcd_eta):
        expected = reference(
            prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images,
            latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
            clip_skip=None if clip_skip is None else clip_skip - 1,  # diffusers counts skipped layers
            **(reference_kwargs or {}),
            **xl,
        ).images
    images = ours.generate(
        prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance_scale,
        sampler=sampler,
        seed=0,
        num_images=num_images,
        latents=mx.array(latents),
        clip_skip=clip_skip,
        truncate_prompt=truncate_prompt,
        **(ours_kwargs or {}),
        **xl,
    )
    return np.stack([np.asarray(i, np.float64) for i in images]), np.stack(
        [np.asarray(i, np.float64) for i in expected]
    )


def assert_images_close(ours, expected):
    assert ours.shape == expected.shape
    # The comparison means something only if the reference image is not flat or saturated.
    assert expected.std() > 10 and ((expected > 0) & (expected < 255)).mean() > 0.5
    diff = np.abs(ours - expected)
    print(f"\nimage difference vs diffusers: mean {diff.mean():.4f}/255, max {diff.max():.0f}/255")
    assert diff.mean() <= 0.5, f"mean abs diff {diff.mean():.3f}/255"
    assert diff.max() <= 2, f"max abs diff {diff.max():.0f}/255"


def unwritable_folder(tmp_path):
    """A folder this process cannot create files in: a read-only (0o555) folder, or for root (whom modes do not
    stop) /sys, whose kernel file system refuses new files."""
    import os
    import tempfile

    import pytest

    if os.geteuid() != 0:
        folder = Path(tmp_path) / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        tempfile.TemporaryFile(dir="/sys").close()
    except OSError:
        return Path("/sys")
    pytest.skip("no folder here refuses root's writes")


def bomb_png(path, side=30_000):
    """A tiny PNG file whose header claims side x side pixels: PIL refuses it as a decompression bomb."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of header
    ihdr[4:12] = struct.pack(">II", side, side)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    Path(path).write_bytes(bytes(data))
    return Path(path)


# --- the HTTP server (tests/test_server*.py) ---------------------------------------------------------------------


def make_models_dir(folder):
    """A models folder for the server: tiny sd1 and turbo pipelines (sd1 sorts first: the server's default)."""
    for family in ("sd1", "turbo"):
        make_pipeline(family, Path(folder) / family)
    return Path(folder)


@contextmanager
def running_server(**config):
    """A real mlx_sd server (uvicorn on a free 127.0.0.1 port, in a thread; float32); yields (base URL, Server)."""
    import uvicorn

    from mlx_sd.server import Server, ServerConfig

    server = Server(ServerConfig(dtype="float32", **config))
    server.start()
    # IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (without it keep-alive requests wait ~40 ms for ACKs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    web = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not web.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        web.should_exit = True
        thread.join()
        server.stop()
        sock.close()


# --- ControlNets -------------------------------------------------------------------------------------

BUNDLED_CONFIGS = Path(__file__).parent.parent / "mlx_sd" / "assets" / "configs"
# make_pipeline family -> the ControlNet family whose real config a tiny ControlNet for it is shrunk from
CONTROLNET_FAMILIES = {"sd1": "sd1", "sd2v": "sd2", "turbo": "sd2", "sdxl": "sdxl", "sdxl_turbo": "sdxl"}


def controlnet_config(family):
    """The real ControlNet config bundled for a ControlNet family (sd1: control_v11p_sd15_canny, sdxl:
    controlnet-canny-sdxl-1.0, sd2: SD 2.1's UNet config, as diffusers' cldm_v21.yaml conversion makes it)."""
    return json.loads((BUNDLED_CONFIGS / family / "controlnet" / "config.json").read_text())


def make_controlnet(family, seed=0, **overrides):
    """A random tiny diffusers ControlNetModel that fits make_pipeline(family)'s UNet: the real ControlNet config
    shrunk as TINY_UNET shrinks the UNet's. The zero convolutions (controlnet_down_blocks, controlnet_mid_block,
    the conditioning embedding's conv_out) get PyTorch's default init instead of zeros, and the norms random
    weights, so that every layer counts."""
    from diffusers import ControlNetModel

    _, heads, extra = FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = {k: v for k, v in controlnet_config(CONTROLNET_FAMILIES[family]).items() if not k.startswith("_")}
    cfg.update({k: v for k, v in TINY_UNET.items() if k not in ("up_block_types", "sample_size")})
    cfg.update({k: v for k, v in extra.items() if k != "up_block_types"})
    context_dims = TINY_CLIP["hidden_size"] * (2 if family in XL else 1)
    cfg.update(attention_head_dim=heads, cross_attention_dim=context_dims, **overrides)
    model = ControlNetModel(**cfg)
    wake_zero_convs(model)
    _randomize_norms(model, g)
    return model.float().eval()


ZERO_CONVS = ("controlnet_down_blocks.", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")


def wake_zero_convs(controlnet):
    """Gives a diffusers ControlNet's zero-initialised convolutions PyTorch's default init: with zeros its
    residuals are zero, and a parity test on them proves nothing."""
    with torch.no_grad():
        for name, module in controlnet.named_modules():
            if name.startswith(ZERO_CONVS) and isinstance(module, torch.nn.Conv2d):
                module.reset_parameters()


def control_image(width=67, height=45):
    """An odd-sized RGB control image: light shapes (a disc and a bar) on a dark ground, edges for Canny to find."""
    from PIL import Image

    ys, xs = np.mgrid[0:height, 0:width]
    disc = (xs - width * 0.35) ** 2 + (ys - height * 0.5) ** 2 < (min(width, height) * 0.3) ** 2
    bar = (abs(xs - width * 0.75) < width * 0.08) & (ys > height * 0.15) & (ys < height * 0.85)
    pixels = np.where((disc | bar)[:, :, None], [255, 240, 200], [0, 10, 30]).astype(np.uint8)
    return Image.fromarray(pixels)


@contextmanager
def injected_noise(monkeypatch, pipe, noise, image_noise):
    """Makes the diffusers pipeline `pipe` use `noise` (N, 4, h, w) as its start noise (`randn_tensor` of its
    module) and `image_noise` as eps of every VAE posterior sample, the arrays mlx_sd gets as `latents=` and
    `image_noise=`; yields the counts of draws, so that a test can tell that the injection happened."""
    import sys

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    draws = {"posterior": 0, "noise": 0}

    def sample(self, generator=None):
        draws["posterior"] += 1
        eps = image_noise[: self.mean.shape[0]]
        assert eps.shape == self.mean.shape
        return self.mean + self.std * eps

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        draws["noise"] += 1
        assert tuple(shape) == tuple(noise.shape)
        return noise.clone()

    with monkeypatch.context() as patch:
        patch.setattr(DiagonalGaussianDistribution, "sample", sample)
        patch.setattr(sys.modules[type(pipe).__module__], "randn_tensor", randn_tensor)
        yield draws

"""Building the pipeline's models from a model folder: diffusers format, a folder written by `mlx-sd convert`
(MLX layout, maybe quantized), or a single-file checkpoint read with the bundled configs of its family."""

import math
from pathlib import Path

import mlx.core as mx

from .activations import compute_dtype
from .clip import CLIPTextConfig, CLIPTextModel
from .clip import sanitize as sanitize_clip
from .hub import resolve_model
from .quantize import QUANTIZE_BITS, QUANTIZE_GROUP_SIZES, quantize_model, rebuild_quantized
from .single_file import load_single_file
from .thread_exit import clear_mlx_state_at_thread_exit
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel, UNetConfig
from .unet import sanitize as sanitize_unet
from .vae import AutoencoderConfig, AutoencoderKL
from .vae import sanitize as sanitize_vae
from .weights import (
    MANIFEST,
    MAX_JSON_BYTES,
    ModelLoadError,
    evaluate_one_by_one,
    is_converted,
    load_strict,
    read_converted,
    read_json,
    read_safetensors,
)

# component -> (config class, model class, diffusers layout -> MLX layout)
MODELS = {
    "text_encoder": (CLIPTextConfig, CLIPTextModel, sanitize_clip),
    "text_encoder_2": (CLIPTextConfig, CLIPTextModel, sanitize_clip),
    "unet": (UNetConfig, UNet2DConditionModel, sanitize_unet),
    "vae": (AutoencoderConfig, AutoencoderKL, sanitize_vae),
}
CONFIGS = Path(__file__).parent / "assets" / "configs"
PREDICTION_TYPES = ("epsilon", "v_prediction")
FAMILIES = ("sd1", "sd2", "sdxl")
QUANTIZE_GROUP_SIZE = 64  # quantize-at-load group size (mlx-lm's default)
MAX_SIZE = 1 << 16  # bound on any width, depth, head or token count in a config (the real ones: <= 49,408)
# config keys that size tensors: a positive int, or a list of 1 to 8 of them (one per block)
SIZES = {
    "unet": " ".join(
        [
            "in_channels out_channels block_out_channels layers_per_block attention_head_dim num_attention_heads",
            "cross_attention_dim transformer_layers_per_block norm_num_groups conv_in_kernel conv_out_kernel",
            "addition_time_embed_dim projection_class_embeddings_input_dim sample_size",
        ]
    ),
    "vae": "in_channels out_channels latent_channels block_out_channels layers_per_block norm_num_groups sample_size",
    "text_encoder": "hidden_size intermediate_size num_attention_heads num_hidden_layers max_position_embeddings "
    "vocab_size projection_dim",
}
FLOATS = ("norm_eps", "layer_norm_eps", "scaling_factor", "shift_factor", "beta_start", "beta_end")
# scheduler config key -> (smallest, largest) integer
SCHEDULER_INTS = {"num_train_timesteps": (1, 100_000), "steps_offset": (0, 1000)}


def bundled_config(family, prediction_type=None):
    """The configs bundled for a single-file checkpoint of `family`: SD 1.5, SDXL base, and for SD 2.x (whose
    weights do not say) SD 2.1 base (epsilon, 512 px) or SD 2.1 (v_prediction, 768 px)."""
    if family != "sd2":
        return CONFIGS / family
    if prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(
            "an SD 2.x checkpoint does not say what it predicts: convert it with `mlx-sd convert FILE OUTPUT_DIR "
            "--prediction-type epsilon` (SD 2.x base, 512 px) or `v_prediction` (SD 2.x 768 px), or --config with "
            "its diffusers configs"
        )
    return CONFIGS / ("sd2" if prediction_type == "epsilon" else "sd2-v")


def model_family(folder):
    """The model family of a model folder: "sdxl" by its pipeline class, "sd1" by CLIP ViT-L's quick_gelu, else
    "sd2" (OpenCLIP ViT-H). A converted folder's manifest records it."""
    folder = Path(folder)
    if is_converted(folder):
        family = read_json(folder / MANIFEST).get("family")
        if family not in FAMILIES:
            raise ModelLoadError(
                f"{folder / MANIFEST}: family must be one of {', '.join(FAMILIES)}, got {family!r:.40}"
            )
        return family
    if read_json(folder / "model_index.json").get("_class_name", "").startswith("StableDiffusionXL"):
        return "sdxl"
    return "sd1" if read_json(folder / "text_encoder" / "config.json").get("hidden_act") == "quick_gelu" else "sd2"


def open_model(name_or_path, dtype=None, variant=None):
    """(folder, checkpoint): a model folder or Hub repo id and None, or for a single-file `.safetensors`
    checkpoint the bundled configs of its family and the file itself (its weights are read per component).
    A Hub download fetches the weights of hub.resolve_variant(dtype, variant): fp16 files for half dtypes."""
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() != ".safetensors" or path.is_dir():
        return resolve_model(name_or_path, dtype=dtype, variant=variant), None
    family, _ = single_file_components(path)
    return bundled_config(family), path


def single_file_components(checkpoint):
    """(family, {component: diffusers-named weights}) of a single-file checkpoint; lazy, so cheap to call again."""
    try:
        return load_single_file(checkpoint)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def _single_file_component(checkpoint, name, folder):
    """One component's weights; the other components' (lazy, unread) arrays are dropped on return."""
    components = single_file_components(checkpoint)[1]
    if name not in components:
        raise ModelLoadError(f"{checkpoint} has no {name} weights, which the config in {folder} asks for")
    return components[name]


def check_config(name, config, path):
    """Raises ModelLoadError naming `path` for a config whose sizes are not positive integers (bounded), whose
    groups or heads do not divide the widths, or whose floats are not finite numbers."""
    kind = "text_encoder" if name.startswith("text_encoder") else name
    for key in SIZES.get(kind, "").split():
        value = config.get(key)
        values = value if isinstance(value, list) else [value]
        if value is not None and not (0 < len(values) <= 8 and all(_size(v) for v in values)):
            raise ModelLoadError(
                f"{path}: {key} must be an integer from 1 to {MAX_SIZE} or a list of 1 to 8, got {value!r:.80}"
            )
    for key in FLOATS:
        value = config.get(key)
        if value is not None and not (type(value) in (int, float) and math.isfinite(value)):
            raise ModelLoadError(f"{path}: {key} must be a finite number, got {value!r:.80}")
    groups = config.get("norm_num_groups")
    if groups and any(c % groups for c in config.get("block_out_channels") or []):
        raise ModelLoadError(f"{path}: norm_num_groups ({groups}) must divide every block_out_channels entry")
    if kind == "text_encoder" and config.get("hidden_size", 512) % config.get("num_attention_heads", 8):
        raise ModelLoadError(f"{path}: num_attention_heads must divide hidden_size")


def _check_quantization(quantization, path):
    if not (
        isinstance(quantization, dict)
        and quantization.get("bits") in QUANTIZE_BITS
        and quantization.get("group_size") in QUANTIZE_GROUP_SIZES
    ):
        raise ModelLoadError(
            f"{path}: quantization must be {{'bits': {' or '.join(map(str, QUANTIZE_BITS))}, 'group_size': "
            f"{' or '.join(map(str, QUANTIZE_GROUP_SIZES))}}}, got {quantization!r:.80}"
        )


def _size(value):
    return type(value) is int and 1 <= value <= MAX_SIZE


def check_scheduler_config(config, path):
    """Raises ModelLoadError naming `path` for scheduler settings of the wrong type or out of range."""
    for key, (low, high) in SCHEDULER_INTS.items():
        value = config.get(key)
        if value is not None and not (type(value) is int and low <= value <= high):
            raise ModelLoadError(f"{path}: {key} must be an integer from {low} to {high}, got {value!r:.80}")
    check_config("scheduler", config, path)
    if not 0 <= config.get("beta_start", 0) <= config.get("beta_end", 0.02) < 1:
        raise ModelLoadError(f"{path}: beta_start and beta_end must satisfy 0 <= beta_start <= beta_end < 1")
    if config.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise ModelLoadError(f"{path}: prediction_type must be one of {', '.join(PREDICTION_TYPES)}")


def build_model(name, config, path):
    """The model `name` (text_encoder[_2], unet, vae) built from its checked config, weights not loaded."""
    check_config(name, config, path)
    config_cls, model_cls, _ = MODELS[name]
    try:
        return model_cls(config_cls.from_dict(config))
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ModelLoadError(f"{path}: not a usable {name} config ({reason})") from None


def load_component(folder, name, dtype, quantize=None, checkpoint=None, variant=None):
    """The model `folder/name` (text_encoder[_2], unet, vae) with its weights loaded strictly in `dtype`, and
    quantized to `quantize` bits (4 or 8) if asked. With `checkpoint` (a single file), `folder` gives only
    the config and the weights come from the file. `variant` ("fp16") prefers `*.fp16.safetensors` files."""
    config_path = Path(folder) / name / "config.json"
    config = read_json(config_path)
    clear_mlx_state_at_thread_exit()
    model = build_model(name, config, config_path)
    sanitize = MODELS[name][2]
    if checkpoint is not None:
        weights = sanitize(_single_file_component(checkpoint, name, folder))
    elif is_converted(folder):
        weights = read_converted(Path(folder) / name)
        quantization = config.get("quantization")
        if quantization:
            if quantize:
                raise ModelLoadError(
                    f"{folder} is already quantized ({quantization.get('bits')}-bit); load it without quantize"
                )
            _check_quantization(quantization, config_path)
            rebuild_quantized(model, weights, quantization, str(config_path))
    else:
        weights = sanitize(read_safetensors(Path(folder) / name, variant))
    load_strict(model, weights, str(Path(folder) / name), dtype)
    if quantize:
        quantize_model(model, quantize, QUANTIZE_GROUP_SIZE)
    # Evaluated now, with no reference left to the source arrays: one component's weights in memory while loading
    del weights
    evaluate_one_by_one(model)
    return model


def load_text_encoder(folder, tokenizer_name, encoder_name, dtype, quantize=None, checkpoint=None, variant=None):
    """The tokenizer and CLIP text encoder stored under `folder/tokenizer_name` and `folder/encoder_name`."""
    tokenizer = load_tokenizer(Path(folder) / tokenizer_name)
    encoder = load_component(folder, encoder_name, dtype, quantize, checkpoint, variant)
    positions = encoder.config.max_position_embeddings if hasattr(encoder, "config") else None
    if not (type(tokenizer.max_length) is int and 2 <= tokenizer.max_length <= (positions or MAX_SIZE)):
        raise ModelLoadError(
            f"{Path(folder) / tokenizer_name}: model_max_length {tokenizer.max_length!r:.40} does not fit the text "
            f"encoder's {positions} positions"
        )
    return tokenizer, encoder


def load_tokenizer(folder):
    """The CLIP tokenizer of a model folder's `tokenizer*` folder, or ModelLoadError naming it."""
    if not folder.is_dir():
        raise ModelLoadError(
            f"missing tokenizer folder {folder}: a model folder needs its tokenizer (vocabulary and pad token, "
            "which differs between SD 1.x and SD 2.x)"
        )
    too_large = [f.name for f in folder.iterdir() if f.is_file() and f.stat().st_size > MAX_JSON_BYTES]
    if too_large:
        raise ModelLoadError(f"{folder}: {', '.join(too_large)} too large for a tokenizer file")
    try:
        return CLIPTokenizer.from_folder(folder)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OSError, RecursionError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ModelLoadError(f"{folder}: unreadable tokenizer files ({type(e).__name__}: {reason})") from None


def load_denoiser(folder, dtype, quantize=None, checkpoint=None, variant=None):
    """The UNet, the VAE and the scheduler config of a model folder; `quantize` applies to the UNet only."""
    unet = load_component(folder, "unet", dtype, quantize, checkpoint, variant)
    vae = load_vae(folder, dtype, checkpoint, variant)
    scheduler_path = Path(folder) / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json(scheduler_path)
    check_scheduler_config(scheduler_config, scheduler_path)
    return unet, vae, scheduler_config


def load_vae(folder, dtype, checkpoint=None, variant=None):
    """The VAE of a model folder, its weights in vae_dtype(dtype, its config's force_upcast)."""
    vae_path = Path(folder) / "vae" / "config.json"
    vae_config = read_json(vae_path)
    check_config("vae", vae_config, vae_path)
    dtype = vae_dtype(dtype, vae_config.get("force_upcast", True))
    return load_component(folder, "vae", dtype, checkpoint=checkpoint, variant=variant)


def vae_dtype(dtype, force_upcast=True):
    """The dtype of the VAE's weights in a pipeline of `dtype`: float32 where `dtype` is float16 and the config
    says force_upcast (diffusers': the float16 VAE overflows; bfloat16 does not), except where float16 weights
    compute in float32 anyway (MLX's CPU backend, activations.compute_dtype): there they stay float16 at rest,
    half the memory for the same images."""
    upcast = dtype == mx.float16 and force_upcast and compute_dtype(dtype) == dtype
    return mx.float32 if upcast else dtype

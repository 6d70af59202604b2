"""Building the pipeline's models from a model folder: diffusers format, a folder written by `mlx-sd convert`
(MLX layout, maybe quantized), or a single-file checkpoint read with the bundled configs of its family."""

from pathlib import Path

import mlx.core as mx

from .clip import CLIPTextConfig, CLIPTextModel
from .clip import sanitize as sanitize_clip
from .hub import resolve_model
from .quantize import quantize_model, rebuild_quantized
from .single_file import load_single_file
from .thread_exit import clear_mlx_state_at_thread_exit
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel, UNetConfig
from .unet import sanitize as sanitize_unet
from .vae import AutoencoderConfig, AutoencoderKL
from .vae import sanitize as sanitize_vae
from .weights import MANIFEST, ModelLoadError, is_converted, load_strict, read_converted, read_json, read_safetensors

# component -> (config class, model class, diffusers layout -> MLX layout)
MODELS = {
    "text_encoder": (CLIPTextConfig, CLIPTextModel, sanitize_clip),
    "text_encoder_2": (CLIPTextConfig, CLIPTextModel, sanitize_clip),
    "unet": (UNetConfig, UNet2DConditionModel, sanitize_unet),
    "vae": (AutoencoderConfig, AutoencoderKL, sanitize_vae),
}
CONFIGS = Path(__file__).parent / "assets" / "configs"
PREDICTION_TYPES = ("epsilon", "v_prediction")
QUANTIZE_GROUP_SIZE = 64  # quantize-at-load group size (mlx-lm's default)


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
        return read_json(folder / MANIFEST)["family"]
    if read_json(folder / "model_index.json").get("_class_name", "").startswith("StableDiffusionXL"):
        return "sdxl"
    return "sd1" if read_json(folder / "text_encoder" / "config.json").get("hidden_act") == "quick_gelu" else "sd2"


def open_model(name_or_path):
    """(folder, checkpoint): a model folder or Hub repo id and None, or for a single-file `.safetensors`
    checkpoint the bundled configs of its family and the file itself (its weights are read per component)."""
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() != ".safetensors" or path.is_dir():
        return resolve_model(name_or_path), None
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


def load_component(folder, name, dtype, quantize=None, checkpoint=None):
    """The model `folder/name` (text_encoder[_2], unet, vae) with its weights loaded strictly in `dtype`, and
    quantized to `quantize` bits (4 or 8) if asked. With `checkpoint` (a single file), `folder` gives only
    the config and the weights come from the file."""
    config = read_json(Path(folder) / name / "config.json")
    config_cls, model_cls, sanitize = MODELS[name]
    clear_mlx_state_at_thread_exit()
    model = model_cls(config_cls.from_dict(config))
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
            rebuild_quantized(model, weights, quantization, name)
    else:
        weights = sanitize(read_safetensors(Path(folder) / name))
    load_strict(model, weights, name, dtype)
    if quantize:
        quantize_model(model, quantize, QUANTIZE_GROUP_SIZE)
    # Evaluated now, with no reference left to the source arrays, so that each source tensor is freed once
    # converted: at most one component's weights are in memory while loading.
    del weights
    mx.eval(model.parameters())
    return model


def load_text_encoder(folder, tokenizer_name, encoder_name, dtype, quantize=None, checkpoint=None):
    """The tokenizer and CLIP text encoder stored under `folder/tokenizer_name` and `folder/encoder_name`."""
    tokenizer = CLIPTokenizer.from_folder(Path(folder) / tokenizer_name)
    return tokenizer, load_component(folder, encoder_name, dtype, quantize, checkpoint)


def load_denoiser(folder, dtype, quantize=None, checkpoint=None):
    """The UNet, the VAE and the scheduler config of a model folder; `quantize` applies to the UNet only."""
    unet = load_component(folder, "unet", dtype, quantize, checkpoint)
    vae_config = AutoencoderConfig.from_dict(read_json(Path(folder) / "vae" / "config.json"))
    # diffusers' force_upcast: the float16 VAE overflows, so it runs in float32 (bfloat16 does not overflow).
    vae_dtype = mx.float32 if dtype == mx.float16 and vae_config.force_upcast else dtype
    vae = load_component(folder, "vae", vae_dtype, checkpoint=checkpoint)
    return unet, vae, read_json(Path(folder) / "scheduler" / "scheduler_config.json")

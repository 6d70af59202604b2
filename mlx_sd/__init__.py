"""mlx_sd: Stable Diffusion natively on Apple silicon with MLX."""

from .controlnet import ControlSpec, load_controlnet
from .pipeline import GenerationCancelled, Images, StableDiffusion, StableDiffusionXL, Step
from .settings import GenerationSettings, SettingsError
from .weights import ModelLoadError

__version__ = "0.1.0"
__all__ = [
    "StableDiffusion",
    "StableDiffusionXL",
    "GenerationSettings",
    "SettingsError",
    "Step",
    "Images",
    "GenerationCancelled",
    "ModelLoadError",
    "ControlSpec",
    "load_controlnet",
    "__version__",
]

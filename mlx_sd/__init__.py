"""mlx_sd: Stable Diffusion natively on Apple silicon with MLX."""

from .pipeline import Images, StableDiffusion
from .weights import ModelLoadError

__version__ = "0.1.0"
__all__ = ["StableDiffusion", "Images", "ModelLoadError", "__version__"]

"""Writes a tiny random SD 1.x model for .ci/wheel: OUT/diffusers (a diffusers folder, its configs serve as
--config) and OUT/tiny.safetensors (the same weights as a single-file checkpoint in the original LDM layout)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import make_pipeline  # noqa: E402
from ldm_export import export_ldm  # noqa: E402

out = Path(sys.argv[1])
pipe = make_pipeline("sd1", out / "diffusers")
export_ldm(
    out / "tiny.safetensors", "sd1", **{n: getattr(pipe, n).state_dict() for n in ("text_encoder", "unet", "vae")}
)

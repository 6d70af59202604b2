"""The wheel users install holds the whole package: every asset (the CLIP vocabulary and the bundled configs of
single-file checkpoints). `.ci/wheel` installs it into a fresh environment and runs the CLI from it."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_asset(tmp_path):
    src = tmp_path / "src"  # a clean copy: building writes build/ and *.egg-info next to pyproject.toml
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    shutil.copytree(REPO / "mlx_sd", src / "mlx_sd", ignore=shutil.ignore_patterns("__pycache__"))
    build = "import setuptools.build_meta as b, sys; print(b.build_wheel(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")], cwd=src, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = set(zipfile.ZipFile(tmp_path / "dist" / done.stdout.strip().splitlines()[-1]).namelist())
    assets = REPO / "mlx_sd" / "assets"
    expected = {f"mlx_sd/assets/{p.relative_to(assets)}" for p in assets.rglob("*") if p.is_file()}
    assert any("configs/sd1/unet/config.json" in name for name in expected)
    assert sorted(expected - names) == []
    modules = {f"mlx_sd/{p.name}" for p in (REPO / "mlx_sd").glob("*.py")}
    assert sorted(modules - names) == []

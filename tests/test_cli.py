"""The mlx-sd command line on a tiny random model: outputs, metadata and one-line errors."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from tiny_models import make_pipeline

from mlx_sd import StableDiffusion
from mlx_sd.cli import cli


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("turbo")
    make_pipeline("turbo", folder)
    return folder


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_generate_writes_the_api_image_with_parameters(model, tmp_path):
    out = tmp_path / "cat.png"
    result = run("generate", "a cat", "--model", model, "--seed", 0, "-W", 32, "-H", 48, "--steps", 2,
                 "--dtype", "float32", "--negative-prompt", "dog", "-o", out)
    assert result.exit_code == 0, result.output
    assert f"seed 0: {out}" in result.output
    image = Image.open(out)
    expected = StableDiffusion.from_pretrained(model, dtype="float32").generate(
        "a cat", negative_prompt="dog", width=32, height=48, steps=2, seed=0)[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    assert image.text["parameters"] == (
        "a cat\nNegative prompt: dog\n"
        f"Steps: 2, Sampler: euler, CFG scale: 0, Seed: 0, Size: 32x48, Model: {model}"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["cat.png"]  # no temporary file left behind


def test_generate_never_overwrites(model, tmp_path):
    out = tmp_path / "img.png"
    out.write_bytes(b"keep me")
    result = run("generate", "a cat", "--model", model, "--seed", 3, "-W", 32, "-H", 32, "-n", 2,
                 "--dtype", "float32", "-o", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-1.png", "img-2.png", "img.png"]
    assert "seed 3:" in result.output and "seed 4:" in result.output


@pytest.mark.parametrize("args,code,message", [
    (["-W", "30"], 2, "must be a positive multiple of 8"),
    (["--steps", "0"], 2, "must be at least 1"),
    (["--cfg", "-1"], 2, "must be at least 0"),
    (["--sampler", "plms"], 2, "'plms' is not one of"),
    (["-o", "out.jpg"], 2, "output must be a .png file"),
    (["-o", "/nonexistent/dir/out.png"], 2, "does not exist"),
])
def test_bad_arguments_are_usage_errors(model, tmp_path, args, code, message):
    result = run("generate", "a cat", "--model", model, *args)
    assert result.exit_code == code
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_model_is_a_one_line_error(tmp_path):
    result = run("generate", "a cat", "--model", tmp_path / "nope", "-o", tmp_path / "x.png")
    assert result.exit_code == 1
    assert "Error: model" in result.output and "not found" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_folder_without_model_is_a_one_line_error(tmp_path):
    result = run("generate", "a cat", "--model", tmp_path, "-o", tmp_path / "x.png")
    assert result.exit_code == 1
    assert "model_index.json" in result.output and "diffusers-format" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_pickle_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not unpickled")
    result = run("generate", "a cat", "--model", ckpt, "-o", tmp_path / "x.png")
    assert result.exit_code == 1
    assert "never unpickles" in result.output

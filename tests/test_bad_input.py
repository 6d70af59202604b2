"""Hostile and careless input to generation settings: each case is a one-line error (CLI: exit 2 for a bad
setting, 1 for a runtime failure; API: SettingsError), no traceback, no file written, no unbounded work."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import make_pipeline
from mlx_sd import GenerationSettings, SettingsError, StableDiffusion
from mlx_sd.cli import cli

HUGE_WEIGHT = "(cat:" + "9" * 400 + ")"  # a float that overflows to inf


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("turbo")
    make_pipeline("turbo", folder)  # tiny: CLIP with 3 layers, 1000 training timesteps
    return folder


@pytest.fixture(scope="module")
def pipe(model):
    return StableDiffusion.from_pretrained(model, dtype="float32")


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    """An image for --image / --mask."""
    path = tmp_path_factory.mktemp("images") / "in.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(path)
    return path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


CLI_CASES = [
    # arguments after `generate "a cat" --model M -o OUT`, exit code, message
    (["--seed", str(2**72)], 2, "seed must be between -1 and 18446744073709551615, got 4722366482869645213696"),
    (["--seed", "-2"], 2, "seed must be between -1 and 18446744073709551615, got -2"),
    (["--clip-skip", "4"], 2, "clip skip must be at most 3 for this model, got 4"),
    (["--clip-skip", "0"], 2, "clip skip must be between 1 and 1000, got 0"),
    (["--deep-cache", "0"], 2, "DeepCache interval must be between 1 and 100, got 0"),
    (["--cfg", "nan"], 2, "guidance scale must be a finite number between 0 and 100, got nan"),
    (["--cfg", "inf"], 2, "guidance scale must be a finite number between 0 and 100, got inf"),
    (["--cfg", "1e9"], 2, "guidance scale must be a finite number between 0 and 100, got 1000000000.0"),
    (["--mask-blur", "nan", "--image", "IMG", "--mask", "IMG"], 2, "mask blur must be a finite number"),
    (["--mask-blur", "1e12", "--image", "IMG", "--mask", "IMG"], 2, "mask blur must be a finite number between 0"),
    (["--strength", "0.5"], 2, "strength applies to image-to-image: give an image"),
    (["--steps", "1001"], 2, "steps must be between 1 and 1000, got 1001"),
    (["-W", "100000"], 2, "width must be between 8 and 8192, got 100000"),
    (["-W", "8192", "-H", "8192"], 2, "8192x8192 has more than 16,777,216 pixels"),
    (["-W", "4096", "-H", "4096"], 2, "4096x4096 x 1 image(s) needs about"),
    (["-n", "10001"], 2, "-n/--num-images must be between 1 and 10000, got 10001"),
    (["-n", "0"], 2, "-n/--num-images must be between 1 and 10000, got 0"),
    (["--batch-size", "0"], 2, "--batch-size must be between 1 and 10000, got 0"),
]


@pytest.mark.parametrize("args,code,message", CLI_CASES)
def test_cli_bad_settings(model, png, tmp_path, args, code, message):
    out = tmp_path / "out"
    out.mkdir()
    args = [str(png) if a == "IMG" else a for a in args]
    result = run("generate", "a cat", "--model", model, "-o", out / "x.png", "--dtype", "float32", *args)
    assert result.exit_code == code, result.output
    assert result.output.startswith("Error: ") and message in result.output, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "prompt,message",
    [
        ("a cat\x00", "prompt contains the control character U+0000 at position 5"),
        ("a \x1b]0;pwned\x07 cat", "prompt contains the control character U+001B at position 2"),
        ("x" * 20_001, "prompt is 20,001 characters long; at most 20,000 are allowed"),
        (HUGE_WEIGHT, "prompt weight of 'cat' is not a finite number"),
        ("cat, " * 1300, "prompt is 35 chunks of 75 tokens long; at most 32 are allowed"),
    ],
)
def test_cli_bad_prompts(model, tmp_path, prompt, message):
    result = run("generate", prompt, "--model", model, "-o", tmp_path / "x.png", "--dtype", "float32")
    assert result.exit_code == 2, result.output
    assert result.output == f"Error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_cli_negative_prompt_is_checked_too(model, tmp_path):
    result = run("generate", "a cat", "--negative-prompt", "\x07", "--model", model, "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "negative prompt contains the control character U+0007" in result.output


def test_cli_seeds_at_the_edges(model, tmp_path):
    """-1 is random (A1111); the largest seed works, and the seeds of the next images wrap around 2**64."""
    args = ["generate", "a cat", "--model", model, "-W", 32, "-H", 32, "--dtype", "float32"]
    result = run(*args, "--seed", -1, "-o", tmp_path / "r.png")
    assert result.exit_code == 0, result.output
    result = run(
        *args,
        "--seed",
        2**64 - 1,
        "-n",
        2,
        "--image",
        tmp_path / "r.png",
        "--strength",
        1,
        "-o",
        tmp_path / "w-{index}.png",
    )
    assert result.exit_code == 0, result.output
    assert f"seed {2**64 - 1}: " in result.output and "seed 0: " in result.output
    assert "Seed: 0," in Image.open(tmp_path / "w-1.png").text["parameters"]


API_CASES = [
    (dict(steps=2.7), "steps must be an integer, got 2.7"),
    (dict(steps=True), "steps must be an integer, got True"),
    (dict(seed=1.9), "seed must be an integer, got 1.9"),
    (dict(seed=2**64), "seed must be between -1 and 18446744073709551615"),
    (dict(width="64"), "width must be an integer, got '64'"),
    (dict(clip_skip=-2), "clip skip must be between 1 and 1000, got -2"),
    (dict(clip_skip=9), "clip skip must be at most 3 for this model, got 9"),
    (dict(deep_cache=0), "DeepCache interval must be between 1 and 100, got 0"),
    (dict(deep_cache=2.5), "DeepCache interval must be an integer, got 2.5"),
    (dict(guidance_scale=float("nan")), "guidance scale must be a finite number"),
    (dict(guidance_scale="7"), "guidance scale must be a number, got '7'"),
    (dict(num_images=0), "num_images must be between 1 and 10000, got 0"),
    (dict(strength=0.5), "strength applies to image-to-image"),
    (dict(mask="m.png"), "a mask needs an image to inpaint"),
    (dict(prompt=b"bytes"), "prompt must be a string, got bytes"),
    (dict(negative_prompt=3), "negative prompt must be a string, got int"),
    (dict(sampler=3), "sampler must be a name, got 3"),
    (
        dict(sampler="DPM++ 2M Karras", schedule="beta"),
        "the sampler names the karras schedule, the schedule setting beta",
    ),
    (dict(schedule="cosine"), "unknown schedule 'cosine'"),
    (
        dict(sampler="ddim", schedule="karras"),
        "ddim (DDIM) cannot use the Karras schedule; it takes: default, sgm_uniform",
    ),
    (dict(timestep_spacing="random"), "timestep spacing must be one of"),
    (dict(eta=2.0), "eta must be a finite number between 0 and 1, got 2.0"),
    (dict(sampler="euler", eta=0.5), "eta applies to the tcd sampler, not euler"),
    (dict(sampler="lcm", steps=51), "steps must be at most 50 for the lcm sampler, got 51"),
    (dict(truncate_prompt="yes"), "truncate_prompt must be True or False, got 'yes'"),
    (dict(original_size=(512,)), "original_size must be a (height, width) pair"),
    (dict(original_size=(64, 64)), "apply to SDXL models only"),
    (dict(target_size=(-1, 64)), "target_size must be between 1 and 32768, got -1"),
    (dict(width=48, height=40, latents=np.zeros((1, 4, 4, 4))), "latents must have shape (1, 5, 6, 4)"),
]


@pytest.mark.parametrize("kwargs,message", API_CASES)
def test_api_bad_settings(pipe, kwargs, message):
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(SettingsError) as e:
        pipe.generate(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_api_unknown_setting_is_a_type_error(pipe):
    with pytest.raises(TypeError, match="unknown generation setting"):
        pipe.generate("a cat", stepz=3)


def test_settings_object_and_keywords_are_the_same(pipe):
    settings = GenerationSettings(prompt="a cat", width=32, height=32, seed=4)
    a = pipe.generate(settings)
    b = pipe.generate("a cat", width=32, height=32, seed=4)
    c = pipe.generate(settings, seed=5)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0])) and c.seed == 5 and settings.seed == 4


def test_infotext_round_trip_keeps_negative_prompt_lines(pipe):
    """A prompt line starting with `Negative prompt:` is written with a lowercase n (same CLIP tokens), so the
    infotext reads back as the same prompt and negative prompt (up to that letter)."""
    settings = GenerationSettings(prompt="a cat\nNegative prompt: dogs", negative_prompt="blurry\nugly", seed=3)
    images = pipe.generate(settings, width=32, height=32)
    text = images.parameters
    assert text.startswith("a cat\nnegative prompt: dogs\nNegative prompt: blurry\nugly\nSteps: 1, Sampler: Euler,")
    again, model = GenerationSettings.from_infotext(text)
    assert (again.prompt, again.negative_prompt, again.seed, model) == (
        "a cat\nnegative prompt: dogs",
        "blurry\nugly",
        3,
        pipe.name,
    )
    same = pipe.generate(again.replace(width=32, height=32))
    assert np.array_equal(np.asarray(same[0]), np.asarray(images[0]))


def test_from_png_model_is_used_only_without_model(model, tmp_path):
    first = tmp_path / "first.png"
    assert run("generate", "a cat", "--model", model, "-W", 32, "-H", 32, "--seed", 1, "-o", first).exit_code == 0
    # the PNG names the model; without --model it is used, and said so
    result = run("generate", "--from-png", first, "-o", tmp_path / "again.png", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert f"model: {model} (from {first}; --model overrides)" in result.output
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(tmp_path / "again.png")))
    # a --model given wins, silently
    result = run("generate", "--from-png", first, "--model", tmp_path / "nope", "-o", tmp_path / "x.png")
    assert result.exit_code == 1 and "model: " not in result.output and "nope" in result.output


@pytest.mark.parametrize(
    "parameters,message",
    [
        ("a cat\nSteps: 1, Seed: -5, Size: 32x32", "seed must be between -1 and 18446744073709551615, got -5"),
        ("a cat\nSteps: 1, Clip skip: 0, Size: 32x32", "clip skip must be between 1 and 1000, got 0"),
        (
            "a cat\nSteps: 1, DeepCache interval: 101, Size: 32x32",
            "DeepCache interval must be between 1 and 100, got 101",
        ),
        ("a cat\nSteps: 1, CFG scale: nan, Size: 32x32", "guidance scale must be a finite number"),
        ("a cat\nSteps: 1, Size: 32xfoo", "unreadable parameters"),
        ("a\x00cat\nSteps: 1, Size: 32x32", "prompt contains the control character U+0000"),
        ("x" * 30_000 + "\nSteps: 1", "prompt is 30,000 characters long"),
    ],
)
def test_from_png_bad_parameters(model, tmp_path, parameters, message):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    source = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(source, pnginfo=info)
    result = run("generate", "--from-png", source, "--model", model, "-o", tmp_path / "out.png")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ") and message in result.output and result.output.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_from_png_seed_minus_one_is_random(model, tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 1, Seed: -1, Size: 32x32")
    source = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(source, pnginfo=info)
    result = run("generate", "--from-png", source, "--model", model, "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    assert "Seed: -1" not in Image.open(tmp_path / "out.png").text["parameters"]

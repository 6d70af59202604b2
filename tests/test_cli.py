"""The mlx-sd command line on a tiny random model: outputs, metadata and one-line errors."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import make_pipeline
from mlx_sd import StableDiffusion
from mlx_sd.cli import cli
from mlx_sd.schedulers import SAMPLERS, SCHEDULES


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("turbo")
    make_pipeline("turbo", folder)
    return folder


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_generate_writes_the_api_image_with_parameters(model, tmp_path):
    out = tmp_path / "cat.png"
    result = run(
        "generate",
        "a cat",
        "--model",
        model,
        "--seed",
        0,
        "-W",
        32,
        "-H",
        48,
        "--steps",
        2,
        "--dtype",
        "float32",
        "--negative-prompt",
        "dog",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    assert f"seed 0: {out}" in result.output
    image = Image.open(out)
    expected = StableDiffusion.from_pretrained(model, dtype="float32").generate(
        "a cat", negative_prompt="dog", width=32, height=48, steps=2, seed=0
    )[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    assert image.text["parameters"] == (
        f"a cat\nNegative prompt: dog\nSteps: 2, Sampler: Euler, CFG scale: 0, Seed: 0, Size: 32x48, Model: {model}"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["cat.png"]  # no temporary file left behind


def test_generate_with_deep_cache(model, tmp_path):
    """--deep-cache N: the API's deep_cache=N image, recorded in the infotext."""
    out = tmp_path / "cached.png"
    args = ["--model", model, "--seed", 1, "-W", 32, "-H", 32, "--steps", 4, "--dtype", "float32", "-o", out]
    result = run("generate", "a cat", *args, "--deep-cache", 2)
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    expected = StableDiffusion.from_pretrained(model, dtype="float32").generate(
        "a cat", width=32, height=32, steps=4, seed=1, deep_cache=2
    )[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    assert "DeepCache interval: 2" in image.text["parameters"]


def test_generate_never_overwrites(model, tmp_path):
    out = tmp_path / "img.png"
    out.write_bytes(b"keep me")
    result = run(
        "generate", "a cat", "--model", model, "--seed", 3, "-W", 32, "-H", 32, "-n", 2, "--dtype", "float32", "-o", out
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-1.png", "img-2.png", "img.png"]
    assert "seed 3:" in result.output and "seed 4:" in result.output


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["-W", "30"], 2, "width must be a multiple of 8, got 30"),
        (["--steps", "0"], 2, "steps must be between 1 and 1000, got 0"),
        (["--cfg", "-1"], 2, "guidance scale must be a finite number between 0 and 100, got -1.0"),
        (["--sampler", "dpm_fast"], 2, "unknown sampler 'dpm_fast'; choose one of: euler (Euler), euler_a (Euler a)"),
        (["-o", "out.jpg"], 2, "output must be a .png file"),
        (["-o", "out-{step}.png"], 2, "unknown field '{step}'"),
        (["-o", "/nonexistent/dir/out.png"], 2, "does not exist"),
    ],
)
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


def test_output_patterns_folders_and_overwrite(model, tmp_path):
    args = ["generate", "a cat", "--model", model, "--seed", 10, "-W", 32, "-H", 32, "-n", 2, "--dtype", "float32"]
    assert run(*args, "-o", tmp_path / "cat-{seed}-{index}.png").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-10-0.png", "cat-11-1.png"]
    folder = tmp_path / "folder"
    folder.mkdir()
    assert run(*args, "-o", folder).exit_code == 0
    assert sorted(p.name for p in folder.iterdir()) == ["10.png", "11.png"]
    before = (folder / "10.png").read_bytes()
    (folder / "10.png").write_bytes(b"old")
    assert run(*args, "-o", folder, "--overwrite").exit_code == 0
    assert (folder / "10.png").read_bytes() == before and sorted(p.name for p in folder.iterdir()) == [
        "10.png",
        "11.png",
    ]


def test_batches_give_the_same_images_as_one_by_one(model, tmp_path):
    common = [
        "generate",
        "a cat",
        "--model",
        model,
        "--seed",
        5,
        "-W",
        32,
        "-H",
        32,
        "-n",
        3,
        "--dtype",
        "float32",
        "--sampler",
        "Euler a",
        "--steps",
        2,
    ]
    assert run(*common, "--batch-size", 3, "-o", tmp_path / "b-{index}.png").exit_code == 0
    assert run(*common, "-o", tmp_path / "s-{index}.png").exit_code == 0
    for i in range(3):
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / f"b-{i}.png")), np.asarray(Image.open(tmp_path / f"s-{i}.png"))
        )
    assert Image.open(tmp_path / "b-0.png").text["parameters"].count("Sampler: Euler a,") == 1


def test_grid_is_one_contact_sheet(model, tmp_path):
    result = run(
        "generate",
        "a cat",
        "--model",
        model,
        "--seed",
        1,
        "-W",
        32,
        "-H",
        32,
        "-n",
        3,
        "--batch-size",
        3,
        "--dtype",
        "float32",
        "--grid",
        "-o",
        tmp_path / "grid.png",
    )
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    assert Image.open(tmp_path / "grid.png").size == (64, 64)  # 2 x 2 cells of 32 x 32


def test_from_png_reproduces_the_pixels(model, tmp_path):
    first = tmp_path / "first.png"
    result = run(
        "generate",
        "a (red:1.2) cat",
        "--model",
        model,
        "--seed",
        42,
        "-W",
        40,
        "-H",
        32,
        "--steps",
        3,
        "--cfg",
        2.5,
        "--sampler",
        "DPM++ 2M Karras",
        "--negative-prompt",
        "blurry, dog",
        "--clip-skip",
        2,
        "--dtype",
        "float32",
        "-o",
        first,
    )
    assert result.exit_code == 0, result.output
    again = tmp_path / "again.png"
    result = run("generate", "--from-png", first, "--dtype", "float32", "-o", again)
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert Image.open(first).text == Image.open(again).text
    # an option given on the command line overrides the PNG's value
    other = tmp_path / "other.png"
    assert run("generate", "--from-png", first, "--seed", 43, "--dtype", "float32", "-o", other).exit_code == 0
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(other)))
    assert "Seed: 43" in Image.open(other).text["parameters"]


def test_from_png_without_parameters_is_a_usage_error(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    result = run("generate", "--from-png", plain)
    assert result.exit_code == 2 and "has no generation parameters" in result.output


def test_verbose_prints_timings_and_peak_memory(model, tmp_path):
    result = run(
        "generate",
        "a cat",
        "--model",
        model,
        "--seed",
        0,
        "-W",
        32,
        "-H",
        32,
        "--dtype",
        "float32",
        "--verbose",
        "-o",
        tmp_path / "v.png",
    )
    assert result.exit_code == 0
    assert "text_encoder" in result.output and "denoise" in result.output and "peak memory" in result.output


def test_preview_writes_a_preview_image(model, tmp_path):
    result = run(
        "generate",
        "a cat",
        "--model",
        model,
        "--seed",
        0,
        "-W",
        32,
        "-H",
        32,
        "--steps",
        2,
        "--dtype",
        "float32",
        "--preview",
        "-o",
        tmp_path / "p.png",
    )
    assert result.exit_code == 0
    assert Image.open(tmp_path / "p.preview.png").size == (32, 32)


def test_samplers_lists_every_sampler():
    result = run("samplers")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    for name, sampler in SAMPLERS.items():
        assert any(line.split()[0] == name and sampler.display in line for line in lines if line.strip())
    for name, schedule in SCHEDULES.items():
        assert any(line.startswith(f"{name} ") and schedule.label in line for line in lines)


def test_info_describes_models_and_pngs(model, tmp_path):
    result = run("info", model)
    assert result.exit_code == 0
    assert "StableDiffusionPipeline" in result.output and "unet:" in result.output and "F32" in result.output
    png = tmp_path / "i.png"
    run("generate", "a cat", "--model", model, "--seed", 9, "-W", 32, "-H", 32, "--dtype", "float32", "-o", png)
    result = run("info", png)
    assert result.exit_code == 0 and "Seed: 9" in result.output and "prompt: a cat" in result.output
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    result = run("info", text)
    assert result.exit_code == 1 and "not a model folder" in result.output


def test_image_to_image_and_inpainting_from_files(model, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((40, 48), np.uint8)
    mask[8:24, 16:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    pipe = StableDiffusion.from_pretrained(model, dtype="float32")
    for extra, kwargs in [
        ([], {}),
        (["--mask", tmp_path / "mask.png", "--mask-blur", 1], {"mask": tmp_path / "mask.png", "mask_blur": 1}),
    ]:
        out = tmp_path / "out.png"
        result = run(
            "generate",
            "a cat",
            "--model",
            model,
            "--seed",
            4,
            "--steps",
            4,
            "--strength",
            0.5,
            "--dtype",
            "float32",
            "--image",
            tmp_path / "in.png",
            *extra,
            "-o",
            out,
            "--overwrite",
        )
        assert result.exit_code == 0, result.output
        expected = pipe.generate("a cat", seed=4, steps=4, strength=0.5, image=tmp_path / "in.png", **kwargs)[0]
        assert expected.size == (48, 40)
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
        assert "Denoising strength: 0.5" in Image.open(out).text["parameters"]


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--mask", "m.png"], 2, "a mask needs an image to inpaint"),
        (["--strength", "1.5", "--image", "x.png"], 2, "strength must be a finite number between 0 and 1, got 1.5"),
    ],
)
def test_image_usage_errors(model, args, code, message):
    result = run("generate", "a cat", "--model", model, *args)
    assert result.exit_code == code and message in result.output


def test_unreadable_image_is_a_one_line_error(model, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    result = run("generate", "a cat", "--model", model, "--image", notes, "-o", tmp_path / "x.png")
    assert result.exit_code == 1 and "cannot read image" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_ctrl_c_leaves_no_partial_file(model, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(StableDiffusion, "generate", interrupt)
    result = run("generate", "a cat", "--model", model, "-o", tmp_path / "x.png")
    assert result.exit_code == 130 and "interrupted" in result.output
    assert list(tmp_path.iterdir()) == []


def test_quantize_flag_loads_a_quantized_model(model, tmp_path):
    result = run(
        "generate",
        "a cat",
        "--model",
        model,
        "--seed",
        0,
        "-W",
        32,
        "-H",
        32,
        "--dtype",
        "float32",
        "-q",
        8,
        "-o",
        tmp_path / "q.png",
    )
    assert result.exit_code == 0, result.output
    full = run(
        "generate",
        "a cat",
        "--model",
        model,
        "--seed",
        0,
        "-W",
        32,
        "-H",
        32,
        "--dtype",
        "float32",
        "-o",
        tmp_path / "f.png",
    )
    assert full.exit_code == 0
    a = np.asarray(Image.open(tmp_path / "q.png"), np.float64)
    b = np.asarray(Image.open(tmp_path / "f.png"), np.float64)
    assert 0 < np.abs(a - b).mean() < 20  # quantized weights: close to, but not the same as, full precision


def test_convert_then_generate_from_the_converted_folder(model, tmp_path):
    converted = tmp_path / "turbo-mlx"
    result = run("convert", model, converted, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert f"{converted}: sd2 (float32)" in result.output
    images = {}
    for name, folder in (("original", model), ("converted", converted)):
        out = tmp_path / f"{name}.png"
        result = run(
            "generate",
            "a cat",
            "--model",
            folder,
            "--seed",
            3,
            "-W",
            32,
            "-H",
            32,
            "--steps",
            2,
            "--dtype",
            "float32",
            "-o",
            out,
        )
        assert result.exit_code == 0, result.output
        images[name] = np.asarray(Image.open(out))
    assert np.array_equal(images["original"], images["converted"])
    result = run("info", converted)
    assert result.exit_code == 0 and "float32" in result.output


def test_tiled_decode_flag(model, tmp_path):
    out = tmp_path / "wide.png"
    result = run(
        "generate",
        "a wide harbour",
        "--model",
        model,
        "--seed",
        1,
        "-W",
        576,
        "-H",
        32,
        "--steps",
        1,
        "--dtype",
        "float32",
        "--tiled-decode",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    pipe = StableDiffusion.from_pretrained(model, dtype="float32")
    kwargs = dict(width=576, height=32, steps=1, seed=1)
    tiled, untiled = (pipe.generate("a wide harbour", tiled_decode=t, **kwargs)[0] for t in (True, False))
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(tiled))
    assert not np.array_equal(np.asarray(tiled), np.asarray(untiled))

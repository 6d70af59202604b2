"""Hostile model folders and images: every broken file is a one-line ModelLoadError (or ValueError for images)
naming the file and what was expected; nothing leaks from MLX or the JSON parser, nothing is written."""

import json
import shutil

import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import bomb_png, make_pipeline
from mlx_sd import ModelLoadError, StableDiffusion
from mlx_sd.cli import cli
from mlx_sd.convert import convert
from mlx_sd.images import load_image


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_pipeline("turbo", root / "turbo")
    convert(root / "turbo", root / "converted", dtype="float32", quantize=8, q_group_size=32)
    return root


def edit(path, **changes):
    def apply(folder):
        config = json.loads((folder / path).read_text())
        config.update(changes)
        (folder / path).write_text(json.dumps(config))

    return apply


def write(path, text):
    return lambda folder: (folder / path).write_bytes(text if isinstance(text, bytes) else text.encode())


def remove(path):
    return lambda folder: shutil.rmtree(folder / path) if (folder / path).is_dir() else (folder / path).unlink()


# case -> (source folder, change, file named in the message, words of the message)
CASES = {
    "config is an array": ("turbo", write("vae/config.json", "[1]"), "vae/config.json", "expected a JSON object"),
    "config is a string": ("turbo", write("unet/config.json", '"unet"'), "unet/config.json", "expected a JSON object"),
    "config not JSON": ("turbo", write("unet/config.json", "{'a': 1"), "unet/config.json", "not valid JSON"),
    "config not UTF-8": ("turbo", write("unet/config.json", b"\xff\xfe{}"), "unet/config.json", "not valid JSON"),
    "config nested deep": ("turbo", write("vae/config.json", "[" * 100_000), "vae/config.json", "not valid JSON"),
    "index is a number": ("turbo", write("model_index.json", "7"), "model_index.json", "expected a JSON object"),
    "vae without blocks": (
        "turbo",
        edit("vae/config.json", block_out_channels=[], down_block_types=[], up_block_types=[]),
        "vae/config.json",
        "block_out_channels must be an integer from 1",
    ),
    "negative channels ([bits] Negative dimensions)": (
        "turbo",
        edit("unet/config.json", block_out_channels=[-32, 64]),
        "unet/config.json",
        "block_out_channels must be",
    ),
    "huge channels": (
        "turbo",
        edit("unet/config.json", block_out_channels=[2**40, 64]),
        "unet/config.json",
        "must be an integer from 1 to",
    ),
    "channels as text": ("turbo", edit("vae/config.json", layers_per_block="2"), "vae/config.json", "layers_per_block"),
    "groups do not divide": ("turbo", edit("vae/config.json", norm_num_groups=7), "vae/config.json", "must divide"),
    "heads do not divide ([reshape] Cannot reshape)": (
        "turbo",
        edit("text_encoder/config.json", num_attention_heads=5),
        "text_encoder/config.json",
        "num_attention_heads must divide hidden_size",
    ),
    "zero width": ("turbo", edit("text_encoder/config.json", hidden_size=0), "text_encoder/config.json", "hidden_size"),
    "eps not a number": ("turbo", edit("unet/config.json", norm_eps="small"), "unet/config.json", "finite number"),
    "timesteps as text": (
        "turbo",
        edit("scheduler/scheduler_config.json", num_train_timesteps="x"),
        "scheduler/scheduler_config.json",
        "num_train_timesteps must be an integer",
    ),
    "zero timesteps": (
        "turbo",
        edit("scheduler/scheduler_config.json", num_train_timesteps=0),
        "scheduler/scheduler_config.json",
        "num_train_timesteps",
    ),
    "betas reversed": (
        "turbo",
        edit("scheduler/scheduler_config.json", beta_start=0.5, beta_end=0.1),
        "scheduler/scheduler_config.json",
        "beta_start",
    ),
    "garbage weights": (
        "turbo",
        write("unet/diffusion_pytorch_model.safetensors", b"\x00" * 100),
        "unet/diffusion_pytorch_model.safetensors",
        "not a valid safetensors file",
    ),
    "no tokenizer folder": ("turbo", remove("tokenizer"), "tokenizer", "missing tokenizer folder"),
    "vocabulary is an array": ("turbo", write("tokenizer/vocab.json", "[1]"), "tokenizer", "unreadable tokenizer"),
    "merges not UTF-8": ("turbo", write("tokenizer/merges.txt", b"\xff\xfe"), "tokenizer", "unreadable tokenizer"),
    "pad token a number": (
        "turbo",
        write("tokenizer/tokenizer_config.json", '{"pad_token": 5}'),
        "tokenizer",
        "unreadable tokenizer",
    ),
    "max length huge": (
        "turbo",
        edit("tokenizer/tokenizer_config.json", model_max_length=10**30),
        "tokenizer",
        "does not fit the text encoder",
    ),
    "quantization bits ([quantize] ...)": (
        "converted",
        edit("unet/config.json", quantization={"bits": -3, "group_size": 32}),
        "unet/config.json",
        "quantization must be",
    ),
    "quantization a string": (
        "converted",
        edit("unet/config.json", quantization="yes"),
        "unet/config.json",
        "quantization must be",
    ),
    "unknown family": ("converted", edit("mlx_sd.json", family="sd9"), "mlx_sd.json", "family must be one of"),
    "shard outside the folder": (
        "turbo",
        lambda f: (
            (f / "unet/diffusion_pytorch_model.safetensors").unlink(),
            (f / "unet/diffusion_pytorch_model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"w": "../../secret.safetensors"}})
            ),
        ),
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "names a shard outside its folder",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_model_folders_are_one_line_errors(models, tmp_path, case):
    source, change, named, message = CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(models / source, folder)
    change(folder)
    with pytest.raises(ModelLoadError) as e:
        StableDiffusion.from_pretrained(folder, dtype="float32").generate("a cat", width=32, height=32, steps=1)
    assert str(folder / named) in str(e.value) and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value) and "[bits]" not in str(e.value) and "[reshape]" not in str(e.value)
    out = tmp_path / "out.png"
    result = CliRunner().invoke(cli, ["generate", "a cat", "--model", str(folder), "-W", "32", "-H", "32", "-o", out])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert message in result.output and not out.exists()


def test_missing_model_index_names_the_model_folder(models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(models / "turbo", folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(ModelLoadError, match=f"missing {folder}/model_index.json: is {folder} a diffusers-format"):
        StableDiffusion.from_pretrained(folder)


@pytest.mark.parametrize("name", ["models/sd15", "./models/sd15", "a/b/c", "~/nowhere/model"])
def test_a_missing_relative_path_is_neither_a_folder_nor_a_hub_id(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        StableDiffusion.from_pretrained(name)
    message = str(e.value)
    assert "could not get" not in message and "\n" not in message
    if name == "models/sd15":  # also a valid Hub id: neither a folder nor in the (offline) Hub cache
        assert "is not a local folder (no such path), and not in the Hugging Face cache" in message
    else:
        assert "it is neither a local folder nor a Hugging Face Hub repo id" in message


def broken_images(tmp_path):
    truncated = tmp_path / "truncated.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    text = tmp_path / "text.png"
    text.write_text("not an image")
    return {
        "decompression bomb": (bomb_png(tmp_path / "bomb.png"), "decompression bomb"),
        "truncated": (truncated, "cannot read image"),
        "not an image": (text, "not an image file"),
    }


def test_broken_images_are_one_line_errors(models, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), "white").save(good)
    for kind, (path, message) in broken_images(tmp_path).items():
        with pytest.raises(ValueError, match=message) as e:
            load_image(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), kind
        for option in (["--image", path], ["--image", good, "--mask", path], ["--from-png", path]):
            args = ["generate", "a cat", "--model", models / "turbo", "-o", tmp_path / "out.png", *option]
            result = CliRunner().invoke(cli, [str(a) for a in args])
            error = result.output.strip().splitlines()[-1]  # usage errors (exit 2) print the usage line first
            assert result.exit_code in (1, 2) and error.startswith("Error: "), (kind, option, result.output)
            assert str(path) in error and "Traceback" not in result.output, (kind, option, result.output)
            assert not (tmp_path / "out.png").exists()

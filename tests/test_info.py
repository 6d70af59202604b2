"""`mlx-sd info` on hostile files: escape sequences in PNG parameters, truncated weights, garbage headers."""

import json
import struct

import pytest
from click.testing import CliRunner
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from helpers import bomb_png, make_pipeline
from mlx_sd import ModelLoadError, StableDiffusion
from mlx_sd.cli import cli
from mlx_sd.info import describe, printable
from mlx_sd.weights import safetensors_header


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    make_pipeline("sd1", folder)
    return folder


def info(path):
    return CliRunner().invoke(cli, ["info", str(path)])


def one_line_error(result, *words):
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output


def test_control_characters_in_png_parameters_are_escaped(tmp_path):
    """An OSC sequence would retitle the terminal (or worse); printed escaped, even when piped (CliRunner)."""
    path = tmp_path / "crafted.png"
    text = "a cat \x1b]0;pwned\x07 \x1b[2J\x9b31m \u202eevil\nSteps: 2, Sampler: Euler\x1b[0m, Seed: 1"
    parameters = PngInfo()
    parameters.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=parameters)
    result = info(path)
    assert result.exit_code == 0, result.output
    assert not any(c in result.output for c in "\x1b\x07\x9b\u202e")
    assert "a cat \\x1b]0;pwned\\x07 \\x1b[2J\\x9b31m \\u202eevil" in result.output
    assert "Sampler: Euler\\x1b[0m" in result.output
    assert (
        printable("caf\u00e9 \U0001f468\u200d\U0001f469 tab\there") == "caf\u00e9 \U0001f468\u200d\U0001f469 tab\\there"
    )


def test_truncated_weights_are_reported(model, tmp_path):
    broken = tmp_path / "broken"
    for f in model.rglob("*"):
        if f.is_file():
            (broken / f.relative_to(model)).parent.mkdir(parents=True, exist_ok=True)
            (broken / f.relative_to(model)).write_bytes(f.read_bytes())
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    one_line_error(info(broken), str(weights), "truncated", "bytes of data")
    with pytest.raises(ModelLoadError, match="truncated"):
        StableDiffusion.from_pretrained(broken, dtype="float32")
    assert info(model).exit_code == 0


def header_file(path, header=None, size=None, data=b""):
    if header is None:  # not even a header size
        path.write_bytes(data)
        return path
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if size is None else size) + raw + data)
    return path


HEADER_CASES = [
    ("huge.safetensors", b"{}", 2**60, b"", "no valid header size"),
    ("short.safetensors", None, None, b"abc", "no valid header size"),
    ("notjson.safetensors", b"\xff\xfe{", None, b"", "header is not JSON"),
    ("nested.safetensors", b"[" * 100_000, None, b"", "header is not JSON"),
    ("list.safetensors", [1, 2], None, b"", "not a JSON object"),
    ("entry.safetensors", {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, None, b"", "bad header"),
    ("dtype.safetensors", {"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, None, b"", "bad header"),
    (
        "shape.safetensors",
        {"w": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 4]}},
        None,
        b"",
        "need",
    ),
    ("past.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, None, b"1234", "truncated"),
]


@pytest.mark.parametrize("name,header,size,data,message", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_garbage_safetensors_headers_are_one_line_errors(tmp_path, name, header, size, data, message):
    path = header_file(tmp_path / name, header, size, data)
    with pytest.raises(ModelLoadError, match=message):
        safetensors_header(path)
    one_line_error(info(path), str(path), message)


def test_garbage_weights_in_a_model_folder(model, tmp_path):
    folder = tmp_path / "garbage"
    for f in model.rglob("*"):
        if f.is_file():
            (folder / f.relative_to(model)).parent.mkdir(parents=True, exist_ok=True)
            (folder / f.relative_to(model)).write_bytes(f.read_bytes())
    weights = header_file(folder / "vae" / "diffusion_pytorch_model.safetensors", b"{}", 2**62)
    one_line_error(info(folder), str(weights), "not a valid safetensors file")
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        StableDiffusion.from_pretrained(folder, dtype="float32")


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("jpeg.png", None, "not a PNG"),
        ("truncated.png", "truncated", "cannot read"),
        ("text.png", b"hello", "cannot read"),
        ("bomb.png", "bomb", "decompression bomb"),
    ],
)
def test_unreadable_pngs_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        Image.new("RGB", (8, 8)).save(path, format="JPEG")
    elif content == "truncated":
        Image.effect_noise((64, 64), 50).save(path)
        path.write_bytes(path.read_bytes()[:200])
    elif content == "bomb":
        bomb_png(path)
    else:
        path.write_bytes(content)
    one_line_error(info(path), str(path), message)
    with pytest.raises(ValueError, match=message):
        describe(path)


def test_model_folder_with_bad_json_is_a_one_line_error(model, tmp_path):
    folder = tmp_path / "badjson"
    for f in model.rglob("*"):
        if f.is_file():
            (folder / f.relative_to(model)).parent.mkdir(parents=True, exist_ok=True)
            (folder / f.relative_to(model)).write_bytes(f.read_bytes())
    (folder / "model_index.json").write_text("[1, 2]")
    one_line_error(info(folder), str(folder / "model_index.json"), "expected a JSON object")
    (folder / "model_index.json").write_text("{")
    one_line_error(info(folder), str(folder / "model_index.json"), "not valid JSON")

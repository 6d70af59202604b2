"""Hub downloads as the Hub is today, tested offline with a stubbed snapshot_download and repo file list: fp16
variant files for half dtypes (diffusers' variant rule), moved ids named, missing repos said plainly."""

import fnmatch
import re
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from huggingface_hub.utils import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from helpers import make_pipeline
from mlx_sd import ModelLoadError, hub
from mlx_sd.cli import cli
from mlx_sd.controlnet import CONTROLNET_PROBE
from mlx_sd.convert import convert, convert_command
from mlx_sd.hub import DEFAULT_MODEL, FALLBACK_MODEL, MOVED, resolve_model, resolve_variant, variant_patterns
from mlx_sd.loading import open_model

REPO = Path(__file__).resolve().parent.parent
# stabilityai/sd-turbo's weights as listed on the Hub (sizes in MB), plus a sharded component as SDXL repos have
SD_TURBO = {
    "model_index.json": 0,
    "scheduler/scheduler_config.json": 0,
    "text_encoder/config.json": 0,
    "text_encoder/model.safetensors": 1361,
    "text_encoder/model.fp16.safetensors": 681,
    "tokenizer/vocab.json": 1,
    "tokenizer/merges.txt": 1,
    "tokenizer/special_tokens_map.json": 0,
    "tokenizer/tokenizer_config.json": 0,
    "unet/config.json": 0,
    "unet/diffusion_pytorch_model.safetensors": 3464,
    "unet/diffusion_pytorch_model.fp16.safetensors": 1732,
    "vae/config.json": 0,
    "vae/diffusion_pytorch_model.safetensors": 335,
    "vae/diffusion_pytorch_model.fp16.safetensors": 167,
    "sd_turbo.safetensors": 5208,  # the single-file checkpoint at the top: never downloaded
    "unet/diffusion_pytorch_model.bin": 3464,  # pickle: never downloaded
}


def download(files, patterns):
    """The files snapshot_download would fetch: those matching an allow pattern."""
    return sorted(f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns))


def megabytes(files):
    return sum(SD_TURBO[f] for f in files if f.endswith(".safetensors"))


def test_half_dtypes_download_the_fp16_variant():
    """The first run of SD-Turbo in float16 fetched 5.2 GB of float32 files where the 2.6 GB fp16 files serve."""
    half = download(SD_TURBO, variant_patterns(SD_TURBO, resolve_variant("float16")))
    full = download(SD_TURBO, variant_patterns(SD_TURBO, resolve_variant("float32")))
    assert [f for f in half if f.endswith(".safetensors")] == [
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert [f for f in full if f.endswith(".safetensors")] == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert megabytes(half) == 2580 and megabytes(full) == 5160
    assert "tokenizer/vocab.json" in half and "model_index.json" in half and "scheduler/scheduler_config.json" in half
    assert resolve_variant(mx.bfloat16) == resolve_variant("bfloat16") == "fp16"
    assert resolve_variant("float16", "none") is None and resolve_variant("float32", "fp16") == "fp16"
    with pytest.raises(ValueError, match="variant must be a name"):
        resolve_variant("float16", "../fp16")


def test_variant_rule_per_component_and_sharded_files():
    """diffusers' rule: a component without variant files falls back to its plain files; sharded variants come
    with their index (diffusion_pytorch_model.safetensors.index.fp16.json)."""
    files = [
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert download(files, variant_patterns(files, "fp16")) == [
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert len(download(files, variant_patterns(files, None))) == 4
    with pytest.raises(ModelLoadError, match="has no bf16 variant files"):
        variant_patterns(files, "bf16", explicit=True)


@pytest.fixture(scope="module")
def variant_folder(tmp_path_factory):
    """A tiny diffusers folder whose fp16 variant files hold other weights than its plain files (x 0.5), so that
    which files were read shows in the result."""
    folder = tmp_path_factory.mktemp("variant")
    make_pipeline("sd1", folder)
    for plain in folder.glob("*/*.safetensors"):
        weights = {k: (v * 0.5).astype(mx.float16) for k, v in mx.load(str(plain)).items()}
        mx.save_safetensors(str(plain.with_name(plain.stem + ".fp16.safetensors")), weights)
    return folder


class FakeHub:
    """snapshot_download and HfApi.list_repo_files of a repo holding `folder`'s files."""

    def __init__(self, monkeypatch, folder, error=None):
        self.asked, files = [], [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        fake = self

        class Api:
            def list_repo_files(self, repo_id):
                if error:
                    raise error
                return files

        def snapshot_download(repo_id, allow_patterns=None):
            fake.asked.append((repo_id, allow_patterns))
            if error:
                raise error
            return str(folder)

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def unet_weight(folder):
    return np.array(mx.load(str(folder / "unet" / "mlx_model.safetensors"))["conv_in.weight"], np.float32)


def test_convert_reads_the_variant_the_dtype_asks_for(variant_folder, tmp_path, monkeypatch):
    hub_ = FakeHub(monkeypatch, variant_folder)
    convert("someone/sd-model", tmp_path / "half", dtype="float16")
    convert("someone/sd-model", tmp_path / "full", dtype="float32")
    convert("someone/sd-model", tmp_path / "forced", dtype="float16", variant="none")
    # each conversion first asks for the config files only (is it a ControlNet?), then for the weights
    assert [p for _, p in hub_.asked[::2]] == [CONTROLNET_PROBE] * 3
    (_, half), (_, full), (_, forced) = hub_.asked[1::2]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in half
    assert "unet/diffusion_pytorch_model.safetensors" in full and "unet/diffusion_pytorch_model.safetensors" in forced
    assert not any("fp16" in p for p in full + forced) and not any(p.endswith("model.safetensors") for p in half)
    plain = unet_weight(tmp_path / "full")
    assert np.allclose(unet_weight(tmp_path / "half"), 0.5 * plain, atol=1e-3)  # read the fp16 files
    assert np.allclose(unet_weight(tmp_path / "forced"), plain, atol=1e-3)
    result = CliRunner().invoke(convert_command, ["someone/sd-model", str(tmp_path / "cli"), "--variant", "fp16"])
    assert result.exit_code == 0, result.output
    assert np.allclose(unet_weight(tmp_path / "cli"), 0.5 * plain, atol=1e-3)
    result = CliRunner().invoke(convert_command, ["someone/sd-model", str(tmp_path / "bad"), "--variant", "a/b"])
    assert result.exit_code == 1 and "variant must be a name" in result.output


def test_open_model_downloads_the_variant(variant_folder, monkeypatch):
    hub_ = FakeHub(monkeypatch, variant_folder)
    assert open_model("someone/sd-model", dtype=mx.float16) == (variant_folder, None)
    assert "vae/diffusion_pytorch_model.fp16.safetensors" in hub_.asked[0][1]
    open_model("someone/sd-model")  # no dtype: the plain files
    assert "vae/diffusion_pytorch_model.safetensors" in hub_.asked[1][1]


def hub_error(cls, message="404 Client Error"):
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


def test_moved_ids_name_their_replacement(tmp_path, monkeypatch):
    FakeHub(monkeypatch, tmp_path, hub_error(RepositoryNotFoundError))
    for old, new in MOVED.items():
        with pytest.raises(ModelLoadError) as e:
            resolve_model(old)
        assert f"the same weights are at {new!r}: use that id" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelLoadError) as e:
        resolve_model("someone/no-such-model")
    assert str(e.value) == (
        "model 'someone/no-such-model' is not a local folder (no such path) and not found on the Hugging Face Hub"
    )
    result = CliRunner().invoke(cli, ["generate", "a cat", "--model", "runwayml/stable-diffusion-v1-5"])
    assert result.exit_code == 1 and "'stable-diffusion-v1-5/stable-diffusion-v1-5'" in result.output
    assert result.output.count("\n") == 1


def test_other_hub_failures_are_one_line(tmp_path, monkeypatch):
    FakeHub(monkeypatch, tmp_path, hub_error(GatedRepoError))
    with pytest.raises(ModelLoadError, match="is gated on the Hugging Face Hub: accept its terms"):
        resolve_model("someone/gated")
    FakeHub(monkeypatch, tmp_path, hub_error(LocalEntryNotFoundError, "cannot find the requested files"))
    with pytest.raises(ModelLoadError) as e:
        resolve_model("runwayml/stable-diffusion-inpainting")
    assert "not in the Hugging Face cache (HF_HUB_OFFLINE is set)" in str(e.value)
    assert "'stable-diffusion-v1-5/stable-diffusion-inpainting'" in str(e.value)
    with pytest.raises(ModelLoadError, match=f"or try {FALLBACK_MODEL!r}"):
        resolve_model(DEFAULT_MODEL)


def test_readme_and_help_name_ids_that_exist_today():
    """Every Hub id the README, the package's texts and `--help` name is one that exists today: a moved id appears
    only on a line that names its replacement (the README's table of moved ids)."""
    texts = {"README.md": (REPO / "README.md").read_text()}
    texts |= {str(p): p.read_text() for p in (REPO / "mlx_sd").glob("*.py") if p.name != "hub.py"}
    for command in (["generate", "--help"], ["convert", "--help"], ["--help"]):
        texts[" ".join(command)] = CliRunner().invoke(cli, command).output
    for where, text in texts.items():
        for line in text.splitlines():
            for old, new in MOVED.items():
                named = re.search(rf"{re.escape(old)}(?![\w.-])", line)
                assert not named or (where == "README.md" and new in line), f"{where} names {old}: {line}"
    assert DEFAULT_MODEL not in MOVED and hub.FALLBACK_MODEL not in MOVED

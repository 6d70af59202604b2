"""Output names and PNG files of `mlx-sd generate`: patterns, numbering, atomic claims, modes, never losing a file."""

import errno
import os
import stat
import threading
import time

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import make_pipeline, unwritable_folder
from mlx_sd import StableDiffusion
from mlx_sd.cli import cli
from mlx_sd.outputs import MAX_IMAGES, output_paths, parse_pattern
from mlx_sd.png import save_png

IMAGE = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
OTHER = Image.fromarray(np.full((4, 4, 3), 200, dtype=np.uint8))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("turbo")
    make_pipeline("turbo", folder)
    return folder


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def generate(model, *args):
    return run("generate", "a cat", "--model", model, "--seed", 5, "-W", 32, "-H", 32, "--dtype", "float32", *args)


def names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_file_appearing_during_generation_is_kept(model, tmp_path, monkeypatch):
    out = tmp_path / "out.png"
    real = StableDiffusion.generate

    def generate_while_someone_writes(self, *args, **kwargs):
        images = real(self, *args, **kwargs)
        out.write_bytes(b"written meanwhile")
        return images

    monkeypatch.setattr(StableDiffusion, "generate", generate_while_someone_writes)
    result = generate(model, "-o", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == b"written meanwhile"
    assert names(tmp_path) == ["out-1.png", "out.png"] and f"seed 5: {tmp_path / 'out-1.png'}" in result.output
    assert Image.open(tmp_path / "out-1.png").size == (32, 32)


def test_two_writers_with_the_same_name_both_keep_their_image(tmp_path):
    # both chose their name before either saved, as two processes started with the same -o do
    first, second = output_paths(tmp_path / "out.png", [1]), output_paths(tmp_path / "out.png", [2])
    assert first == second == [tmp_path / "out.png"]
    assert save_png(IMAGE, first[0]) == tmp_path / "out.png"
    assert save_png(OTHER, second[0]) == tmp_path / "out-1.png"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(IMAGE))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out-1.png")), np.asarray(OTHER))
    # many writers at once: every image gets its own file, no temporary file is left
    barrier = threading.Barrier(8)
    written = []

    def writer():
        barrier.wait()
        written.append(save_png(IMAGE, tmp_path / "same.png"))

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(written)) == 8 and len(names(tmp_path)) == 10
    assert all(Image.open(p).size == (4, 4) for p in written)


def test_without_hard_links_names_are_still_claimed_exclusively(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "out.png").write_bytes(b"mine")
    assert save_png(IMAGE, tmp_path / "out.png") == tmp_path / "out-1.png"
    assert (tmp_path / "out.png").read_bytes() == b"mine" and names(tmp_path) == ["out-1.png", "out.png"]


def test_png_modes_follow_the_umask(tmp_path, umask_022):
    path = save_png(IMAGE, tmp_path / "a.png")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path = save_png(IMAGE, path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_overwrite_keeps_a_read_only_file(model, tmp_path, monkeypatch):
    out = tmp_path / "out.png"
    out.write_bytes(b"read-only")
    out.chmod(0o444)
    if os.geteuid() == 0:  # root may write any file: pretend to be a user who may not write this one
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(out) else real(p, mode))
    with pytest.raises(PermissionError, match="is read-only: not replaced"):
        save_png(IMAGE, out, overwrite=True)
    result = generate(model, "-o", out, "--overwrite")
    assert result.exit_code == 1 and "is read-only: not replaced" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert out.read_bytes() == b"read-only" and names(tmp_path) == ["out.png"]
    monkeypatch.undo()
    out.chmod(0o644)  # writable: replaced
    assert save_png(IMAGE, out, overwrite=True) == out and Image.open(out).size == (4, 4)


def test_unwritable_folder_is_refused_before_the_model_loads(model, tmp_path, monkeypatch):
    folder = unwritable_folder(tmp_path)
    loads = []
    monkeypatch.setattr(StableDiffusion, "from_pretrained", lambda *a, **k: loads.append(a))
    result = generate(model, "-o", folder / "out.png")
    assert result.exit_code == 2 and "cannot write to folder" in result.output, result.output
    assert loads == []


@pytest.mark.parametrize(
    "pattern,expected",
    [
        ("cat-{seed}-{index}.png", ["cat-7-0.png", "cat-8-1.png"]),
        ("cat-{seed:05}.png", ["cat-00007.png", "cat-00008.png"]),
        ("cat-{index:03d}-{seed:012d}.png", ["cat-000-000000000007.png", "cat-001-000000000008.png"]),
        ("{{x}}-{seed}.png", ["{x}-7.png", "{x}-8.png"]),
        ("fixed.png", ["fixed.png", "fixed-1.png"]),
    ],
)
def test_accepted_patterns(tmp_path, pattern, expected):
    assert output_paths(tmp_path / pattern, [7, 8]) == [tmp_path / name for name in expected]


@pytest.mark.parametrize(
    "pattern",
    [
        "{seed:>9999999999}.png",  # unbounded padding: 16 GB of name
        "{seed:013}.png",
        "{seed:00}.png",
        "{seed:5}.png",
        "{seed.png",
        "seed}.png",
        "{0}.png",
        "{}.png",
        "{seed.real}.png",
        "{seed[0]}.png",
        "{seed!r}.png",
        "{step}.png",
    ],
)
def test_rejected_patterns(tmp_path, pattern):
    with pytest.raises(click.BadParameter, match="unknown field") as e:
        output_paths(tmp_path / pattern, [7])
    assert "\n" not in e.value.format_message()


def test_rejected_pattern_is_a_one_line_usage_error(model, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(StableDiffusion, "from_pretrained", lambda *a, **k: loads.append(a))
    for pattern in ("{seed.png", "{0}.png", "{seed:>99999}.png", "{seed:05}/x.png"):
        result = generate(model, "-o", tmp_path / pattern)
        assert result.exit_code == 2, (pattern, result.output)
        assert "Traceback" not in result.output and "-o/--output" in result.output
    assert loads == [] and list(tmp_path.iterdir()) == []


def test_naming_is_linear_in_the_number_of_images(tmp_path):
    """Today's quadratic-per-image search took 70 s for 1000 images with one fixed name."""
    for n in range(1, 51):
        (tmp_path / f"out-{n}.png").write_bytes(b"")
    (tmp_path / "out.png").write_bytes(b"")
    start = time.perf_counter()
    paths = output_paths(tmp_path / "out.png", list(range(MAX_IMAGES)))
    assert time.perf_counter() - start < 2  # measured 0.1 s
    assert paths[:2] == [tmp_path / "out-51.png", tmp_path / "out-52.png"] and len(set(paths)) == MAX_IMAGES
    assert parse_pattern("a{seed}b") == ["a", ("seed", 0), "b"]


def test_number_of_images_is_bounded(model, tmp_path, monkeypatch):
    with pytest.raises(click.BadParameter, match=f"at most {MAX_IMAGES} images"):
        output_paths(tmp_path / "out.png", list(range(MAX_IMAGES + 1)))
    loads = []
    monkeypatch.setattr(StableDiffusion, "from_pretrained", lambda *a, **k: loads.append(a))
    result = generate(model, "-n", MAX_IMAGES + 1, "-o", tmp_path / "out.png")
    assert result.exit_code == 2 and f"-n/--num-images must be between 1 and {MAX_IMAGES}" in result.output
    assert loads == []

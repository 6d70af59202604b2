"""Never losing a user's file in `mlx-sd convert` and `generate`: --force only over mlx_sd folders, a lock against
two conversions, recovery after a kill, disk full, folder modes, and SIGTERM / SIGHUP handled like Ctrl-C."""

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from helpers import make_pipeline
from mlx_sd import convert as convert_module
from mlx_sd.convert import convert, convert_command

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    make_pipeline("sd1", folder)
    return folder


@pytest.fixture(scope="module")
def turbo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("turbo")
    make_pipeline("turbo", folder)
    return folder


def manifest(folder):
    return json.loads((folder / "mlx_sd.json").read_text())


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_force_replaces_only_mlx_sd_or_empty_folders(source, tmp_path):
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.txt").write_text("years of work")
    with pytest.raises(FileExistsError, match=r"refusing to replace .* \(holding mlx_sd.json\)"):
        convert(source, documents, dtype="float32", force=True)
    result = CliRunner().invoke(convert_command, [str(source), str(documents), "--force"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "refusing to replace" in result.output
    assert names(documents) == ["thesis.txt"]
    a_file = tmp_path / "notes"
    a_file.write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        convert(source, a_file, dtype="float32", force=True)
    assert a_file.read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(source, empty, dtype="float32", force=True)
    assert manifest(empty)["dtype"] == "float32"
    convert(source, empty, dtype="float16", force=True)  # an mlx_sd folder: replaced
    assert manifest(empty)["dtype"] == "float16"
    assert names(tmp_path) == ["documents", "empty", "notes"]


def test_a_folder_appearing_during_conversion_is_kept(source, tmp_path, monkeypatch):
    out, real = tmp_path / "mlx", convert_module._convert_component

    def someone_writes(folder, name, *args):
        if not out.exists():
            out.mkdir()
            (out / "mlx_sd.json").write_text("{}")
        return real(folder, name, *args)

    monkeypatch.setattr(convert_module, "_convert_component", someone_writes)
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        convert(source, out, dtype="float32")
    assert names(tmp_path) == ["mlx"] and names(out) == ["mlx_sd.json"]


def test_converted_folders_get_normal_modes(source, tmp_path):
    old = os.umask(0o022)
    try:
        out = convert(source, tmp_path / "mlx", dtype="float32")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_dir()} == {0o755}
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()} == {0o644}


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_work_folders_of_dead_conversions_are_removed(source, tmp_path):
    dead, alive = dead_pid(), os.getppid()
    for pid in (dead, alive):
        work = tmp_path / f".mlx.converting-{pid}-abcd1234"
        (work / "unet").mkdir(parents=True)
        (work / "unet" / "mlx_model.safetensors").write_bytes(b"half written")
    (tmp_path / f".other.converting-{dead}-abcd1234").mkdir()  # another output's: not ours to judge here
    convert(source, tmp_path / "mlx", dtype="float32")
    assert names(tmp_path) == [f".mlx.converting-{alive}-abcd1234", f".other.converting-{dead}-abcd1234", "mlx"]


def run_python(code, timeout=300):
    script = f"import sys\nsys.path[:0] = [{str(REPO)!r}]\n{code}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)


KILLED_BETWEEN_RENAMES = """
import os
from mlx_sd import convert as c
c._install = lambda work, output: os._exit(9)  # killed between the two renames of --force
c.convert({source!r}, {out!r}, dtype="float32", force=True)
"""


@pytest.mark.parametrize("new_complete", [True, False])
def test_force_swap_interrupted_between_renames_is_recovered(source, tmp_path, new_complete):
    out = tmp_path / "mlx"
    convert(source, out, dtype="float16")
    killed = run_python(KILLED_BETWEEN_RENAMES.format(source=str(source), out=str(out)))
    assert killed.returncode == 9, killed.stderr
    assert not out.exists()  # the window: no model under the name
    hidden = [p for p in tmp_path.iterdir() if ".replaced-" in p.name or ".converting-" in p.name]
    assert len(hidden) == 2
    if not new_complete:  # as if the new folder were not finished
        (next(p for p in hidden if ".converting-" in p.name) / "mlx_sd.json").unlink()
    expected = "finished the replacement" if new_complete else "restored the folder"
    with pytest.warns(UserWarning, match=expected), pytest.raises(FileExistsError, match="already exists"):
        convert(source, out, dtype="float32")  # the next run recovers first
    assert manifest(out)["dtype"] == ("float32" if new_complete else "float16")
    assert names(tmp_path) == ["mlx"]


def test_two_conversions_into_one_folder(source, tmp_path, monkeypatch):
    real = convert_module._convert_component
    started, release = threading.Event(), threading.Event()
    first = threading.current_thread()

    def slow_in_the_first(*args, **kwargs):
        if threading.current_thread() is not first:
            started.set()
            release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "_convert_component", slow_in_the_first)
    out, results = tmp_path / "mlx", []
    winner = threading.Thread(target=lambda: results.append(convert(source, out, dtype="float32")))
    winner.start()
    assert started.wait(60)
    try:
        with pytest.raises(FileExistsError, match=f"another conversion into {out} is running \\(pid {os.getpid()}\\)"):
            convert(source, out, dtype="float16")
        result = CliRunner().invoke(convert_command, [str(source), str(out)])
        assert result.exit_code == 1 and "another conversion" in result.output and result.output.count("\n") == 1
    finally:
        release.set()
        winner.join()
    assert results == [out] and manifest(out)["dtype"] == "float32" and names(tmp_path) == ["mlx"]
    with pytest.raises(FileExistsError, match="already exists"):  # the loser, later
        convert(source, out, dtype="float16")


def test_disk_full_is_one_line_and_leaves_nothing(source, tmp_path, monkeypatch):
    real, calls = mx.save_safetensors, []

    def full_on_the_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise RuntimeError("[write] Unable to write 1048576 bytes to file.")
        return real(*args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", full_on_the_second)
    result = CliRunner().invoke(convert_command, [str(source), str(tmp_path / "mlx"), "--dtype", "float32"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert f"not enough space in {tmp_path} to write mlx: the conversion needs up to about" in result.output
    assert " MiB, " in result.output and "free (nothing was written)" in result.output
    assert list(tmp_path.iterdir()) == []
    count = sum(v.size for p in source.glob("*/*.safetensors") for v in mx.load(str(p)).values())
    needed = convert_module._estimated_size(source, ["text_encoder", "unet", "vae"], None, mx.float32)
    assert needed == 4 * count


def start_cli(tmp_path, patch, *args):
    """`mlx-sd ARGS` in a new process with `patch` applied, once it reached the patched point (its marker)."""
    marker = tmp_path / "reached"
    argv = ["mlx-sd", *map(str, args)]
    code = f"MARKER = {str(marker)!r}\n{patch}\nfrom mlx_sd.cli import main\nsys.argv = {argv!r}\nmain()\n"
    script = f"import sys\nsys.path[:0] = [{str(REPO)!r}]\n{code}"
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    marker.unlink()
    return process


STALL_CONVERSION = """
import pathlib, time
from mlx_sd import convert as c
real = c._convert_component
def stall(folder, name, work, *args):
    real(folder, name, work, *args)
    pathlib.Path(MARKER).touch()
    time.sleep(120)
c._convert_component = stall
"""
STALL_GENERATION = """
import pathlib, time
from mlx_sd import StableDiffusion
def stall(*args, **kwargs):
    pathlib.Path(MARKER).touch()
    time.sleep(120)
StableDiffusion.generate = stall
"""
STALL_PNG_WRITE = """
import pathlib, time
from PIL import Image
def stall(self, fp, *args, **kwargs):
    fp.write(b"half a PNG")
    fp.flush()
    pathlib.Path(MARKER).touch()
    time.sleep(120)
Image.Image.save = stall
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signals_during_conversion_act_as_ctrl_c(source, tmp_path, signum):
    out = tmp_path / "out"
    out.mkdir()
    process = start_cli(tmp_path, STALL_CONVERSION, "convert", source, out / "mlx", "--dtype", "float32")
    assert len(list(out.iterdir())) == 2  # the work folder and the lock
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted; nothing was written" in stderr, stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("patch", [STALL_GENERATION, STALL_PNG_WRITE], ids=["generating", "writing the PNG"])
def test_sigterm_during_generation_acts_as_ctrl_c(turbo, tmp_path, patch):
    out = tmp_path / "out"
    out.mkdir()
    args = ["generate", "a cat", "--model", turbo, "-W", 32, "-H", 32, "--dtype", "float32", "-o", out / "x.png"]
    process = start_cli(tmp_path, patch, *args)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted; no partial file was written" in stderr, stderr
    assert list(out.iterdir()) == []

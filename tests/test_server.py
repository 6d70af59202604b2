"""`mlx-sd serve` driven by the real clients: webuiapi (A1111) and openai, against a real uvicorn server with tiny
float32 models. Images must equal generate()'s for the same settings and seed, exactly (same weights, same
backend, same batch shapes). Also: FIFO queue with 4 clients, progress, interrupt, disconnects, the queue bound,
LoRA tags, and the `mlx-sd serve` command itself."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import openai
import pytest
import requests
import webuiapi
from click.testing import CliRunner
from PIL import Image

from helpers import running_server
from mlx_sd import GenerationSettings, StableDiffusion
from mlx_sd.cli import cli
from mlx_sd.schedulers import SAMPLERS

PROMPT = "a lighthouse on a cliff, (oil painting:1.2)"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """style: a real LoRA for the tiny SD 1.x UNet (Kohya keys, one attention layer); broken: not a LoRA file."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("loras")
    block = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
    rng, factors = np.random.default_rng(0), {}
    for layer in (f"{block}_to_q", f"{block}_to_k", f"{block}_to_v", f"{block}_to_out_0"):
        factors[f"{layer}.lora_down.weight"] = 2 * rng.standard_normal((2, 32))
        factors[f"{layer}.lora_up.weight"] = 2 * rng.standard_normal((32, 2))
    save_file({k: v.astype(np.float32) for k, v in factors.items()}, folder / "style.safetensors")
    for name in ("broken.safetensors", "notes.txt", ".hidden.safetensors"):
        (folder / name).write_bytes(b"not a real file")
    return folder


@pytest.fixture(scope="module")
def served(server_models, lora_dir):
    with running_server(models_dir=server_models, lora_dir=lora_dir, max_queue=8) as (url, server):
        yield url, server


@pytest.fixture(scope="module")
def reference(server_models):
    """The same model loaded here, for generate(), named as the server names it."""
    pipe = StableDiffusion.from_pretrained(server_models / "sd1", dtype="float32")
    pipe.name = "sd1"
    return pipe


@pytest.fixture
def a1111(served):
    url, _ = served
    port = int(url.rsplit(":", 1)[1])
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=3)


def pixels(images):
    return np.stack([np.asarray(image.convert("RGB")) for image in images])


def init_image():
    y, x = np.mgrid[0:32, 0:32]
    rgb = np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def mask_image():
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    return mask


def test_webuiapi_txt2img_equals_generate(a1111, reference):
    result = a1111.txt2img(
        prompt=PROMPT,
        negative_prompt="blurry",
        seed=123,
        steps=3,
        cfg_scale=5.0,
        width=32,
        height=48,
        batch_size=2,
        sampler_name="Euler a",
    )
    expected = reference.generate(
        PROMPT,
        negative_prompt="blurry",
        seed=123,
        steps=3,
        guidance_scale=5.0,
        width=32,
        height=48,
        num_images=2,
        sampler="euler_a",
    )
    np.testing.assert_array_equal(pixels(result.images), pixels(expected))
    assert result.info["all_seeds"] == [123, 124]
    assert result.info["infotexts"] == [expected.infotext(0), expected.infotext(1)]
    assert [image.info["parameters"] for image in result.images] == result.info["infotexts"]
    settings, model = GenerationSettings.from_infotext(result.info["infotexts"][1])
    assert (settings.seed, settings.sampler, settings.steps, model) == (124, "Euler a", 3, "sd1")
    assert result.parameters["prompt"] == PROMPT


def test_webuiapi_n_iter_runs_batches_with_consecutive_seeds(a1111, reference):
    result = a1111.txt2img(prompt=PROMPT, seed=40, steps=2, cfg_scale=3.0, width=32, height=32, n_iter=2)
    assert result.info["all_seeds"] == [40, 41]
    second = reference.generate(PROMPT, seed=41, steps=2, guidance_scale=3.0, width=32, height=32, sampler="euler_a")
    np.testing.assert_array_equal(pixels(result.images[1:]), pixels(second))


def test_webuiapi_img2img_and_inpainting_equal_generate(a1111, reference):
    common = dict(seed=7, steps=4, cfg_scale=4.0, width=32, height=32)
    result = a1111.img2img(images=[init_image()], prompt=PROMPT, denoising_strength=0.6, **common)
    expected = reference.generate(
        PROMPT,
        image=init_image(),
        strength=0.6,
        seed=7,
        steps=4,
        guidance_scale=4.0,
        width=32,
        height=32,
        sampler="euler_a",
    )
    np.testing.assert_array_equal(pixels(result.images), pixels(expected))
    assert "Denoising strength: 0.6" in result.info["infotexts"][0]
    inpainted = a1111.img2img(
        images=[init_image()], mask_image=mask_image(), mask_blur=2, prompt=PROMPT, denoising_strength=0.9, **common
    )
    expected = reference.generate(
        PROMPT,
        image=init_image(),
        mask=mask_image(),
        mask_blur=2,
        strength=0.9,
        seed=7,
        steps=4,
        guidance_scale=4.0,
        width=32,
        height=32,
        sampler="euler_a",
    )
    np.testing.assert_array_equal(pixels(inpainted.images), pixels(expected))
    assert inpainted.parameters["init_images"] is None  # not echoed back


def test_webuiapi_options_switch_models(a1111):
    assert a1111.util_get_model_names() == ["sd1", "turbo"]
    assert a1111.util_get_current_model() == "sd1"
    try:
        a1111.set_options({"sd_model_checkpoint": "turbo", "CLIP_stop_at_last_layers": 2})
        assert a1111.get_options()["sd_model_checkpoint"] == "turbo"
        result = a1111.txt2img(prompt=PROMPT, seed=1, width=32, height=32, steps=1)
        assert result.info["sd_model_name"] == "turbo" and result.info["clip_skip"] == 2
        assert "Model: turbo" in result.info["infotexts"][0] and "Clip skip: 2" in result.info["infotexts"][0]
        # a request may name the model itself (A1111's override_settings); it stays loaded
        result = a1111.txt2img(
            prompt=PROMPT,
            seed=1,
            width=32,
            height=32,
            steps=1,
            override_settings={"sd_model_checkpoint": "sd1", "CLIP_stop_at_last_layers": 1},
        )
        assert result.info["sd_model_name"] == "sd1" and result.info["clip_skip"] == 1
        assert a1111.get_options()["sd_model_checkpoint"] == "sd1"
    finally:
        a1111.set_options({"sd_model_checkpoint": "sd1", "CLIP_stop_at_last_layers": 1})


def test_webuiapi_samplers_are_the_library_s(a1111):
    names = a1111.util_get_sampler_names()
    assert names == sorted(s.display for s in SAMPLERS.values())
    for name in names:
        result = a1111.txt2img(prompt=PROMPT, seed=3, steps=2, width=32, height=32, sampler_name=name)
        assert result.info["sampler_name"] == name
    karras = a1111.txt2img(
        prompt=PROMPT, seed=3, steps=2, width=32, height=32, sampler_name="DPM++ 2M", scheduler="Karras"
    )
    assert (karras.info["sampler_name"], karras.info["scheduler"]) == ("DPM++ 2M", "Karras")
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in karras.info["infotexts"][0]


def test_webuiapi_interrupt_stops_within_one_step(a1111, served):
    _, server = served
    results, polls = [], []
    job = threading.Thread(target=lambda: results.append(a1111.txt2img(prompt=PROMPT, steps=300, width=32, height=32)))
    job.start()
    task, deadline = None, time.monotonic() + 30
    while task is None or task.steps_done < 3:
        assert time.monotonic() < deadline
        task = server.worker.current or task
        progress = a1111.get_progress()
        polls.append((progress["state"]["sampling_step"], progress["progress"]))
        time.sleep(0.02)
    a1111.interrupt()
    job.join(timeout=60)
    (result,) = results
    assert result.info["interrupted"] and len(result.images) == 1
    assert task.interrupted_at >= 3 and task.steps_done - task.interrupted_at <= 1, (
        task.interrupted_at,
        task.steps_done,
    )
    steps = [s for s, _ in polls if s]
    assert steps == sorted(steps) and [p for _, p in polls] == sorted(p for _, p in polls)
    assert a1111.get_progress()["state"]["job_count"] == 0


def test_openai_generate_equals_generate(served, reference):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["sd1", "turbo"]
    response = client.images.generate(
        prompt=PROMPT,
        n=2,
        size="32x40",
        response_format="b64_json",
        extra_body={"seed": 9, "steps": 3, "negative_prompt": "fog", "sampler": "ddim"},
    )
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in response.data]
    expected = reference.generate(
        PROMPT, negative_prompt="fog", seed=9, steps=3, width=32, height=40, num_images=2, sampler="ddim"
    )
    np.testing.assert_array_equal(pixels(images), pixels(expected))
    assert images[1].info["parameters"] == expected.infotext(1)
    jpeg = client.images.generate(
        prompt=PROMPT, size="32x32", output_format="jpeg", output_compression=90, extra_body={"steps": 1}
    )
    assert Image.open(io.BytesIO(base64.b64decode(jpeg.data[0].b64_json))).format == "JPEG"


def test_openai_edit_repaints_the_transparent_area(served, reference):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    alpha = Image.eval(mask_image(), lambda v: 255 - v)  # OpenAI: fully transparent = edit
    openai_mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    openai_mask.putalpha(alpha)
    files = {}
    for name, image in (("image", init_image()), ("mask", openai_mask)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files[name] = (f"{name}.png", buffer.getvalue(), "image/png")
    response = client.images.edit(
        image=files["image"],
        mask=files["mask"],
        prompt=PROMPT,
        size="32x32",
        extra_body={"seed": 5, "steps": 4, "strength": 0.9, "guidance_scale": 4.0},
    )
    edited = Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json)))
    expected = reference.generate(
        PROMPT,
        image=init_image(),
        mask=mask_image(),
        strength=0.9,
        seed=5,
        steps=4,
        guidance_scale=4.0,
        width=32,
        height=32,
    )
    np.testing.assert_array_equal(pixels([edited]), pixels(expected))


def post_txt2img(url, task_id, steps, seed, done):
    response = requests.post(
        f"{url}/sdapi/v1/txt2img",
        json={"prompt": PROMPT, "steps": steps, "seed": seed, "width": 32, "height": 32, "force_task_id": task_id},
        timeout=120,
    )
    done.append((task_id, response.status_code, json.loads(response.json()["info"])["all_seeds"]))


def test_four_clients_are_served_in_order_with_monotonic_progress(served):
    url, server = served
    done, seen, stop = [], [], threading.Event()

    def watch():
        while not stop.is_set():
            p = requests.get(f"{url}/sdapi/v1/progress", params={"skip_current_image": "true"}).json()
            if p["current_task"]:
                seen.append((p["current_task"], p["state"]["sampling_step"], p["progress"]))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    clients = []
    for i in range(4):
        clients.append(threading.Thread(target=post_txt2img, args=(url, f"client-{i}", 12, 100 + i, done)))
        clients[-1].start()
        deadline = time.monotonic() + 10
        while server.worker.queued() + (server.worker.current is not None) < i + 1:  # queued in this order
            assert time.monotonic() < deadline
            time.sleep(0.002)
    for client in clients:
        client.join(timeout=120)
    stop.set()
    watcher.join()
    assert done == [(f"client-{i}", 200, [100 + i]) for i in range(4)]  # all served, first come first served
    order = [task for i, (task, _, _) in enumerate(seen) if i == 0 or seen[i - 1][0] != task]
    assert order == [f"client-{i}" for i in range(4)], order
    for task in order:
        steps = [(step, share) for t, step, share in seen if t == task]
        assert steps == sorted(steps), (task, steps)
    print(f"\nprogress polls: {len(seen)}, tasks seen running in order: {order}")


def test_a_client_that_disconnects_is_cancelled_at_the_next_step(served):
    url, server = served
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": PROMPT, "steps": 400, "width": 32, "height": 32, "force_task_id": "gone"}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (f"{host}:{port}".encode(), len(body), body)
    )
    deadline = time.monotonic() + 30
    while (task := server.worker.current) is None or task.id != "gone" or task.steps_done < 2:
        assert time.monotonic() < deadline, sock.recv(1000)
        time.sleep(0.01)
    sock.close()
    closed_at = task.steps_done
    deadline = time.monotonic() + 30
    while server.worker.current is task and time.monotonic() < deadline:
        time.sleep(0.01)
    assert task.cancelled.is_set() and task.steps_done - closed_at <= 2, (closed_at, task.steps_done)
    assert (
        requests.post(
            f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 32, "height": 32}
        ).status_code
        == 200
    )


def test_a_full_queue_answers_503(served):
    url, server = served
    server.worker.max_queue, done = 1, []
    try:
        running = threading.Thread(target=post_txt2img, args=(url, "long", 400, 1, done))
        running.start()
        deadline = time.monotonic() + 30
        while server.worker.current is None or server.worker.current.id != "long":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        waiting = threading.Thread(target=post_txt2img, args=(url, "waiting", 1, 2, done))
        waiting.start()
        while server.worker.queued() < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        full = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1})
        rejected = requests.post(f"{url}/v1/images/generations", json={"prompt": "x"})
        requests.post(f"{url}/sdapi/v1/interrupt")
        running.join(timeout=60)
        waiting.join(timeout=60)
    finally:
        server.worker.max_queue = 8
    assert full.status_code == 503 and "queue is full" in full.json()["detail"]
    assert rejected.status_code == 503 and rejected.json()["error"]["code"] == "queue_full"
    assert [(task, status) for task, status, _ in done] == [("long", 200), ("waiting", 200)]


def test_loras_are_listed_and_tags_checked(a1111, served):
    url, _ = served
    assert [(lora["name"], lora["path"]) for lora in a1111.get_loras()] == [
        ("broken", "broken.safetensors"),
        ("style", "style.safetensors"),
    ]
    for prompt, expected in (
        ("a cat <lora:missing:0.5>", "no LoRA 'missing'"),
        ("a cat <lora:../style:1>", "invalid LoRA name '../style'"),
        ("a cat <lora:style:much>", "LoRA scale must be a number, got 'much'"),
        ("a cat <lora:style:nan>", "LoRA scale must be a finite number"),
        ("a cat <lora:broken:1>", "broken.safetensors"),
    ):
        response = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 1})
        assert response.status_code == 422 and expected in response.json()["detail"], response.text


def test_lora_tags_apply_as_in_the_api(a1111, served, lora_dir, server_models):
    """`<lora:style:0.8>` in a request's prompt: the API's image with the same prompt and LoRA folder, different from
    the image without it; the infotext keeps the tag and gains A1111's `Lora hashes`; the next request without the
    tag has no LoRA."""
    from mlx_sd import StableDiffusion
    from mlx_sd.adapter_files import lora_hash

    a1111.set_options({"sd_model_checkpoint": "sd1"})
    common = dict(seed=5, steps=2, width=32, height=32, cfg_scale=7.5, sampler_name="Euler")
    tagged = a1111.txt2img(prompt="a cat <lora:style:0.8>", **common)
    plain = a1111.txt2img(prompt="a cat", **common)
    pipe = StableDiffusion.from_pretrained(server_models / "sd1", dtype="float32")
    pipe.lora_dir = lora_dir
    expected = pipe.generate("a cat <lora:style:0.8>", seed=5, steps=2, width=32, height=32, sampler="euler")
    assert np.array_equal(np.asarray(tagged.image), np.asarray(expected[0]))
    assert np.abs(np.asarray(tagged.image, float) - np.asarray(plain.image, float)).mean() > 1
    infotext = tagged.info["infotexts"][0]
    assert (
        infotext.startswith("a cat <lora:style:0.8>\n")
        and f'Lora hashes: "style: {lora_hash(lora_dir / "style.safetensors")}"' in infotext
    )
    assert "Lora hashes" not in plain.info["infotexts"][0]


def test_serve_refuses_the_network_without_authentication():
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--api-key" in result.output and "Traceback" not in result.output


def test_serve_without_the_extra_names_the_pip_command():
    code = "import sys; sys.modules['starlette'] = None; from mlx_sd.cli import main; sys.argv[1:] = ['serve']; main()"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and 'pip install "mlx_sd[server]"' in run.stderr, run.stderr


def test_mlx_sd_serve_command_serves_and_stops_on_ctrl_c(server_models):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    command = [
        sys.executable,
        "-m",
        "mlx_sd.cli",
        "serve",
        "--models-dir",
        str(server_models),
        "--port",
        str(port),
        "--dtype",
        "float32",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                response = client.images.generate(prompt=PROMPT, size="32x32", extra_body={"steps": 1})
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline and process.poll() is None, process.communicate()
                time.sleep(0.2)
        assert Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).size == (32, 32)
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert f"serving on http://127.0.0.1:{port}/" in stderr and "Traceback" not in stderr

"""Per-request overhead of `mlx-sd serve` over pipe.generate() with the same settings.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/server_overhead.py \
        --size 32 --steps 1 --requests 40

Starts the real command (`python -m mlx_sd.cli serve`) on a free port with the model (default: a tiny random SD 1.5
built by tests/helpers.py), loads the same model here, then alternates one A1111 txt2img request, one OpenAI
generations request and one generate() call, and prints the median seconds of each and the differences: HTTP,
JSON, base64 PNG encoding, queueing and the worker hand-off.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).parent.parent


def tiny_model(folder):
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_pipeline

    make_pipeline("sd1", folder)
    return folder


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url, process):
    for _ in range(600):
        try:
            return requests.get(f"{url}/sdapi/v1/options", timeout=1).json()
        except requests.ConnectionError:
            if process.poll() is not None:
                sys.exit(f"the server exited: {process.communicate()[1]}")
            time.sleep(0.1)
    sys.exit("the server did not start")


def timed(function):
    tic = time.perf_counter()
    function()
    return time.perf_counter() - tic


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder (default: a tiny random SD 1.5)")
    parser.add_argument("--size", type=int, default=32, help="image width and height")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--requests", type=int, default=40, help="timed rounds after 5 warm-up rounds")
    args = parser.parse_args()
    from mlx_sd import StableDiffusion

    model = Path(args.model) if args.model else tiny_model(Path(tempfile.mkdtemp()) / "sd1")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlx_sd.cli", "serve", "--model", str(model), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(url, process)
        pipe = StableDiffusion.from_pretrained(model)
        session = requests.Session()
        settings = dict(steps=args.steps, width=args.size, height=args.size, seed=1)
        a1111 = {"prompt": "a lighthouse", "cfg_scale": 7.5, **settings}
        openai = {"prompt": "a lighthouse", "size": f"{args.size}x{args.size}", "steps": args.steps, "seed": 1}
        calls = [
            lambda: session.post(f"{url}/sdapi/v1/txt2img", json=a1111).raise_for_status(),
            lambda: session.post(f"{url}/v1/images/generations", json=openai).raise_for_status(),
            lambda: pipe.generate("a lighthouse", guidance_scale=7.5, **settings),
        ]
        rounds = [[timed(call) for call in calls] for _ in range(5 + args.requests)]
        a, o, g = (statistics.median(r[i] for r in rounds[5:]) * 1000 for i in range(3))
        print(
            f"{args.size}x{args.size}, {args.steps} step(s), median of {args.requests}: generate() {g:.1f} ms; "
            f"A1111 txt2img {a:.1f} ms ({a - g:+.1f}); OpenAI generations {o:.1f} ms ({o - g:+.1f})"
        )
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()

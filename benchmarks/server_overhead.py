"""Per-request overhead of `mlx-sd serve` over the generation itself.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/server_overhead.py \
        --size 32 --steps 1 --requests 40

Runs the server in this process (uvicorn on a free loopback port, as `mlx-sd serve` does) with the model (default:
a tiny random SD 1.5 built by tests/helpers.py) and sends A1111 txt2img and OpenAI generations requests over one
keep-alive connection. For each request it measures the whole request and the time the worker spent in
pipe.stream() (what generate() runs); the difference is the server's overhead: HTTP, JSON, validation, the queue
hand-off, PNG and base64 encoding. It also times generate() called directly on the same pipeline.
"""

import argparse
import socket
import statistics
import sys
import tempfile
import threading
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


def timed_stream(pipe, log):
    """pipe.stream, recording in `log` the seconds from its call until its caller closes it after the images."""
    stream = pipe.stream

    def wrapper(*args, **kwargs):
        tic = time.perf_counter()
        try:
            yield from stream(*args, **kwargs)
        finally:
            log.append(time.perf_counter() - tic)

    return wrapper


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder (default: a tiny random SD 1.5)")
    parser.add_argument("--size", type=int, default=32, help="image width and height")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--requests", type=int, default=40, help="timed requests of each kind after 5 warm-up rounds")
    args = parser.parse_args()
    import uvicorn

    from mlx_sd.server import Server, ServerConfig

    model = Path(args.model) if args.model else tiny_model(Path(tempfile.mkdtemp()) / "sd1")
    server = Server(ServerConfig(model=str(model), port=free_port()))
    server.start()
    web = uvicorn.Server(uvicorn.Config(server.app, server.config.host, server.config.port, log_level="warning"))
    thread = threading.Thread(target=web.run)
    thread.start()
    while not web.started:
        time.sleep(0.05)
    try:
        pipe, generations = server.worker.pipe, []
        pipe.stream = timed_stream(pipe, generations)
        url, session = f"http://127.0.0.1:{server.config.port}", requests.Session()
        settings = dict(steps=args.steps, width=args.size, height=args.size, seed=1)
        a1111 = {"prompt": "a lighthouse", "cfg_scale": 7.5, **settings}
        openai = {"prompt": "a lighthouse", "size": f"{args.size}x{args.size}", "steps": args.steps, "seed": 1}
        calls = [
            lambda: session.post(f"{url}/sdapi/v1/txt2img", json=a1111).raise_for_status(),
            lambda: session.post(f"{url}/v1/images/generations", json=openai).raise_for_status(),
        ]
        totals, direct = [], []
        for _ in range(5 + args.requests):
            for call in calls:
                tic = time.perf_counter()
                call()
                totals.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            pipe.generate("a lighthouse", guidance_scale=7.5, **settings)
            direct.append(time.perf_counter() - tic)
        # the direct generate() calls went through pipe.stream too: every third entry
        served = [g for i, g in enumerate(generations) if i % 3 != 2]
        overheads = [(t - g) * 1000 for t, g in zip(totals[10:], served[10:])]
        print(
            f"{args.size}x{args.size}, {args.steps} step(s), {args.requests} requests of each API: request "
            f"{statistics.median(totals[10:]) * 1000:.1f} ms (median), generation inside it "
            f"{statistics.median(served[10:]) * 1000:.1f} ms, generate() called directly "
            f"{statistics.median(direct[5:]) * 1000:.1f} ms; overhead per request: median "
            f"{statistics.median(overheads):.1f} ms, 90th percentile {statistics.quantiles(overheads, n=10)[-1]:.1f} ms"
        )
    finally:
        web.should_exit = True
        thread.join()
        server.stop()


if __name__ == "__main__":
    main()

"""A soak of `mlx-sd serve`: 100 sequential requests (A1111 and OpenAI, each a tiny 32x32 one-step generation) keep
the process's RSS and MLX's active memory flat; prints the figures and the median request time
(benchmarks/server_overhead.py compares it with generate())."""

import statistics
import time

import mlx.core as mx
import psutil
import pytest
import requests

from helpers import running_server

REQUESTS, WARMUP = 100, 10
RSS_GROWTH_LIMIT = 32 * 2**20  # bytes over the 100 requests, after warm-up: allocator noise, no per-request leak
ACTIVE_GROWTH_LIMIT = 2**20  # MLX memory held by arrays: the model's weights only, nothing per request
SETTINGS = dict(steps=1, width=32, height=32)


@pytest.fixture(scope="module")
def served(server_models):
    with running_server(models_dir=server_models) as (url, server):
        yield url, server


def one_request(url, i):
    """Request i: A1111 txt2img (even) or OpenAI generations (odd); returns its seconds."""
    tic = time.perf_counter()
    if i % 2 == 0:
        body = {"prompt": f"soak {i}", "seed": i, "cfg_scale": 0, **SETTINGS}
        response = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60)
    else:
        body = {"prompt": f"soak {i}", "size": "32x32", "seed": i, "guidance_scale": 0, "steps": 1}
        response = requests.post(f"{url}/v1/images/generations", json=body, timeout=60)
    seconds = time.perf_counter() - tic
    assert response.status_code == 200, response.text
    return seconds


def memory():
    return psutil.Process().memory_info().rss, mx.get_active_memory()


def test_100_requests_keep_memory_flat(served):
    url, _ = served
    for i in range(WARMUP):
        one_request(url, i)
    rss0, active0 = memory()
    seconds = [one_request(url, i) for i in range(REQUESTS)]
    rss1, active1 = memory()
    print(
        f"\nsoak: {REQUESTS} requests; RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB "
        f"({(rss1 - rss0) / 2**20:+.1f}); MLX active {active0 / 2**20:.2f} -> {active1 / 2**20:.2f} MiB "
        f"({(active1 - active0) / 2**20:+.2f}); median request {statistics.median(seconds) * 1000:.0f} ms"
    )
    assert rss1 - rss0 < RSS_GROWTH_LIMIT
    assert active1 - active0 < ACTIVE_GROWTH_LIMIT

"""mlx_sd.workers: the CPU paths' numpy pieces on worker threads give the values of one thread."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sd import workers
from mlx_sd.attention import attention
from mlx_sd.convolution import conv3x3


def one_thread(monkeypatch):
    """Makes map_pieces run the pieces in the calling thread, as where there is no pool."""
    monkeypatch.setattr(workers, "_pool", False)


def test_pieces_come_back_in_order_from_the_workers():
    if workers.cores() < 2 or workers._numpy_openblas_setter() is None:
        pytest.skip("one core, or numpy's BLAS is not an OpenBLAS with per-thread counts: no pool")
    names = workers.map_pieces(lambda i: (i, threading.current_thread().name), range(40))
    assert [i for i, _ in names] == list(range(40))
    assert all(name.startswith("mlx_sd-numpy") for _, name in names)


def test_attention_on_the_workers_equals_one_thread(monkeypatch):
    """Each head writes its own rows of the output, its products single-threaded: bit for bit the values of
    the heads one after the other."""
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal((2, 5, 300, 40)).astype(np.float32)) for _ in range(3))
    threaded = np.array(attention(q, k, v, 40**-0.5))
    one_thread(monkeypatch)
    np.testing.assert_array_equal(np.array(attention(q, k, v, 40**-0.5)), threaded)


@pytest.mark.parametrize("width", [1, 3])
def test_convolution_row_blocks_on_the_workers_equal_one_thread(width, monkeypatch):
    """One image, blocks of 4 rows computed `width` at a time (the last group shorter), written over the input
    (each block only after the next one has read its rows): the values of the blocks one after the other."""
    if mx.default_device() != mx.cpu:
        pytest.skip("the numpy path is a CPU path")
    B, H, W, C = 1, 64, 64, 64
    monkeypatch.setattr("mlx_sd.convolution.NUMPY_CONV_BLOCK", 4 * (W + 2) * C * 4)
    conv = nn.Conv2d(C, C, 3, padding=1)
    x = mx.random.normal((B, H, W, C), key=mx.random.key(3))
    mx.eval(conv.parameters(), x)
    monkeypatch.setattr("mlx_sd.convolution.width", lambda: width)
    got = np.array(conv3x3(conv, mx.array(x), overwrite=True))
    one_thread(monkeypatch)
    monkeypatch.setattr("mlx_sd.convolution.width", lambda: 1)
    np.testing.assert_array_equal(got, np.array(conv3x3(conv, x)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_makes_its_own_pool():
    """The parent's pool has no threads in a forked child: map_pieces there would wait forever on it."""
    workers.map_pieces(abs, [1, -2])  # the parent's pool, where there is one
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 when its pieces came back
        os._exit(0 if workers.map_pieces(abs, [1, -2, 3]) == [1, 2, 3] else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's map_pieces did not return")


@pytest.mark.parametrize("layout", ["winograd", "phases"])
def test_kernel_layouts_are_made_once_for_concurrent_blocks(layout, monkeypatch):
    """Blocks on several workers ask for a kernel layout at once: it is made once and each gets it whole (an
    array published before it was filled gave SD 1.5's upsamplers at 512 garbage, 0.22 off diffusers)."""
    from mlx_sd import convolution

    made = []
    maker = {"winograd": "_winograd_kernels", "phases": "_phase_kernels"}[layout]
    real = getattr(convolution, maker)

    def slow(k):
        made.append(k)
        time.sleep(0.2)  # the other threads ask meanwhile
        return real(k)

    monkeypatch.setattr(convolution, maker, slow)
    kernels = convolution._Kernels(np.random.default_rng(0).standard_normal((24, 3, 3, 16)).astype(np.float32))
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: getattr(kernels, layout).copy(), range(4)))
    assert len(made) == 1
    for array in got[1:]:
        np.testing.assert_array_equal(array, got[0])
    np.testing.assert_array_equal(got[0], real(kernels.weight))


def test_scratch_reuses_each_threads_memory_per_slot():
    """A thread's second request for a slot gets the same memory (grown where asked for more); other slots and
    other threads get their own."""
    buffers = workers.Scratch()
    a = buffers.get("x", (4, 8))
    b = buffers.get("x", (2, 8))
    assert a.shape == (4, 8) and b.shape == (2, 8) and np.shares_memory(a, b)
    assert not np.shares_memory(a, buffers.get("y", (4, 8)))
    other = []
    thread = threading.Thread(target=lambda: other.append(buffers.get("x", (4, 8))))
    thread.start()
    thread.join()
    assert not np.shares_memory(a, other[0])
    c = buffers.get("x", (8, 8))  # larger: new memory
    assert c.shape == (8, 8) and c.dtype == np.float32 and not np.shares_memory(a, c)

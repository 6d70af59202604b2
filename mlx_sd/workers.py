"""numpy work of the CPU paths on every core: worker threads whose numpy matrix products run single-threaded.

The float32 CPU paths (attention's blocks, the numpy convolutions) run numpy: its elementwise work (exp, the
Winograd transforms) uses one core, and its matrix products use numpy's own OpenBLAS, whose threads spin for a
while after each call, competing with MLX's BLAS threads. Here independent pieces of that work (attention
heads, images and row blocks) run in a pool of one thread per core, each with numpy's OpenBLAS set to one thread
for itself (`openblas_set_num_threads_local`, OpenBLAS 0.3.27 and later, as bundled with numpy's wheels): one
SD 1.5 4096-token self-attention took 1.1 s instead of 2.1 (x86 AVX2, 2 cores), with identical values (a
product's threads split its output, not its sums). Where numpy's BLAS is another library, or one core is all
there is, `map_pieces` runs the pieces one after the other in the calling thread, as before.

Only numpy runs in the workers (no MLX state, see thread_exit); each piece writes its own part of the output.
"""

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

_pool = None
_lock = threading.Lock()


def _forget_pool():
    """In a forked child, whose copy of the pool has no threads: a new pool on first use."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _numpy_openblas_setter():
    """numpy's bundled OpenBLAS's per-thread thread-count setter, or None (another BLAS, or an older OpenBLAS)."""
    root = Path(np.__file__).parent
    for folder in (root.parent / "numpy.libs", root / ".dylibs"):  # the Linux and Windows wheels; macOS's
        for path in sorted(folder.glob("*openblas*")) if folder.is_dir() else ():
            try:
                return ctypes.CDLL(str(path)).openblas_set_num_threads_local
            except (OSError, AttributeError):
                continue
    return None


def _executor():
    """The shared pool, made on first use; None where the pieces run in the calling thread."""
    global _pool
    with _lock:
        if _pool is None:
            setter = _numpy_openblas_setter() if cores() > 1 else None
            if setter is None:
                _pool = False
            else:
                _pool = ThreadPoolExecutor(cores(), "mlx_sd-numpy", initializer=lambda: setter(ctypes.c_int(1)))
        return _pool or None


def width():
    """How many pieces map_pieces runs at once: the pool's threads, or 1 where there is no pool."""
    return cores() if _executor() else 1  # the pool has a thread per core


class Scratch:
    """Temporary float32 arrays for the pieces of one call, reused by each thread from piece to piece: a freshly
    allocated array of a few MiB costs a page fault per 4 KiB at its first write (SiLU in numpy on a new 2 MiB
    block: 12 ns per value, 3.9 into reused ones; x86 AVX-512). `get(slot, shape)` returns the calling thread's
    array for `slot`, the memory of its last one where that is large enough; what it held is undefined, and it
    is the same memory at the thread's next request for that slot. The arrays go with the Scratch object."""

    def __init__(self):
        self._arrays = {}

    def get(self, slot, shape):
        key, size = (threading.get_ident(), slot), int(np.prod(shape))
        array = self._arrays.get(key)  # each key is one thread's own: no lock needed
        if array is None or array.size < size:
            array = self._arrays[key] = np.empty(size, np.float32)
        return array[:size].reshape(shape)


def map_pieces(fn, pieces):
    """[fn(piece) for piece in pieces], the pieces on the worker threads; fn runs numpy only."""
    pieces = list(pieces)
    pool = _executor() if len(pieces) > 1 else None
    return [fn(piece) for piece in pieces] if pool is None else list(pool.map(fn, pieces))

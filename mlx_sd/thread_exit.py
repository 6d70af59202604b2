"""Ending a worker thread that ran MLX without aborting the process at interpreter exit.

MLX keeps per-thread state that holds Python objects: the default random key (used by layers' random init) and
the cache of compiled functions (mlx.nn's activations are compiled). Their C++ thread_local destructors take the
GIL when the thread ends. If the interpreter is finalizing by then (a worker joined just before the program
exits: `Thread.join()` returns before the thread's C++ destructors have run), CPython ends the thread inside such
a destructor and the process aborts with "terminate called without an active exception" (MLX 0.32, CPython 3.11).
Minimal reproduction: `threading.Thread(target=lambda: mx.eval(nn.gelu(mx.ones(4)))).start()`, join, exit: about
one run in two aborts on Linux.

The remedy: an object kept in a threading.local is deleted while the thread's Python state is torn down, with
the GIL held; clearing the thread's MLX state there (`mx.clear_streams()`, which also resets the thread's random
key and compile cache) leaves nothing for the C++ destructors to do.
"""

import threading

import mlx.core as mx


class _ClearAtThreadExit:
    def __del__(self):
        mx.clear_streams()


_state = threading.local()


def clear_mlx_state_at_thread_exit():
    """Arranges for this thread's MLX state to be cleared when the thread ends (not needed on the main thread)."""
    if threading.current_thread() is not threading.main_thread() and not hasattr(_state, "guard"):
        _state.guard = _ClearAtThreadExit()

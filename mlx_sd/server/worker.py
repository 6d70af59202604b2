"""One resident model, one worker thread and a bounded FIFO queue: generations and model switches run on the worker
one at a time, so MLX is used from that thread only. The event loop waits on a task's future and cancels the task
when its client disconnects."""

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
import uuid

from ..pipeline import StableDiffusion
from ..settings import SettingsError
from ..weights import ModelLoadError
from .payloads import Cancelled, RequestError

log = logging.getLogger("mlx_sd.server")
WATCH_SECONDS = 2.0  # previews are made for this long after a progress request asked for one


class Task:
    """Work for the worker: `run(worker, task)` on the worker thread; its result or exception in `future`.

    A generation reports its progress here (batch, step) and stops at the next step once `cancelled` (the client
    went away: no result) or `interrupted` (/interrupt: the images as they are) is set."""

    def __init__(self, run, task_id=None):
        self.id = task_id or f"task-{uuid.uuid4().hex[:16]}"
        self.run = run
        self.future = concurrent.futures.Future()
        self.cancelled = threading.Event()
        self.interrupted = threading.Event()
        self.batch, self.batches = 0, 1  # batch running, batches planned
        self.step, self.steps = 0, 0  # sampler steps done in this batch, steps per batch
        self.steps_done = 0  # over all batches
        self.interrupted_at = None  # steps_done when interrupt was asked
        self.started = None  # time.time() when the worker took it
        self.preview = None  # a PIL preview of the latest step (made while someone watches)

    @property
    def progress(self):
        """The share of the task's sampler steps done, 0 to 1."""
        total = self.batches * self.steps
        return (self.batch * self.steps + self.step) / total if total else 0.0


class Worker:
    """Runs tasks one at a time on its own thread, in the order they were submitted; at most `max_queue` wait."""

    def __init__(self, max_queue, lora_dir=None, dtype=None, low_memory=False):
        self.max_queue, self.lora_dir = max_queue, lora_dir
        self.dtype, self.low_memory = dtype, low_memory
        self.pipe, self.model = None, None  # the resident pipeline and its catalog entry
        self.current = None  # the running task
        self.watched_until = 0.0  # time.monotonic() until which previews are made
        self._pending = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="mlx-sd-worker", daemon=True)

    def start(self, entry):
        """Starts the thread and loads the first model on it; ModelLoadError when it cannot be loaded."""
        self._thread.start()
        task = Task(lambda worker, _: worker.load(entry, "--model"))
        self.submit(task)
        try:
            task.future.result()
        except RequestError as e:
            raise ModelLoadError(e.message) from None

    def stop(self):
        """Cancels the running and waiting tasks and ends the thread."""
        with self._cond:
            self._stopping = True
            dropped = list(self._pending)
            self._pending.clear()
            if self.current is not None:
                self.current.cancelled.set()
            self._cond.notify_all()
        for task in dropped:
            _fail(task, Cancelled("the server stopped"))
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, task):
        """Queues a task; RequestError 503 when the queue is full."""
        with self._cond:
            if self._stopping:
                raise RequestError("the server is stopping", status=503, code="server_stopping")
            if len(self._pending) >= self.max_queue:
                raise RequestError(
                    f"the queue is full ({self.max_queue} requests waiting); try again later",
                    status=503,
                    code="queue_full",
                )
            self._pending.append(task)
            self._cond.notify()

    def cancel(self, task):
        """Drops a waiting task, or stops a running one at its next step."""
        task.cancelled.set()
        with self._cond:
            if task in self._pending:
                self._pending.remove(task)
                _fail(task, Cancelled("cancelled while waiting"))

    def interrupt(self):
        """Stops the running generation at its next step; it returns its images as they are."""
        task = self.current
        if task is not None and not task.interrupted.is_set():
            task.interrupted_at = task.steps_done
            task.interrupted.set()

    def queued(self):
        """The number of waiting tasks."""
        with self._cond:
            return len(self._pending)

    def load(self, entry, field):
        """Makes `entry` the resident model (on the worker thread): the old one is unloaded first, and loaded again
        if the new one fails (RequestError naming `field`)."""
        if self.model == entry:
            return
        previous = self.model
        if self.pipe is not None:
            self.pipe.unload()
        self.pipe, self.model = None, None
        try:
            self._load(entry)
        except (ModelLoadError, ValueError, OSError) as e:
            if previous is not None:
                self._load(previous)
            raise RequestError(f"{field}: cannot load {entry.title}: {e}", field) from None

    def _load(self, entry):
        self.pipe = StableDiffusion.from_pretrained(entry.source, dtype=self.dtype, low_memory=self.low_memory)
        self.pipe.name = entry.title  # the model name in infotexts: the title clients know, not a path
        self.pipe.lora_dir = self.lora_dir  # for <lora:NAME:WEIGHT> tags (names only: files in that folder)
        self.model = entry

    def _loop(self):
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                task = self.current = self._pending.popleft()
            try:
                self._run(task)
            finally:
                with self._cond:
                    self.current = None

    def _run(self, task):
        if not task.future.set_running_or_notify_cancel():
            return
        task.started = time.time()
        try:
            task.future.set_result(task.run(self, task))
        except (RequestError, Cancelled, SettingsError) as e:
            task.future.set_exception(e)
        except (ValueError, ModelLoadError) as e:  # unusable images, LoRA files
            task.future.set_exception(RequestError(str(e)))
        except Exception as e:  # a bug or an exhausted machine: report it, keep serving
            log.exception("task %s failed", task.id)
            task.future.set_exception(RequestError(f"internal error: {type(e).__name__}", status=500))


def _fail(task, error):
    if not task.future.done() and task.future.set_running_or_notify_cancel():
        task.future.set_exception(error)


async def run_in_worker(request, worker, task):
    """Queues `task` and returns its result; a client that disconnects first cancels the task."""
    worker.submit(task)
    result = asyncio.wrap_future(task.future)
    result.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even when nobody waits
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        worker.cancel(task)
        raise
    finally:
        gone.cancel()
    if not result.done():
        worker.cancel(task)
        raise Cancelled("the client disconnected")
    return result.result()


async def _disconnect(request):
    """Returns when the client disconnects (the body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

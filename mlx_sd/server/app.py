"""The server: its configuration, the Starlette app (A1111 and OpenAI routes, the web page, authentication, body
limit, JSON errors) and `serve()`, which loads the model and runs uvicorn."""

import logging
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..settings import SettingsError, check_int
from . import a1111, openai_api
from .catalog import ModelCatalog
from .payloads import BodyTooLarge, Cancelled, RequestError, error_body, is_openai
from .security import Authentication, BodyLimit, BrowserGuard, check_exposure, is_loopback
from .worker import Worker

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("mlx_sd.server")
# The start of a settings error message -> the OpenAI request field it is about
OPENAI_PARAMS = {
    "prompt": "prompt",
    "negative prompt": "negative_prompt",
    "width": "size",
    "height": "size",
    "num_images": "n",
    "steps": "steps",
    "guidance scale": "guidance_scale",
    "seed": "seed",
    "unknown sampler": "sampler",
    "sampler": "sampler",
    "strength": "strength",
    "mask": "mask",
}


@dataclass
class ServerConfig:
    """What `mlx-sd serve` is started with."""

    model: str | None = None  # a name in models_dir, a path or a Hub id; None: the folder's first model
    host: str = "127.0.0.1"
    port: int = 7860
    models_dir: str | None = None
    lora_dir: str | None = None
    max_queue: int = 16  # requests waiting behind the running one
    api_key: str | None = None
    api_auth: str | None = None  # "user:pass"
    insecure: bool = False
    allow_hub: bool = False
    dtype: str | None = None
    low_memory: bool = False
    max_body_bytes: int = 64 * 2**20

    def check(self):
        """ValueError (one line) for a configuration that cannot or should not run."""
        check_int("--port", self.port, 0, 65535)
        check_int("--max-queue", self.max_queue, 1, 10_000)
        check_int("max_body_bytes", self.max_body_bytes, 1, 2**40)
        if self.api_auth is not None and not self.api_auth.partition(":")[0]:
            raise ValueError("--api-auth must be USER:PASS")
        if self.api_key is not None and not self.api_key:
            raise ValueError("--api-key must not be empty")
        check_exposure(self.host, self.api_key, self.api_auth, self.insecure)
        return self


class Server:
    """The catalog of models, the worker with the resident model, the A1111 options, and the ASGI app."""

    def __init__(self, config):
        self.config = config.check()
        self.catalog = ModelCatalog(config.models_dir, config.model, config.allow_hub)
        self.worker = Worker(config.max_queue, config.lora_dir, config.dtype, config.low_memory)
        self.clip_skip = None  # A1111's CLIP_stop_at_last_layers, for requests that do not set it
        self.app = create_app(self)

    def start(self):
        """Loads the starting model (ModelLoadError when it cannot be loaded)."""
        self.worker.start(self.catalog.initial)

    def stop(self):
        self.worker.stop()


def create_app(server):
    config = server.config
    routes = [
        *a1111.ROUTES,
        *openai_api.ROUTES,
        Route("/", lambda _: FileResponse(STATIC / "index.html")),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    handlers = {
        RequestError: request_error,
        SettingsError: settings_error,
        BodyTooLarge: lambda request, e: _error(request, 413, str(e), code="request_too_large"),
        Cancelled: lambda request, e: _error(request, 503, str(e), code="cancelled"),
        HTTPException: lambda request, e: _error(request, e.status_code, str(e.detail)),
        Exception: internal_error,
    }
    middleware = [
        Middleware(BrowserGuard, loopback=is_loopback(config.host)),
        Middleware(Authentication, api_key=config.api_key, api_auth=config.api_auth),
        Middleware(BodyLimit, limit=config.max_body_bytes),
    ]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
    app.state.server = server
    return app


def _error(request, status, message, param=None, code=None):
    return JSONResponse(error_body(request.url.path, status, message, param, code), status)


def request_error(request, e):
    status = e.status or (400 if is_openai(request.url.path) else 422)
    return _error(request, status, e.message, e.param, e.code)


def settings_error(request, e):
    """A setting out of bounds: A1111 422, OpenAI 400 with the field as `param`."""
    message = str(e)
    if not is_openai(request.url.path):
        return _error(request, 422, message)
    param = next((p for start, p in OPENAI_PARAMS.items() if message.startswith(start + " ")), None)
    return _error(request, 400, message, param, "invalid_value")


def internal_error(request, e):
    log.error("%s %s failed: %s: %s", request.method, request.url.path, type(e).__name__, e)
    return _error(request, 500, f"internal error: {type(e).__name__}")


def serve(config, log_level="info"):
    """Loads the model, then serves until interrupted (Ctrl-C); generations still running are cancelled."""
    import uvicorn

    server = Server(config)
    server.start()
    try:
        uvicorn.Server(
            uvicorn.Config(server.app, config.host, config.port, log_level=log_level, timeout_graceful_shutdown=5)
        ).run()
    finally:
        server.stop()

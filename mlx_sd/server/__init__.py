"""`mlx-sd serve`: an HTTP server that AUTOMATIC1111 and OpenAI image clients can use, with a small web page.

Needs the server extra: `pip install "mlx_sd[server]"` (Starlette, uvicorn, python-multipart)."""

from .app import Server, ServerConfig, serve

__all__ = ["Server", "ServerConfig", "serve"]

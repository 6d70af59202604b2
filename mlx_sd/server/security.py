"""Who may talk to the server and how much they may send, as ASGI middleware in front of every route: browser
requests from other sites (cross-origin, DNS rebinding), authentication (a Bearer API key, A1111's basic auth) and
the request body limit; and the refusal to listen on the network without authentication."""

import base64
import binascii
import hmac
import ipaddress
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

from .payloads import BodyTooLarge, error_body, is_openai


def is_loopback(host):
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host, api_key, api_auth, insecure):
    """ValueError when `host` is reachable from other machines and no authentication is configured."""
    if not is_loopback(host) and not (api_key or api_auth) and not insecure:
        raise ValueError(
            f"--host {host} makes the server reachable from other machines: give --api-key KEY or --api-auth "
            "USER:PASS (or --insecure to serve without authentication)"
        )


class BrowserGuard:
    """403 for what only a browser tricked by another site sends: an `Origin` other than the server's own (the
    server answers no CORS requests, so only its own page may use it from a browser), or, on a loopback address,
    a `Host` that is not a loopback name (DNS rebinding). Clients outside browsers send no Origin."""

    def __init__(self, app, loopback):
        self.app, self.loopback = app, loopback

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host, origin = _header(scope, b"host") or "", _header(scope, b"origin")
        if self.loopback and not is_loopback(_hostname(host)):
            message = f"Host {host[:100]!r} is not this machine's loopback address"
        elif origin is not None and origin != f"{scope['scheme']}://{host}":
            message = f"requests from other sites ({origin[:100]}) are refused"
        else:
            return await self.app(scope, receive, send)
        await JSONResponse(error_body(scope["path"], 403, message, code="forbidden"), 403)(scope, receive, send)


class Authentication:
    """Lets a request through with `Authorization: Bearer <api_key>`, or basic auth with `api_auth` ("user:pass")
    or any user name and the API key as password (so browsers, which prompt for basic auth, can use the page);
    everything else gets 401. With neither configured, everything passes."""

    def __init__(self, app, api_key=None, api_auth=None):
        self.app, self.api_key, self.api_auth = app, api_key, api_auth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.allowed(_header(scope, b"authorization")):
            return await self.app(scope, receive, send)
        path = scope["path"]
        scheme = "Bearer" if is_openai(path) else 'Basic realm="mlx-sd"'
        message = "missing or wrong API key" if is_openai(path) else "Incorrect username or password"
        body = error_body(path, 401, message, code="invalid_api_key")
        await JSONResponse(body, 401, headers={"WWW-Authenticate": scheme})(scope, receive, send)

    def allowed(self, authorization):
        if not self.api_key and not self.api_auth:
            return True
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() == "bearer":
            return bool(self.api_key) and _same(credentials.strip(), self.api_key)
        if scheme.lower() != "basic":
            return False
        try:
            user_pass = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        password = user_pass.partition(":")[2]
        return bool(self.api_auth and _same(user_pass, self.api_auth)) or bool(
            self.api_key and _same(password, self.api_key)
        )


class BodyLimit:
    """413 for a request whose body is larger than `limit` bytes: at once when its Content-Length says so, else
    when the bytes read pass the limit (BodyTooLarge, raised inside the route and answered by the app)."""

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            message = f"the request body is larger than the server's limit of {self.limit:,} bytes"
            body = error_body(scope["path"], 413, message, code="request_too_large")
            return await JSONResponse(body, 413, headers={"Connection": "close"})(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(f"the request body is larger than the server's limit of {self.limit:,} bytes")
            return message

        await self.app(scope, limited_receive, send)


def _hostname(host):
    try:
        return urlsplit(f"//{host}").hostname or ""
    except ValueError:
        return ""


def _header(scope, name):
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _same(given, expected):
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))

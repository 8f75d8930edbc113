"""Plumbing shared by the labelling app and the run viewer: access token, JSON errors, serving.

Both apps bind to 127.0.0.1 by default and then need no token. Bound to any other address, they
require a random access token (``secrets.token_urlsafe``) on every API call, passed as the
``token`` query parameter or the ``X-Rlhfkit-Token`` header; the printed URL carries it.
"""
from __future__ import annotations

import ipaddress
import json
import math
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

STATIC_DIR = Path(__file__).parent / "static"
TOKEN_HEADER = "x-rlhfkit-token"


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: Optional[str]) -> Optional[str]:
    """The token the server requires: the configured one, else a fresh one off loopback, else None."""
    if token:
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(24)


class ApiError(Exception):
    """An API call that is refused: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def json_safe(obj: Any) -> Any:
    """Replace NaN/inf (which JSON cannot carry) by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


class SafeJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(json_safe(content), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def error_response(status: int, message: str) -> Response:
    return SafeJSONResponse({"error": message}, status_code=status)


def exception_handlers() -> dict:
    """Every refusal, ours or Starlette's (unknown route, wrong method), answers JSON."""

    async def api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.message)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail))

    return {ApiError: api_error, HTTPException: http_error}


def check_token(request: Request, token: Optional[str]) -> None:
    """Raise 403 unless the request carries ``token`` (no-op when no token is required)."""
    if token is None:
        return
    given = request.headers.get(TOKEN_HEADER) or request.query_params.get("token") or ""
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise ApiError(403, "missing or wrong access token (open the URL the server printed)")


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind (port 0: a free port) before uvicorn starts, so the URL can be printed with the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        from rlhfkit.config import UserError

        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)  # accept connections from now on: the URL is printed before uvicorn starts
    sock.set_inheritable(True)
    return sock


def url_for(host: str, port: int, token: Optional[str], query: str = "") -> str:
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    if ":" in shown:
        shown = f"[{shown}]"
    params = [p for p in (f"token={token}" if token else "", query) if p]
    return f"http://{shown}:{port}/" + ("?" + "&".join(params) if params else "")


def serve(app, host: str, port: int, token: Optional[str] = None, note: str = "Ctrl-C stops",
          log_level: str = "warning") -> None:
    """Print the URL (with the token) and run ``app`` in the foreground until Ctrl-C."""
    import uvicorn

    sock = bind_socket(host, port)
    print(f"open {url_for(host, sock.getsockname()[1], token)}   ({note})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
    server.run(sockets=[sock])


class BackgroundServer:
    """Serve ``app`` from a thread on a free loopback port (tests, notebooks); a context manager.

    ``url`` is the base URL once started. Start-up and shutdown wait at most ``timeout`` seconds.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, timeout: float = 15.0):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.timeout = timeout
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise RuntimeError(f"server on {self.url} did not start within {self.timeout} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout)
        self.sock.close()

    def __exit__(self, *exc) -> None:
        self.stop()

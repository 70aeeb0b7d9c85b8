"""The labeling app over HTTP: a Starlette app served by uvicorn.

Routes (JSON in and out; errors are ``{"error": message}`` with a 4xx status, never a crash):

====================== ==============================================================================
``GET /``              the page (``?annotator=NAME`` picks the labeler; without it the page asks)
``GET /static/NAME``   the page's CSS and JS, read from the package once at start
``GET /api/task``      ``?annotator=NAME``: the next task, progress, whether undo is possible
``POST /api/submit``   a judgement of the shown task (`Labeler.prepare` says what it must hold);
                       answers with the next task once the record is on disk
``POST /api/undo``     ``{"annotator"}``: remove that annotator's latest record; answers with its
                       task and the undone judgement, to be shown again
====================== ==============================================================================

Guard, in front of every route: with a token, every request must carry it (``Authorization:
Bearer T``, the cookie the page gets when opened with ``?token=T``, or ``?token=T``); on a loopback
address without a token, the Host header must name a loopback host, so that a web page elsewhere
cannot reach the app through DNS rebinding. POSTs must be ``application/json`` (a cross-site form
cannot send that without a CORS preflight, which this app never grants) and at most 64 KiB.

No route reads or writes a file: the page and its assets are read at start, and the only file
written is RANKINGS.jsonl, through the `RankingsStore` that the `Labeler` holds.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import json
import secrets
import socket
from collections.abc import Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rlhfkit.label.labeler import Labeler, RequestError

COOKIE = "rlhfkit_label_token"
MAX_BODY = 64 * 1024
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8", "icon.svg": "image/svg+xml"}
HEADERS = {  # the page runs only its own script, in no frame, and sends no Referer (a token may be in the URL)
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=HEADERS)


class Guard:
    """Token and Host checks in front of the app (pure ASGI, so it sees every request first)."""

    def __init__(self, app: ASGIApp, token: str | None, check_host: bool):
        self.app, self.token, self.check_host = app, token, check_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":  # no websocket route: close it without touching the app
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if self.check_host and not is_loopback(_hostname(request.headers.get("host", ""))):
            await _error(421, "this app answers only on a loopback address (localhost, 127.0.0.1)")(scope, receive, send)
            return
        if self.token is not None:
            given = request.query_params.get("token") or request.cookies.get(COOKIE) or ""
            bearer = request.headers.get("authorization", "")
            if bearer.lower().startswith("bearer "):
                given = bearer[7:].strip()
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                await _error(401, "a valid token is required (open the URL printed at start)")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _hostname(host_header: str) -> str:
    """``127.0.0.1:8765`` -> ``127.0.0.1``; ``[::1]:8765`` -> ``::1``."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


async def _json_body(request: Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise RequestError(415, "expected Content-Type: application/json")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise RequestError(413, f"request body over {MAX_BODY} bytes")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise RequestError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise RequestError(400, "expected a JSON object")
    return data


def create_app(labeler: Labeler, *, guidelines_html: str, token: str | None = None, check_host: bool = True) -> ASGIApp:
    """The ASGI app: routes over one `Labeler`; every change to RANKINGS.jsonl under one lock."""
    lock = asyncio.Lock()
    static = resources.files("rlhfkit.label") / "static"
    template = (static / "index.html").read_text(encoding="utf-8")
    assets = {name: (static / name).read_bytes() for name in ASSETS}
    settings = {
        "mode": labeler.mode,
        "annotators": labeler.assignment.annotators,
        "default_annotator": labeler.assignment.annotators[0] if len(labeler.assignment.annotators) == 1 else "",
    }
    # JSON inside <script type="application/json">: "<" escaped so that no string can close the element
    settings_json = json.dumps(settings).replace("<", "\\u003c")

    async def page(request: Request) -> Response:
        text = template.replace("{{settings}}", settings_json).replace("{{guidelines}}", guidelines_html)
        text = text.replace("{{mode}}", html.escape(labeler.mode))
        response = Response(text, media_type="text/html; charset=utf-8", headers=HEADERS)
        if token is not None and request.query_params.get("token"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets:
            raise RequestError(404, f"no asset {name!r}")
        return Response(assets[name], media_type=ASSETS[name], headers=HEADERS)

    async def get_task(request: Request) -> Response:
        annotator = labeler.check_annotator(request.query_params.get("annotator"))
        return JSONResponse(labeler.view(annotator, labeler.next_task(annotator)), headers=HEADERS)

    async def submit(request: Request) -> Response:
        body = await _json_body(request)
        async with lock:  # one writer: check, write + fsync, then count, with nothing in between
            record = labeler.prepare(body)
            await asyncio.to_thread(labeler.store.append, record)
            labeler.committed(record)
            annotator = record["annotator"]
            return JSONResponse(labeler.view(annotator, labeler.next_task(annotator)), headers=HEADERS)

    async def undo(request: Request) -> Response:
        body = await _json_body(request)
        async with lock:
            annotator = labeler.check_annotator(body.get("annotator"))
            index = labeler.undo_index(annotator)
            record = await asyncio.to_thread(labeler.store.remove, index)
            labeler.recount()
            task = labeler.task_of(record)
            previous = labeler.previous(record, task) if task is not None else None
            return JSONResponse(labeler.view(annotator, task or labeler.next_task(annotator), previous), headers=HEADERS)

    async def request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return _error(exc.status, exc.message)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail))

    async def server_error(request: Request, exc: Exception) -> Response:  # e.g. the disk is full: say so, keep serving
        return _error(500, f"{type(exc).__name__}: {exc}")

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/static/{name}", asset),
            Route("/api/task", get_task),
            Route("/api/submit", submit, methods=["POST"]),
            Route("/api/undo", undo, methods=["POST"]),
        ],
        exception_handlers={RequestError: request_error, HTTPException: http_error, Exception: server_error},
    )
    return Guard(app, token, check_host)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    return sock


def serve(app: ASGIApp, sock: socket.socket, on_ready: Callable[[], None] = lambda: None) -> None:
    """Serve until Ctrl-C (SIGINT) or SIGTERM; uvicorn finishes the requests in flight first."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", server_header=False)
    server = uvicorn.Server(config)
    on_ready()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it stopped on: here it is the normal way out
        pass

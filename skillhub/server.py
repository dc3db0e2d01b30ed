"""The HTTP API (DESIGN §5): a thin FastAPI layer over :class:`~skillhub.hub.Hub`, served by uvicorn in a thread.

Every route but ``GET /healthz`` needs ``Authorization: Bearer <token>`` (FAULTS D1). One pure ASGI middleware,
:class:`Guard`, runs before any routing or body parsing and enforces, in order: the ``Host`` header (a loopback
service must not answer a DNS-rebound browser page), the token (constant-time compare), the body size limit (413
from ``Content-Length`` before a byte is read, and by counting for chunked bodies), the concurrency limit (503 with
``Retry-After``), and per-message receive/send timeouts for slow clients; it also records request latency by route
template. Every failed request gets a JSON body ``{"error": "..."}``.

``GET /v1/model/weights`` streams the served version as a safetensors file built on the fly, one bounded chunk at a
time: the version is taken once, when the request starts, so a publish during the download never mixes two
versions (FAULTS C9).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictInt
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from skillhub.checkpoint import DTYPE_CODES
from skillhub.errors import CheckpointError, RegistryError, SkillhubError
from skillhub.inference import inference_router
from skillhub.log import get_logger
from skillhub.publish import ModelVersion

if TYPE_CHECKING:
    from skillhub.hub import Hub

log = get_logger("skillhub.server")

#: bytes per chunk of a streamed weights download (bounded memory per download, whatever the model size).
CHUNK_BYTES = 1 << 20
#: host names a loopback-bound service answers to, whatever the port (DNS-rebinding protection).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})
#: routes that need neither a token nor a concurrency slot (liveness must answer when the service is saturated).
EXEMPT_PATHS = frozenset({"/healthz"})
UNMATCHED = "unmatched"  # metrics label for paths no route matches (raw paths would explode label cardinality)


# --- the safetensors stream ---------------------------------------------------------------------------------------


def safetensors_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[bytes, list[str],
                                                                                                     int]:
    """The 8-byte length prefix plus the JSON header of a safetensors file holding ``tensors``.

    Returns ``(prefix, order, data_bytes)``: the tensors must follow in ``order`` (largest element size first, then
    by name, so every tensor stays aligned to its element size; the same order as
    :func:`~skillhub.checkpoint.write_safetensors`), ``data_bytes`` in all. The header is padded with spaces so the
    data starts 8-byte aligned, as the format requires. Only metadata (dtype, shape) is read: no tensor is copied.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in DTYPE_CODES:
            raise CheckpointError(f"cannot serialise dtype {t.dtype}", key=name)
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order, offset


def _tensor_chunks(t: torch.Tensor, chunk_bytes: int) -> Iterator[bytes]:
    """One tensor's raw little-endian bytes, ``chunk_bytes`` at a time (at most one tensor is copied, if it is not
    already a contiguous CPU tensor)."""
    if t.numel() == 0:
        return
    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    mv = memoryview(flat.numpy())
    for i in range(0, len(mv), chunk_bytes):
        yield mv[i:i + chunk_bytes].tobytes()


def iter_safetensors(prefix: bytes, order: Sequence[str], tensors: Mapping[str, torch.Tensor],
                     chunk_bytes: int | None = None) -> Iterator[bytes]:
    """The whole file as a sync iterator of chunks (Starlette runs it in its threadpool, off the event loop)."""
    yield prefix
    size = chunk_bytes or CHUNK_BYTES
    for name in order:
        yield from _tensor_chunks(tensors[name], size)


def version_metadata(version: ModelVersion) -> dict[str, str]:
    return {
        "format": "pt",
        "skillhub.version": str(version.number),
        "skillhub.manifest": json.dumps(version.manifest, sort_keys=True, default=str),
    }


# --- request bodies -----------------------------------------------------------------------------------------------


class PinRequest(BaseModel):
    """Body of ``POST /v1/skills/{name}/pin``: a version number, or ``null`` to follow the latest READY version."""

    model_config = ConfigDict(extra="forbid")
    version: StrictInt | None


# --- the guard ----------------------------------------------------------------------------------------------------


class SendTimeout(Exception):
    """A client did not read the response for ``send_timeout`` seconds; the connection is dropped."""


def _host_only(value: str) -> str:
    """``host[:port]`` → ``host`` in lower case; IPv6 literals keep their brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    if value.count(":") > 1:  # a bare IPv6 address (only from config; a Host header must bracket it)
        return f"[{value}]"
    return value.partition(":")[0]


def default_allowed_hosts(bound_host: str) -> list[str] | None:
    """The loopback names plus the bound host; ``None`` (no Host check) when bound to a wildcard address, whose
    valid names cannot be known here (a token is mandatory on such a bind, see ``skillhub.daemon``)."""
    if bound_host.strip().lower() in WILDCARD_HOSTS:
        return None
    return [*LOOPBACK_HOSTS, bound_host]


class Guard:
    """Pure ASGI middleware in front of every route: Host check, bearer token, body size, concurrency, timeouts and
    request-latency metrics (see the module docstring for the order and why it is done before routing)."""

    def __init__(self, app: ASGIApp, *, routes: Callable[[], Sequence[BaseRoute]], token: str | None,
                 allowed_hosts: Iterable[str] | None, max_body_bytes: int, max_concurrency: int,
                 observe: Callable[[str, int, float], None], receive_timeout: float = 30.0,
                 send_timeout: float = 60.0) -> None:
        self.app = app
        self.routes = routes
        self.token = token.encode("utf-8") if token is not None else None
        self.allowed = None if allowed_hosts is None else frozenset(_host_only(h) for h in allowed_hosts)
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.observe = observe
        self.receive_timeout = receive_timeout
        self.send_timeout = send_timeout
        self.in_flight = 0  # only touched on the event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; no websocket routes exist
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        response_started = False

        async def timed_send(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                response_started = True
            try:
                async with asyncio.timeout(self.send_timeout):
                    await send(message)
            except TimeoutError:
                raise SendTimeout(f"client did not read the response for {self.send_timeout:g}s") from None

        try:
            rejection = self._check(scope)
            if rejection is not None:
                await _send_json(timed_send, *rejection)
                return
            if scope["path"] in EXEMPT_PATHS:
                await self.app(scope, receive, timed_send)
                return
            if self.in_flight >= self.max_concurrency:
                await _send_json(timed_send, 503, f"too many requests in flight (limit {self.max_concurrency}); "
                                                  "retry shortly", {"retry-after": "1"})
                return
            self.in_flight += 1
            try:
                await self.app(scope, self._limited(receive), timed_send)
            finally:
                self.in_flight -= 1
        except Exception as e:
            timeout = _only(e, SendTimeout)
            if timeout is None:
                raise
            # Returning without completing the response makes uvicorn close the connection (one log line, no
            # traceback); the slot is free again.
            log.warning("slow_client_dropped", path=_printable(scope.get("path", "")), error=str(timeout))
        finally:
            self.observe(self._route(scope), status if response_started else 500, time.perf_counter() - t0)

    def _check(self, scope: Scope) -> tuple[int, str, dict[str, str]] | None:
        headers = _headers(scope)
        if self.allowed is not None:
            host = _host_only(headers.get("host", ""))
            if host not in self.allowed:
                return 400, "Host header not allowed (this service only answers to its own host names)", {}
        if scope["path"] not in EXEMPT_PATHS and self.token is not None:
            scheme, _, credentials = headers.get("authorization", "").partition(" ")
            given = credentials.strip().encode("latin-1")
            # compare_digest even when the scheme is wrong, so timing tells nothing about which check failed
            ok = hmac.compare_digest(given, self.token)
            if not (ok and scheme.lower() == "bearer"):
                return 401, "missing or invalid bearer token", {"www-authenticate": "Bearer"}
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return 400, "invalid Content-Length", {}
            if int(length) > self.max_body_bytes:
                return 413, f"request body too large (limit {self.max_body_bytes} bytes)", {}
        return None

    def _limited(self, receive: Receive) -> Receive:
        """``receive`` that counts body bytes (413 past the limit, also for chunked bodies) and times out a client
        that stops sending its body. Once the body is complete, calls pass straight through (a streaming response
        waits on ``receive`` for the disconnect, for as long as the download takes)."""
        received = 0
        body_done = False

        async def receive_limited() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout(self.receive_timeout):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"request body not received within {self.receive_timeout:g}s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, f"request body too large (limit {self.max_body_bytes} bytes)")
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        return receive_limited

    def _route(self, scope: Scope) -> str:
        """The route template (``/v1/skills/{name}/enable``), never the raw path, as the metrics label."""
        partial = None
        for route in self.routes():
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", UNMATCHED))
            if match is Match.PARTIAL and partial is None:
                partial = str(getattr(route, "path", UNMATCHED))
        return partial or UNMATCHED


def _only(exc: BaseException, kind: type[Exception]) -> Exception | None:
    """``exc`` if it is a ``kind``, or the first ``kind`` in an exception group made only of ``kind`` (task groups
    in streaming responses wrap what their tasks raise)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [_only(e, kind) for e in exc.exceptions]
        if found and all(f is not None for f in found):
            return found[0]
    return None


def _headers(scope: Scope) -> dict[str, str]:
    # The first occurrence wins for Host and Authorization; a duplicate cannot smuggle a second value past the check.
    out: dict[str, str] = {}
    for k, v in scope.get("headers", []):
        out.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
    return out


async def _send_json(send: Callable[[Message], Awaitable[None]], status: int, error: str,
                     headers: Mapping[str, str] | None = None) -> None:
    body = json.dumps({"error": error}).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if status in (400, 413):  # the rest of the request is not read: do not keep the connection alive
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _printable(text: str) -> str:
    return text if text.isprintable() else text.encode("unicode_escape", errors="backslashreplace").decode("ascii")


# --- the app ------------------------------------------------------------------------------------------------------


def _not_found(e: SkillhubError) -> bool:
    """Registry errors that mean "no such skill / version" (HTTP 404) rather than a bad request."""
    return isinstance(e, RegistryError) and (e.message.startswith(("unknown skill", "no skill version"))
                                             or " has no version " in e.message)


def create_app(hub: Hub, *, token: str | None, health: Callable[[], dict[str, Any]] | None = None,
               allowed_hosts: list[str] | None = None, receive_timeout: float = 30.0,
               send_timeout: float = 60.0) -> FastAPI:
    """The HTTP API over ``hub`` (a started :class:`~skillhub.hub.Hub`).

    :param token: the bearer token every route but ``/healthz`` requires; ``None`` disables auth (the daemon allows
        that only on a loopback bind).
    :param health: extra fields for ``/healthz`` (e.g. the inbox watch state); an exception in it is reported in the
        body, never as a failed liveness check.
    :param allowed_hosts: host names the ``Host`` header may carry (any port); ``None``: ``127.0.0.1``,
        ``localhost``, ``[::1]`` and ``[serve] host`` (no check when bound to a wildcard address); ``["*"]``: any.
    :param receive_timeout: seconds a client may pause while sending its request body (408 after that).
    :param send_timeout: seconds a client may leave the response unread before the connection is dropped.
    """
    serve = hub.config.serve
    if allowed_hosts is None:
        hosts = default_allowed_hosts(serve.host)
    else:
        hosts = None if "*" in allowed_hosts else allowed_hosts
    app = FastAPI(title="skillhub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub
    app.include_router(inference_router(hub))
    app.state.max_concurrency = serve.max_concurrency

    def observe(route: str, status: int, seconds: float) -> None:
        hub.metrics.requests.labels(route=route, status=str(status)).observe(seconds)

    app.add_middleware(Guard, routes=lambda: app.router.routes, token=token, allowed_hosts=hosts,
                       max_body_bytes=serve.max_body_bytes, max_concurrency=serve.max_concurrency, observe=observe,
                       receive_timeout=receive_timeout, send_timeout=send_timeout)

    # --- errors: always JSON, never a traceback ---

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code in (408, 413):
            headers["connection"] = "close"
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ())[1:]) or "body"
            problems.append(f"{loc}: {err.get('msg', 'invalid')}")
        return JSONResponse({"error": "invalid request: " + "; ".join(problems)}, status_code=400)

    @app.exception_handler(SkillhubError)
    async def _skillhub_error(request: Request, exc: SkillhubError) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=404 if _not_found(exc) else 400)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        log.error("request_crashed", path=_printable(request.url.path), error=f"{type(exc).__name__}: {exc}")
        return JSONResponse({"error": "internal server error"}, status_code=500)

    # --- routes ---

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        out: dict[str, Any] = {}
        if health is not None:
            try:
                out.update(health())
            except Exception as e:  # liveness must answer whatever a health probe does
                out["health_error"] = type(e).__name__
        out["status"] = "ok"
        return out

    @app.get("/readyz")
    def readyz() -> Response:
        current = hub.current
        if current is not None:
            return JSONResponse({"ready": True, "version": current.number})
        reason = "no model version published yet"
        if hub.last_error:
            reason += f"; last error: {hub.last_error}"
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)

    @app.get("/v1/model")
    def model() -> dict[str, Any]:
        return dict(hub.model_view())

    @app.get("/v1/model/weights")
    def weights() -> Response:
        version: ModelVersion | None = hub.current  # taken once: the whole download is this version (C9)
        if version is None:
            return JSONResponse({"error": "no model version published yet"}, status_code=503,
                                headers={"retry-after": "1"})
        tensors = version.tensors
        prefix, order, data_bytes = safetensors_header(tensors, version_metadata(version))
        headers = {
            "content-length": str(len(prefix) + data_bytes),
            "content-disposition": f'attachment; filename="skillhub-v{version.number}.safetensors"',
            "x-skillhub-version": str(version.number),
        }
        return StreamingResponse(iter_safetensors(prefix, order, tensors), media_type="application/octet-stream",
                                 headers=headers)

    @app.get("/v1/skills")
    def skills() -> list[dict[str, Any]]:
        return list(hub.skills_view())

    @app.post("/v1/skills/{name}/enable")
    def enable(name: str) -> dict[str, Any]:
        hub.set_enabled(name, True)
        return {"name": name, "enabled": True}

    @app.post("/v1/skills/{name}/disable")
    def disable(name: str) -> dict[str, Any]:
        hub.set_enabled(name, False)
        return {"name": name, "enabled": False}

    @app.post("/v1/skills/{name}/pin")
    def pin(name: str, body: PinRequest) -> dict[str, Any]:
        hub.pin(name, body.version)
        return {"name": name, "pinned": body.version}

    @app.delete("/v1/skills/{name}")
    def remove(name: str) -> dict[str, Any]:
        n = hub.remove(name)
        return {"name": name, "removed_versions": n}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(hub.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


# --- the server ---------------------------------------------------------------------------------------------------


class Server:
    """uvicorn in a background thread, shaped for an embedding process (the daemon, tests).

    :meth:`start` binds the socket itself (a busy port is a :class:`SkillhubError` in the caller, not a
    ``sys.exit`` in a thread) and returns once uvicorn is serving; :meth:`stop` asks it to exit, lets in-flight
    requests finish for up to ``graceful_timeout`` seconds, and joins the thread.
    """

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 8750, *, timeout_keep_alive: int = 5,
                 graceful_timeout: float = 10.0, limit_connections: int | None = None,
                 max_header_bytes: int = 64 * 1024) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        if limit_connections is None:
            # uvicorn's own limit (plain-text 503) is only a backstop on connections; the Guard's JSON 503 on
            # requests in flight is the real limit.
            n = getattr(getattr(app, "state", None), "max_concurrency", None)
            limit_connections = 4 * int(n) + 16 if n else None
        self.config = uvicorn.Config(
            app, host=host, port=port, http="h11", ws="none", lifespan="off", log_config=None, access_log=False,
            proxy_headers=False, server_header=False, timeout_keep_alive=timeout_keep_alive,
            timeout_graceful_shutdown=max(1, int(graceful_timeout)), limit_concurrency=limit_connections,
            h11_max_incomplete_event_size=max_header_bytes,
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._port: int | None = None
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        """The port actually listened on (the one the OS picked when ``port=0`` was asked)."""
        return self._port if self._port is not None else self.requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        if host in WILDCARD_HOSTS:
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            raise SkillhubError("server already started")
        self._sock = self._bind()
        self._port = int(self._sock.getsockname()[1])
        self._server = uvicorn.Server(self.config)
        self._error = None
        self._thread = threading.Thread(target=self._run, name="skillhub-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop(1.0)
                why = f" ({type(self._error).__name__}: {self._error})" if self._error is not None else ""
                raise SkillhubError(f"HTTP server on {self.host}:{self.requested_port} did not start{why}",
                                    key="serve")
            time.sleep(0.01)

    def _bind(self) -> socket.socket:
        try:
            infos = socket.getaddrinfo(self.host or None, self.requested_port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
        except OSError as e:
            raise SkillhubError(f"cannot listen on {self.host}:{self.requested_port} ({e.strerror or e})",
                                key="serve.host", hint="set [serve] host to a local address") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        except OSError as e:
            sock.close()
            raise SkillhubError(f"cannot listen on {self.host}:{self.requested_port} ({e.strerror or e})",
                                key="serve.port",
                                hint="stop whatever holds that port, or set [serve] port (0 = any free port)") from None
        return sock

    def _run(self) -> None:
        assert self._server is not None and self._sock is not None
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as e:  # uvicorn calls sys.exit on start-up failures; keep it out of the thread hook
            self._error = e
            log.error("http_server_failed", error=f"{type(e).__name__}: {e}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting connections, let requests in flight finish (up to ``timeout``), join the thread."""
        server, thread = self._server, self._thread
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout + 1.0)
            if thread.is_alive():
                server.force_exit = True
                thread.join(5.0)
            if thread.is_alive():
                log.error("http_server_stuck", timeout=timeout)
        if self._sock is not None:
            self._sock.close()  # uvicorn closes it on a clean exit; this covers a failed start
        self._sock = None
        self._thread = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""The HTTP API (DESIGN §5): a thin FastAPI layer over :class:`~skillhub.hub.Hub`, served by uvicorn in a thread.

This module owns the app (:func:`create_app`: routes, and error handlers that answer every failed request with a
JSON body ``{"error": "..."}``) and the server (:class:`Server`: uvicorn in a background thread). Every request
passes the :class:`~skillhub.guard.Guard` middleware first: Host header, bearer token (every route but
``GET /healthz`` needs ``Authorization: Bearer <token>``, FAULTS D1), body size, concurrency and timeouts.

``GET /v1/model/weights`` streams the served version as a safetensors file built on the fly, one bounded chunk at a
time (:mod:`skillhub.wire`): the version is taken once, when the request starts, so a publish during the download
never mixes two versions (FAULTS C9).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictInt
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp

from skillhub.errors import DiskFullError, RegistryCorruptError, RegistryError, SkillhubError, printable
from skillhub.guard import WILDCARD_HOSTS, Guard, default_allowed_hosts
from skillhub.inference import inference_router
from skillhub.log import get_logger
from skillhub.publish import ModelVersion
from skillhub.wire import iter_safetensors, safetensors_header, version_metadata

if TYPE_CHECKING:
    from skillhub.hub import Hub

__all__ = ["PinRequest", "Server", "create_app", "iter_safetensors", "safetensors_header", "version_metadata"]

log = get_logger("skillhub.server")


# --- request bodies -----------------------------------------------------------------------------------------------


class PinRequest(BaseModel):
    """Body of ``POST /v1/skills/{name}/pin``: a version number, or ``null`` to follow the latest READY version."""

    model_config = ConfigDict(extra="forbid")
    version: StrictInt | None


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
        # 503: the registry is read-only until restored (C5); 507: the state folder's disk is full (C4).
        status = 404 if _not_found(exc) else 503 if isinstance(exc, RegistryCorruptError) else \
            507 if isinstance(exc, DiskFullError) else 400
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        log.error("request_crashed", path=printable(request.url.path), error=f"{type(exc).__name__}: {exc}")
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

"""uvicorn in a background thread, shaped for an embedding process (the daemon, tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from starlette.types import ASGIApp

from skillhub.errors import SkillhubError
from skillhub.guard import WILDCARD_HOSTS
from skillhub.log import get_logger

log = get_logger("skillhub.httpd")


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

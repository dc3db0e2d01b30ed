"""The guard in front of every HTTP route (FAULTS D1, D2): one pure ASGI middleware, :class:`Guard`.

It runs before any routing or body parsing and enforces, in order: the ``Host`` header (a loopback service must not
answer a DNS-rebound browser page), the bearer token (constant-time compare; every route but ``GET /healthz`` needs
it), the body size limit (413 from ``Content-Length`` before a byte is read, and by counting for chunked bodies), the
concurrency limit (503 with ``Retry-After``; ``public`` paths, the dashboard's page shell that holds no data, need no
token but take a slot), and per-message receive/send timeouts for slow clients; it also records
request latency by route template. What it refuses gets a JSON body ``{"error": "..."}``, like every failed request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from skillhub.errors import printable
from skillhub.log import get_logger

log = get_logger("skillhub.server")  # the guard's events are the HTTP server's

#: host names a loopback-bound service answers to, whatever the port (DNS-rebinding protection).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})
#: routes that need neither a token nor a concurrency slot (liveness must answer when the service is saturated).
EXEMPT_PATHS = frozenset({"/healthz"})
UNMATCHED = "unmatched"  # metrics label for paths no route matches (raw paths would explode label cardinality)


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
                 send_timeout: float = 60.0, public: Iterable[str] = ()) -> None:
        self.app = app
        # GET-only pages that hold no data (the dashboard's shell): no token, but the Host check and a slot still
        self.public = frozenset(public)
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
            log.warning("slow_client_dropped", path=printable(scope.get("path", "")), error=str(timeout))
        finally:
            self.observe(self._route(scope), status if response_started else 500, time.perf_counter() - t0)

    def _check(self, scope: Scope) -> tuple[int, str, dict[str, str]] | None:
        headers = _headers(scope)
        if self.allowed is not None:
            host = _host_only(headers.get("host", ""))
            if host not in self.allowed:
                return 400, "Host header not allowed (this service only answers to its own host names)", {}
        path = scope["path"]
        public = path in EXEMPT_PATHS or (path in self.public and scope.get("method") in ("GET", "HEAD"))
        if not public and self.token is not None:
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



"""The HTTP API against a real Hub and a real uvicorn server on 127.0.0.1 (FAULTS D1, D2, C9)."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import skillhub.wire as wire_mod
from skillhub.checkpoint import write_safetensors
from skillhub.client import ApiError, Client
from skillhub.config import Config, load_config
from skillhub.errors import SkillhubError
from skillhub.hub import Hub
from skillhub.metrics import Metrics
from skillhub.publish import ModelVersion
from skillhub.server import Server, create_app

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def tiny_models() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 4, generator=g), "b": torch.randn(8, generator=g)}
    ft1 = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    ft2 = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return base, ft1, ft2


@dataclass
class Served:
    hub: Hub
    server: Server
    root: Path
    base: dict[str, torch.Tensor]
    ft2: Path  # a second finetune of skill "a" (a new skill version when ingested)

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, token: str | None = TOKEN) -> Client:
        return Client(self.url, token=token, timeout=10)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """A factory: a started Hub on a tiny base with skill "a" stitched in, served on 127.0.0.1:0."""
    started: list[Served] = []

    def make(serve_toml: str = "", **app_kw: Any) -> Served:
        root = tmp_path / f"hub{len(started)}"
        root.mkdir()
        base, ft1, ft2 = tiny_models()
        write_safetensors(root / "base.safetensors", base, {})
        write_safetensors(root / "a1.safetensors", ft1, {})
        write_safetensors(root / "a2.safetensors", ft2, {})
        (root / "config.toml").write_text(
            'device = "cpu"\n[base]\nweights = "base.safetensors"\n[state]\ndir = "state"\n[watch]\ndir = "inbox"\n'
            f"[localize.params]\nsparsity = 0.25\n[serve]\n{serve_toml}\n")
        hub = Hub(load_config(root / "config.toml", env={}))
        hub.start()
        app_kw.setdefault("token", TOKEN)
        server = Server(create_app(hub, **app_kw), "127.0.0.1", 0)
        s = Served(hub, server, root, base, root / "a2.safetensors")
        started.append(s)
        hub.ingest(root / "a1.safetensors", skill="a")
        hub.reconcile()
        server.start()
        return s

    yield make
    for s in started:
        s.server.stop(5)
        s.hub.close()


@pytest.fixture
def served(serve: Callable[..., Served]) -> Served:
    return serve()


@pytest.fixture
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, trust_env=False, timeout=10) as c:
        yield c


def assert_same(a: dict[str, torch.Tensor], b: Any) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


class Gate:
    """Holds a weights download in the middle: the stream blocks before its ``at``-th tensor until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int = 2) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()
        calls = 0
        original = wire_mod._tensor_chunks

        def gated(t: torch.Tensor, n: int) -> Iterator[bytes]:
            nonlocal calls
            calls += 1
            if calls == at:
                self.reached.set()
                assert self.release.wait(10), "test never released the download"
            yield from original(t, n)

        monkeypatch.setattr(wire_mod, "_tensor_chunks", gated)


class Background:
    """Run ``fn`` in a thread; ``result()`` joins and re-raises."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.value = fn()
            except BaseException as e:
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 15) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.value


# --- liveness, auth, Host -----------------------------------------------------------------------------------------


def test_healthz_needs_no_token(http: httpx.Client) -> None:
    r = http.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_healthz_includes_health_extras_and_survives_a_failing_probe(serve: Callable[..., Served]) -> None:
    s = serve(health=lambda: {"inbox": {"ok": True, "detail": "watching"}})
    with s.client(token=None) as c:
        assert c.health() == {"status": "ok", "inbox": {"ok": True, "detail": "watching"}}

    def broken() -> dict[str, Any]:
        raise OSError("probe failed")

    s2 = serve(health=broken)
    with s2.client(token=None) as c:
        assert c.health() == {"status": "ok", "health_error": "OSError"}


PROTECTED = [
    ("GET", "/readyz"), ("GET", "/v1/model"), ("GET", "/v1/model/weights"), ("GET", "/v1/skills"),
    ("POST", "/v1/skills/a/enable"), ("POST", "/v1/skills/a/disable"), ("POST", "/v1/skills/a/pin"),
    ("DELETE", "/v1/skills/a"), ("GET", "/metrics"), ("GET", "/no/such/route"),
]


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x"])
def test_every_route_but_healthz_needs_the_token(served: Served, http: httpx.Client, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth is not None else {}
    for method, path in PROTECTED:
        r = http.request(method, path, headers=headers, json={"version": None})
        assert r.status_code == 401, (method, path)
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"error": "missing or invalid bearer token"}
    # nothing changed behind the refused requests
    assert [s["name"] for s in served.hub.skills_view()] == ["a"]
    assert served.hub.skills_view()[0]["enabled"] is True


def test_right_token_is_accepted(http: httpx.Client) -> None:
    assert http.get("/v1/skills", headers=AUTH).status_code == 200
    assert http.get("/v1/skills", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


def test_auth_disabled_when_token_is_none(serve: Callable[..., Served]) -> None:
    s = serve(token=None)
    with s.client(token=None) as c:
        assert c.skills()[0]["name"] == "a"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "10.0.0.1", ""])
def test_foreign_host_header_is_refused(http: httpx.Client, host: str) -> None:
    for path in ("/healthz", "/v1/skills"):
        r = http.get(path, headers={**AUTH, "Host": host})
        assert r.status_code == 400, (path, host)
        assert "Host" in r.json()["error"]


@pytest.mark.parametrize("host", ["localhost", "localhost:1234", "127.0.0.1:9", "[::1]", "[::1]:8750", "LOCALHOST"])
def test_loopback_host_names_are_accepted(http: httpx.Client, host: str) -> None:
    assert http.get("/v1/skills", headers={**AUTH, "Host": host}).status_code == 200


def test_allowed_hosts_parameter(serve: Callable[..., Served]) -> None:
    s = serve(allowed_hosts=["skillhub.internal"])
    with httpx.Client(base_url=s.url, trust_env=False, headers=AUTH) as c:
        assert c.get("/v1/skills", headers={"Host": "skillhub.internal:8750"}).status_code == 200
        assert c.get("/v1/skills").status_code == 400  # 127.0.0.1 is not in the explicit list
    s2 = serve(allowed_hosts=["*"])
    with httpx.Client(base_url=s2.url, trust_env=False, headers=AUTH) as c:
        assert c.get("/v1/skills", headers={"Host": "anything.example"}).status_code == 200


# --- model and weights --------------------------------------------------------------------------------------------


def test_readyz_and_model(served: Served) -> None:
    with served.client() as c:
        cur = served.hub.current
        assert cur is not None
        assert c.ready() == {"ready": True, "version": cur.number}
        m = c.model()
        assert m["version"] == cur.number and set(m["skills"]) == {"a"}


def test_weights_equal_the_current_version_exactly(served: Served, http: httpx.Client) -> None:
    cur = served.hub.current
    assert cur is not None
    with served.client() as c:
        number, tensors = c.weights()
    assert number == cur.number
    assert_same(tensors, cur.tensors)
    assert not torch.equal(tensors["w"], served.base["w"])  # skill "a" is in there

    r = http.get("/v1/model/weights", headers=AUTH)
    assert r.headers["x-skillhub-version"] == str(cur.number)
    assert r.headers["content-type"] == "application/octet-stream"
    raw = r.content
    assert int(r.headers["content-length"]) == len(raw)
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    assert meta["skillhub.version"] == str(cur.number)
    assert json.loads(meta["skillhub.manifest"]) == json.loads(json.dumps(cur.manifest))
    assert max(e["data_offsets"][1] for e in header.values()) == len(raw) - 8 - n


def test_weights_stream_every_dtype_in_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Odd chunk sizes, half precision, integers, bools, scalars, empty and non-contiguous tensors round-trip."""
    monkeypatch.setattr(wire_mod, "CHUNK_BYTES", 5)
    g = torch.Generator().manual_seed(1)
    tensors = {
        "h": torch.randn(3, 5, generator=g).half(), "bf": torch.randn(7, generator=g).bfloat16(),
        "d": torch.randn(2, 3, generator=g).double(), "i": torch.arange(5), "i8": torch.arange(3, dtype=torch.int8),
        "m": torch.tensor([True, False, True]), "s": torch.tensor(3.5), "e": torch.zeros(0, 3),
        "nc": torch.randn(4, 6, generator=g).t(),
    }
    stub = _StubHub(ModelVersion(7, tensors, {"skills": {"x": {"version": 1}}}))
    server = Server(create_app(stub, token=TOKEN), "127.0.0.1", 0)  # type: ignore[arg-type]
    with server, Client(server.url, token=TOKEN) as c:
        number, got = c.weights()
    assert number == 7
    assert_same(got, {k: v.contiguous() for k, v in tensors.items()})


class _StubHub:
    """Just enough of a Hub for routes that only read ``current`` (e.g. a hub with nothing published yet)."""

    def __init__(self, current: ModelVersion | None) -> None:
        self.config = Config()
        self.metrics = Metrics()
        self.current = current
        self.last_error: str | None = "base weights unreadable" if current is None else None


def test_not_ready_without_a_version() -> None:
    server = Server(create_app(_StubHub(None), token=TOKEN), "127.0.0.1", 0)  # type: ignore[arg-type]
    with server, Client(server.url, token=TOKEN) as c:
        ready = c.ready()
        assert ready["ready"] is False and "no model version" in ready["reason"]
        assert "base weights unreadable" in ready["reason"]
        with pytest.raises(SkillhubError, match="503.*no model version") as e:
            c.weights()
        assert isinstance(e.value, ApiError) and e.value.status == 503


def test_download_during_a_publish_streams_the_old_version(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """C9: the first tensor goes out, a new version is published, the rest still comes from the old one."""
    gate = Gate(monkeypatch, at=2)
    old = served.hub.current
    assert old is not None
    with served.client() as c:
        download = Background(c.weights)
        assert gate.reached.wait(10)
        served.hub.set_enabled("a", False)
        new = served.hub.reconcile()
        assert new is not None and served.hub.current is new and new.number != old.number
        gate.release.set()
        number, tensors = download.result()
    assert number == old.number
    assert_same(tensors, old.tensors)
    assert_same(dict(new.tensors), served.base)  # and the new one really is different
    assert not torch.equal(tensors["w"], new.tensors["w"])


# --- control ------------------------------------------------------------------------------------------------------


def test_enable_disable_pin_remove_over_http(served: Served) -> None:
    hub = served.hub
    with served.client() as c:
        _, with_a1 = c.weights()
        assert c.disable("a") == {"name": "a", "enabled": False}
        hub.reconcile()
        assert c.skills()[0]["enabled"] is False
        number, tensors = c.weights()
        assert number == hub.current.number  # type: ignore[union-attr]
        assert_same(tensors, served.base)  # no skill: exactly the base

        c.enable("a")
        hub.reconcile()
        assert_same(c.weights()[1], with_a1)

        hub.ingest(served.ft2, skill="a")  # version 2 of skill "a"
        hub.reconcile()
        assert c.model()["skills"]["a"]["version"] == 2
        _, with_a2 = c.weights()
        assert c.pin("a", 1) == {"name": "a", "pinned": 1}
        hub.reconcile()
        assert c.model()["skills"]["a"]["version"] == 1
        assert_same(c.weights()[1], with_a1)
        c.pin("a", None)
        hub.reconcile()
        assert c.model()["skills"]["a"]["version"] == 2
        assert_same(c.weights()[1], with_a2)

        assert c.remove("a") == {"name": "a", "removed_versions": 2}
        hub.reconcile()
        assert c.skills() == []
        assert_same(c.weights()[1], served.base)


def test_unknown_skill_is_404(served: Served, http: httpx.Client) -> None:
    for method, path, body in [("POST", "/v1/skills/nope/enable", None), ("POST", "/v1/skills/nope/disable", None),
                               ("DELETE", "/v1/skills/nope", None), ("POST", "/v1/skills/nope/pin", {"version": 1})]:
        r = http.request(method, path, headers=AUTH, json=body)
        assert r.status_code == 404, path
        assert "unknown skill 'nope'" in r.json()["error"]
    r = http.post("/v1/skills/a/pin", headers=AUTH, json={"version": 99})
    assert r.status_code == 404 and "has no version 99" in r.json()["error"]


@pytest.mark.parametrize("body", [{"version": "1"}, {"version": 1.5}, {"version": True}, {}, {"version": 1, "x": 2},
                                  [1], "not json"])
def test_bad_pin_body_is_400(served: Served, http: httpx.Client, body: Any) -> None:
    kw: dict[str, Any] = {"content": body} if isinstance(body, str) else {"json": body}
    r = http.post("/v1/skills/a/pin", headers={**AUTH, "content-type": "application/json"}, **kw)
    assert r.status_code == 400
    assert r.json()["error"].startswith("invalid request")
    assert served.hub.skills_view()[0]["pinned"] is None


def test_unknown_route_and_method_are_json(http: httpx.Client) -> None:
    r = http.get("/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and "error" in r.json()
    r = http.get("/v1/skills/a/enable", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()
    assert http.get("/docs", headers=AUTH).status_code == 404  # no interactive docs on a service port


# --- limits -------------------------------------------------------------------------------------------------------


def test_oversized_body_is_413_before_it_is_read(serve: Callable[..., Served]) -> None:
    s = serve("max_body_bytes = 1024")
    big = b'{"version": null' + b" " * 4000 + b"}"
    with httpx.Client(base_url=s.url, trust_env=False, headers={**AUTH, "content-type": "application/json"}) as c:
        r = c.post("/v1/skills/a/pin", content=big)  # Content-Length
        assert r.status_code == 413 and "too large" in r.json()["error"]
        r = c.post("/v1/skills/a/pin", content=iter([big[i:i + 500] for i in range(0, len(big), 500)]))  # chunked
        assert r.request.headers.get("transfer-encoding") == "chunked"
        assert r.status_code == 413 and "too large" in r.json()["error"]
        r = c.post("/v1/skills/a/pin", content=iter([b'{"version":', b" 1}"]))  # chunked, small: fine
        assert r.status_code == 200
        assert c.post("/v1/skills/a/pin", content=b'{"version": null}').status_code == 200


def test_concurrency_limit_is_503(serve: Callable[..., Served], monkeypatch: pytest.MonkeyPatch) -> None:
    s = serve("max_concurrency = 1")
    gate = Gate(monkeypatch, at=1)
    with s.client() as c, httpx.Client(base_url=s.url, trust_env=False, headers=AUTH) as raw:
        download = Background(c.weights)
        assert gate.reached.wait(10)
        r = raw.get("/v1/skills")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert "too many requests" in r.json()["error"]
        assert raw.get("/healthz").status_code == 200  # liveness is exempt
        gate.release.set()
        number, tensors = download.result()
        assert_same(tensors, s.hub.current.tensors)  # type: ignore[union-attr]
        # the client has every byte a moment before the server's request task ends and frees its slot
        deadline = time.monotonic() + 5
        while (status := raw.get("/v1/skills").status_code) == 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert status == 200


# --- metrics and client errors ------------------------------------------------------------------------------------


def test_metrics_record_request_latency_by_route_template(served: Served, http: httpx.Client) -> None:
    with served.client() as c:
        c.enable("a")
        c.skills()
        http.get("/v1/x/y", headers=AUTH)
        http.get("/v1/skills")  # 401
        text = c.metrics()
    assert "skillhub_request_seconds" in text
    assert 'route="/v1/skills/{name}/enable",status="200"' in text
    assert 'route="/v1/skills",status="401"' in text
    assert 'route="unmatched",status="404"' in text
    assert "/v1/x/y" not in text and "/v1/skills/a/enable" not in text


def test_client_errors_carry_the_server_message(served: Served) -> None:
    with served.client(token="wrong") as c:
        with pytest.raises(SkillhubError, match="401: missing or invalid bearer token") as e:
            c.skills()
        assert isinstance(e.value, ApiError) and e.value.status == 401
        assert c.health()["status"] == "ok"
    with served.client() as c:
        with pytest.raises(SkillhubError, match="404: unknown skill 'nope'"):
            c.enable("nope")
        with pytest.raises(SkillhubError, match="404"):
            c.enable("a/b")  # a name cannot smuggle another route in
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    with Client(f"http://127.0.0.1:{free}", token=TOKEN, timeout=2) as c:
        with pytest.raises(SkillhubError, match="failed") as e:
            c.skills()
        assert isinstance(e.value, ApiError) and e.value.status == 0


def test_busy_port_is_a_clear_error(served: Served) -> None:
    other = Server(create_app(served.hub, token=TOKEN), "127.0.0.1", served.server.port)
    with pytest.raises(SkillhubError, match="cannot listen on 127.0.0.1"):
        other.start()


def test_stop_is_graceful_and_idempotent(serve: Callable[..., Served]) -> None:
    s = serve()
    with s.client() as c:
        assert c.ready()["ready"] is True
    s.server.stop(5)
    s.server.stop(5)
    with Client(s.url, token=TOKEN, timeout=2) as c, pytest.raises(SkillhubError):
        c.ready()


# --- slow clients -------------------------------------------------------------------------------------------------


def test_client_that_stops_sending_its_body_gets_408(serve: Callable[..., Served]) -> None:
    s = serve(receive_timeout=0.5)
    with socket.create_connection(("127.0.0.1", s.server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/skills/a/pin HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"ver")
        answer = b""
        while b"}" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"request body not received" in answer
    assert s.hub.skills_view()[0]["pinned"] is None


def test_client_that_stops_reading_is_dropped_and_frees_its_slot() -> None:
    big = {"big": torch.zeros(8_000_000)}  # 32 MB: far more than the socket buffers hold
    stub = _StubHub(ModelVersion(3, big, {"skills": {}}))
    stub.config = Config.model_validate({"serve": {"max_concurrency": 1}})
    server = Server(create_app(stub, token=TOKEN, send_timeout=0.5), "127.0.0.1", 0)  # type: ignore[arg-type]
    with server, httpx.Client(base_url=server.url, trust_env=False, headers=AUTH, timeout=10) as c:
        with c.stream("GET", "/v1/model/weights") as r:
            assert r.status_code == 200
            time.sleep(1.5)  # read nothing: the server's send times out and it drops the connection
            with pytest.raises(httpx.HTTPError):
                for _ in r.iter_bytes():
                    pass
        deadline = time.monotonic() + 5
        while (status := c.get("/readyz").status_code) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200
        assert 'route="/v1/model/weights",status="200"' in c.get("/metrics").text

"""FAULTS D1, D2 and C9 against the real service: `skillhub run` as a subprocess serving a tiny open_clip model
with two skills (classification heads) on 127.0.0.1, spoken to over real sockets by this process: raw ones for what
a polite HTTP client cannot do (stop half-way through a body, announce a body it never sends).

One service is shared by the module: D1 and D2 change nothing (each checks that), C9 swaps versions under load last.
The slow-client 408 itself is not waited for here: the daemon's receive timeout is 30 s; test_server.py checks the
408 with a short one. Constant-time token comparison cannot be observed reliably from outside (the Guard uses
``hmac.compare_digest``); what is checked is that every wrong form of the token gets the same answer.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import select
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from skillhub.checkpoint import write_safetensors
from skillhub.families.open_clip import create_clip

from harness import TOKEN, Service, free_port

TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 256 * 1024
MAX_CONCURRENCY = 8
CONFIG = """
[base]
family = "open_clip"
model = "tiny-clip.json"
weights = "base.safetensors"
[watch]
dir = "inbox"
stable_seconds = 0.2
rescan_seconds = 2
[state]
dir = "state"
[localize.params]
sparsity = 0.05
[serve]
port = {port}
max_body_bytes = {max_body}
max_concurrency = {max_concurrency}
"""
SKILLS = {"shapes": (["circle", "square", "star"], 11, 0.02), "colors": (["red", "blue"], 12, 0.03)}


def finetune(sd: dict[str, torch.Tensor], seed: int, classes: int, noise: float) -> dict[str, torch.Tensor]:
    """The image tower moved by ``noise``, the rest as in the base, and a classification head."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v + noise * torch.randn(v.shape, generator=g) if k.startswith("visual.") and v.is_floating_point()
           else v for k, v in sd.items()}
    out["skillhub.head.weight"] = torch.nn.functional.normalize(torch.randn(classes, TINY["embed_dim"], generator=g),
                                                                dim=-1)
    return out


def png(seed: int, size: int = 24) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Http:
    """The shared service and a few ways to talk to it."""

    def __init__(self, root: Path, svc: Service) -> None:
        self.root, self.svc = root, svc
        self.url = f"http://127.0.0.1:{svc.port}"
        self.client = httpx.Client(base_url=self.url, trust_env=False, timeout=30)

    def request(self, method: str, route: str, *, auth: bool = True, **kw) -> httpx.Response:
        headers = {**(AUTH if auth else {}), **kw.pop("headers", {})}
        r = self.client.request(method, route, headers=headers, **kw)
        if route != "/healthz":  # (liveness reports the inbox it watches)
            assert str(self.root) not in r.text  # never a file path of ours in an answer
        return r

    def model(self) -> dict:
        return self.request("GET", "/v1/model").json()

    def raw(self, head: bytes, body: bytes = b"") -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.svc.port), timeout=30)
        sock.sendall(head + body)
        return sock

    def post_head(self, route: str, length: int, ctype: str = "application/json") -> bytes:
        return (f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {length}\r\n\r\n").encode()


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (with Content-Length) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("http")
    (root / "tiny-clip.json").write_text(json.dumps(TINY))
    torch.manual_seed(0)
    sd = {k: v.detach().clone() for k, v in create_clip(str(root / "tiny-clip.json")).state_dict().items()}
    write_safetensors(root / "base.safetensors", sd, {})
    port = free_port()
    (root / "config.toml").write_text(CONFIG.format(port=port, max_body=MAX_BODY, max_concurrency=MAX_CONCURRENCY))
    (root / "inbox").mkdir()
    svc = Service(root, port)
    h = Http(root, svc)
    try:
        svc.start()
        for name, (classes, seed, noise) in SKILLS.items():
            tmp = root / "inbox" / f".{name}.part"
            write_safetensors(tmp, finetune(sd, seed, len(classes), noise),
                              {"skillhub.classes": json.dumps(classes), "skillhub.head_scale": "50"})
            os.rename(tmp, root / "inbox" / f"{name}.safetensors")
        svc.wait(lambda: set(h.model().get("skills", {})) == set(SKILLS), "two skills served")
        yield h
        assert svc.stop() == 0
    finally:
        h.client.close()
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()


def served(h: Http) -> tuple[int, str]:
    """The served version and the sha256 of its weights as downloaded."""
    r = h.request("GET", "/v1/model/weights")
    assert r.status_code == 200
    return int(r.headers["x-skillhub-version"]), hashlib.sha256(r.content).hexdigest()


def unchanged(h: Http, before: tuple[int, str]) -> None:
    """D1/D2 refuse without side effects: the same version and weights, both skills enabled and served, ready."""
    assert h.svc.proc is not None and h.svc.proc.poll() is None
    assert h.request("GET", "/readyz").json() == {"ready": True, "version": before[0]}
    assert served(h) == before
    assert set(h.model()["skills"]) == set(SKILLS)
    assert all(s["enabled"] and s["pinned"] is None for s in h.request("GET", "/v1/skills").json())


# --- D1 ------------------------------------------------------------------------------------------------------------

ROUTES = [("GET", "/readyz"), ("GET", "/v1/model"), ("GET", "/v1/model/weights"), ("GET", "/v1/skills"),
          ("POST", "/v1/skills/shapes/enable"), ("POST", "/v1/skills/shapes/disable"),
          ("POST", "/v1/skills/shapes/pin"), ("DELETE", "/v1/skills/shapes"), ("POST", "/v1/skills/shapes/predict"),
          ("POST", "/v1/embed"), ("GET", "/metrics"), ("GET", "/no/such/route")]
BAD_AUTH = [None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
            f"Token {TOKEN}", TOKEN]


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port:
                found.add(addr)
    return found


def test_d1_no_or_wrong_token_401_on_every_route_but_liveness_foreign_host_refused(http: Http) -> None:
    before = served(http)
    image = {"images": [b64(png(1))]}
    for auth in BAD_AUTH:
        for method, route in ROUTES:
            headers = {"Authorization": auth} if auth is not None else {}
            r = http.request(method, route, auth=False, headers=headers,
                             json=image if route.endswith(("predict", "embed")) else {"version": None})
            assert r.status_code == 401, (auth, method, route, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json() == {"error": "missing or invalid bearer token"}
    health = http.request("GET", "/healthz", auth=False)
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["inbox"]["ok"] is True
    # a foreign Host header (DNS rebinding) is refused even with the right token, liveness included
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", "10.0.0.1"):
        for route in ("/healthz", "/v1/skills"):
            r = http.request("GET", route, headers={"Host": host})
            assert r.status_code == 400 and "Host header not allowed" in r.json()["error"], (host, route)
    for host in ("localhost", f"127.0.0.1:{http.svc.port}", "[::1]"):
        assert http.request("GET", "/v1/skills", headers={"Host": host}).status_code == 200
    # the default bind (no [serve] host in this config) is loopback only
    assert "host" not in (http.root / "config.toml").read_text()
    assert listening_addresses(http.svc.port) == {"0100007F"}  # 127.0.0.1, nothing else, no IPv6
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            own = probe.getsockname()[0]
        except OSError:
            own = "127.0.0.1"
    if not own.startswith("127."):
        with socket.socket() as s:
            assert s.connect_ex((own, http.svc.port)) != 0  # not reachable on the machine's own address
    unchanged(http, before)


# --- D2 ------------------------------------------------------------------------------------------------------------


def test_d2_oversized_body_413_before_it_is_read(http: Http) -> None:
    before = served(http)
    # Content-Length over the limit and not one byte of body sent: the answer comes at once
    sock = http.raw(http.post_head("/v1/skills/shapes/predict", 100 * MAX_BODY))
    with sock:
        sock.settimeout(5)
        status, headers, body = answer(sock)
    assert status == 413 and json.loads(body) == {"error": f"request body too large (limit {MAX_BODY} bytes)"}
    assert headers.get("connection") == "close"
    # chunked (no Content-Length): counted as it arrives, refused once over
    big = json.dumps({"images": [b64(os.urandom(MAX_BODY))]}).encode()
    r = http.request("POST", "/v1/skills/shapes/predict", headers={"content-type": "application/json"},
                     content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]))
    assert r.status_code == 413 and "too large" in r.json()["error"]
    # under the byte limit but over the image-count limit
    r = http.request("POST", "/v1/skills/shapes/predict", json={"images": [b64(png(2, 8))] * 65})
    assert r.status_code == 413 and r.json() == {"error": "at most 64 images per request"}
    unchanged(http, before)


def test_d2_slow_clients_hold_no_one_up_concurrency_limit_503(http: Http) -> None:
    before = served(http)
    # slow clients: each sends its headers and part of its body, then stalls, holding a request slot
    def stall() -> socket.socket:
        return http.raw(http.post_head("/v1/skills/shapes/pin", 100), b'{"ver')

    stalled = [stall() for _ in range(MAX_CONCURRENCY)]
    try:
        deadline = time.monotonic() + 20
        while True:  # until every slot is held by a stalled client (one may lose a race with our own probe)
            time.sleep(0.3)
            answered = [s for s in stalled if select.select([s], [], [], 0)[0]]
            for s in answered:
                stalled.remove(s)
                s.close()
                stalled.append(stall())
            if not answered and http.request("GET", "/v1/skills").status_code == 503:
                break
            assert time.monotonic() < deadline, "the stalled clients never held every slot"
        r = http.request("GET", "/v1/model")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json() == {"error": f"too many requests in flight (limit {MAX_CONCURRENCY}); retry shortly"}
        t0 = time.monotonic()
        assert http.request("GET", "/healthz", auth=False).status_code == 200  # liveness needs no slot
        assert time.monotonic() - t0 < 2
        # a burst of concurrent requests while the slots are held: each is answered at once with 503, none hangs
        statuses: list[int] = []

        def one() -> None:
            statuses.append(http.request("GET", "/v1/skills").status_code)

        burst = [threading.Thread(target=one) for _ in range(16)]
        for t in burst:
            t.start()
        for t in burst:
            t.join(10)
        assert len(statuses) == 16 and set(statuses) == {503}
    finally:
        for s in stalled:
            s.close()
    http.svc.wait(lambda: http.request("GET", "/v1/skills").status_code == 200, "slots freed", 10)
    statuses.clear()
    burst = [threading.Thread(target=one) for _ in range(16)]
    for t in burst:
        t.start()
    for t in burst:
        t.join(30)
    assert len(statuses) == 16 and set(statuses) <= {200, 503} and 200 in statuses
    unchanged(http, before)


def bomb_png() -> bytes:
    """A tiny file that decodes to 10⁸ pixels: over the decompression-bomb limit."""
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    return buf.getvalue()


def test_d2_malformed_images_unknown_skills_hostile_paths_400_404_with_a_message(http: Http) -> None:
    before = served(http)
    good = png(3)
    bad_images = {
        "not an image": b"not a png at all",
        "truncated png": good[: len(good) // 2],
        "decompression bomb": bomb_png(),
    }
    for what, data in bad_images.items():
        r = http.request("POST", "/v1/skills/shapes/predict", files=[("images", ("x.png", data, "image/png"))])
        assert r.status_code == 400, (what, r.text)
        assert r.json()["error"].startswith("image 0 is not a readable image ("), (what, r.text)
    r = http.request("POST", "/v1/skills/shapes/predict", json={"images": ["%%% not base64 %%%"]})
    assert r.status_code == 400
    assert r.json()["error"] == 'send multipart "images" files, or JSON {"images": ["<base64>", ...]}'
    r = http.request("POST", "/v1/skills/shapes/predict", json={"images": []})
    assert r.status_code == 400 and r.json()["error"] == "no images in the request"
    r = http.request("POST", "/v1/skills/shapes/predict", json={"images": [b64(good)], "top_k": "many"})
    assert r.status_code == 400 and r.json()["error"] == "top_k must be an integer"
    # unknown skills and versions
    r = http.request("POST", "/v1/skills/nope/predict", json={"images": [b64(good)]})
    assert r.status_code == 404
    assert r.json()["error"] == f"skill 'nope' is not in the served model (version {before[0]})"
    for method, route, body in (("POST", "/v1/skills/nope/enable", None), ("POST", "/v1/skills/nope/disable", None),
                                ("DELETE", "/v1/skills/nope", None), ("POST", "/v1/skills/nope/pin", {"version": 1})):
        r = http.request(method, route, json=body)
        assert r.status_code == 404 and "unknown skill 'nope'" in r.json()["error"], (route, r.text)
    r = http.request("POST", "/v1/skills/shapes/pin", json={"version": 99})
    assert r.status_code == 404 and "has no version 99" in r.json()["error"]
    # names that look like paths are names: nothing is read from or written to a path a request names
    for name in ("..%2F..%2Fstate%2Fregistry.sqlite3", "%2Fetc%2Fpasswd", "..", "~root"):
        r = http.request("POST", f"/v1/skills/{name}/disable")
        assert r.status_code == 404, (name, r.status_code, r.text)
        assert "root:" not in r.text and "SQLite" not in r.text
    with http.raw(b"GET /v1/model/../../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                  + TOKEN.encode() + b"\r\n\r\n") as sock:
        status, _, body = answer(sock)
    assert status == 404 and b"root:" not in body and json.loads(body)["error"]
    assert http.request("GET", "/docs").status_code == 404
    unchanged(http, before)


# --- C9 ------------------------------------------------------------------------------------------------------------


def scores(response: dict) -> list[float]:
    """A prediction's class probabilities in class order (first image)."""
    return [p["score"] for p in sorted(response["predictions"][0], key=lambda p: p["index"])]


def close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return max(abs(x - y) for x, y in zip(a, b)) <= tol


def toggle_colors(h: Http, enable: bool) -> int:
    """Enable or disable "colors" over HTTP; the number of the version that is then served."""
    assert h.request("POST", f"/v1/skills/colors/{'enable' if enable else 'disable'}").status_code == 200
    want = set(SKILLS) if enable else {"shapes"}
    h.svc.wait(lambda: set(h.model()["skills"]) == want, f"colors {'enabled' if enable else 'disabled'}")
    return h.model()["version"]


def test_c9_inference_during_version_swaps_no_request_fails_each_on_its_start_version(http: Http) -> None:
    body = json.dumps({"images": [b64(png(7))], "top_k": 3, "route": "merged"}).encode()
    both = http.request("POST", "/v1/skills/shapes/predict", content=body,
                        headers={"content-type": "application/json"}).json()
    v_both = both["version"]
    assert set(http.model()["skills"]) == set(SKILLS) and http.model()["version"] == v_both

    # 1. In flight across a swap: the request's route has started (and taken its version) once its headers are in;
    #    the body follows only after a new version is served. It must be answered by the version it started on.
    half = len(body) // 2
    sock = http.raw(http.post_head("/v1/skills/shapes/predict", len(body)), body[:half])
    with sock:
        time.sleep(1.0)
        v_shapes = toggle_colors(http, enable=False)
        assert v_shapes != v_both
        sock.sendall(body[half:])
        status, _, raw = answer(sock)
    assert status == 200, raw
    straddled = json.loads(raw)
    assert straddled["version"] == v_both and close(scores(straddled), scores(both))
    shapes_only = http.request("POST", "/v1/skills/shapes/predict", content=body,
                               headers={"content-type": "application/json"}).json()
    assert shapes_only["version"] == v_shapes
    assert not close(scores(shapes_only), scores(both), 1e-3)  # the two versions really answer differently
    expected = {v_both: scores(both), v_shapes: scores(shapes_only)}

    # 2. Load: four clients predicting without pause while versions are swapped four times.
    results: list[tuple[int, dict | str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=http.url, trust_env=False, timeout=30, headers=AUTH) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/skills/shapes/predict", content=body,
                               headers={"content-type": "application/json"})
                    results.append((r.status_code, r.json() if r.status_code == 200 else r.text))
                except httpx.HTTPError as e:
                    results.append((0, repr(e)))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        time.sleep(0.3)
        for enable in (True, False, True, False):
            v = toggle_colors(http, enable)
            expected[v] = scores(both) if enable else scores(shapes_only)
            time.sleep(0.3)
    finally:
        stop.set()
        for t in clients:
            t.join(60)
    failures = [r for r in results if r[0] != 200]
    assert not failures, failures[:3]
    answered = [r for _, r in results if isinstance(r, dict)]
    versions = {r["version"] for r in answered}
    assert len(answered) >= 20 and len(versions) >= 3, (len(answered), versions)
    assert versions <= set(expected), versions - set(expected)  # every answer from a version that was served
    wrong = [(r["version"], scores(r)) for r in answered if not close(scores(r), expected[r["version"]])]
    assert not wrong, wrong[:3]  # each answered entirely by the version it names
    toggle_colors(http, enable=True)

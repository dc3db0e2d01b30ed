"""The soak's clients (bench/soak.py): threads sending predict (multipart and JSON) and embed requests throughout
the run, to the skills the driver knows to be served, plus deliberate bad requests; every answer is counted and
checked, and the latencies kept."""

from __future__ import annotations

import base64
import random
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import httpx
from soak_service import http_client
from soak_world import png

DRAIN_SECONDS = 3.0  # clients keep asking for a skill this long after the driver starts taking it out


class Traffic:
    """Client threads sending predict and embed requests throughout, to skills the driver knows to be served.

    A skill is *allowed* once the driver has seen it served, and revoked (its epoch bumped) before the driver does
    anything that takes it out; clients keep asking for it for :data:`DRAIN_SECONDS` more, so that requests race the
    version swap that removes it. A 404 for a skill that stayed allowed, with the same epoch, for the whole request
    is a failure; a 404 ("not in the served model") for one revoked meanwhile is an expected 4xx, counted apart.
    """

    def __init__(self, url: str, clients: int, think: float, seed: int) -> None:
        self.url, self.clients, self.think, self.seed = url, clients, think, seed
        self._lock = threading.Lock()
        self._allowed: dict[str, int] = {}
        self._epoch: defaultdict[str, int] = defaultdict(int)
        self._revoked: dict[str, float] = {}  # name -> when it was revoked
        self.stop_event = threading.Event()
        self.counts: Counter[str] = Counter()  # "<kind> <status>"
        self.expected_4xx: Counter[str] = Counter()
        self.failures: list[str] = []
        self.n_failures = 0
        self.latencies: list[float] = []
        self.versions: set[int] = set()
        self.slow: list[tuple[float, float, str, int | None]] = []  # (at s, latency s, route, version), over 1 s
        self.t0 = time.monotonic()
        self.threads = [threading.Thread(target=self._run, args=(i,), name=f"soak-client-{i}", daemon=True)
                        for i in range(clients)]
        self.images = [png(1000 + i) for i in range(8)]

    def allow(self, names: set[str]) -> None:
        """Skills the driver has just seen served: clients may ask for them (a 404 would now be a failure)."""
        with self._lock:
            for n in names:
                if n not in self._allowed:
                    self._allowed[n] = self._epoch[n]

    def revoke(self, names: set[str]) -> None:
        """Skills the driver is about to take out: a 404 for them from now on is expected."""
        with self._lock:
            for n in names:
                self._epoch[n] += 1
                self._allowed.pop(n, None)
                self._revoked[n] = time.monotonic()

    def _pick(self, rng: random.Random) -> tuple[str, int] | None:
        with self._lock:
            now = time.monotonic()
            draining = sorted(n for n, t in self._revoked.items() if now - t < DRAIN_SECONDS and n not in self._allowed)
            if draining and rng.random() < 0.3:
                name = rng.choice(draining)
                return name, -1  # never "still allowed": its 404 is expected
            if not self._allowed:
                return None
            name = rng.choice(sorted(self._allowed))
            return name, self._allowed[name]

    def _still(self, name: str, epoch: int) -> bool:
        with self._lock:
            return self._allowed.get(name) == epoch

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)

    def _fail(self, what: str) -> None:
        with self._lock:
            self.n_failures += 1
            if len(self.failures) < 30:
                self.failures.append(what)

    def _run(self, i: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        with http_client(self.url) as http:
            while not self.stop_event.is_set():
                try:
                    self._one(http, rng)
                except Exception as e:  # noqa: BLE001 - a failed request of any kind is counted, never fatal
                    self._fail(f"client error: {type(e).__name__}: {e}")
                    with self._lock:
                        self.counts["error 0"] += 1
                if self.think:
                    self.stop_event.wait(rng.uniform(0, 2 * self.think))

    def _one(self, http: httpx.Client, rng: random.Random) -> None:
        r = rng.random()
        imgs = [rng.choice(self.images) for _ in range(rng.choice((1, 1, 2, 3)))]
        if r < 0.04:  # deliberate: an unknown skill
            self._expect(http.post(f"/v1/skills/no-such-skill-{rng.randrange(100)}/predict",
                                   files=[("images", ("a.png", imgs[0], "image/png"))]), "unknown skill", 404)
            return
        if r < 0.08:  # deliberate: an unreadable image
            self._expect(http.post("/v1/embed", files=[("images", ("a.png", b"not an image", "image/png"))]),
                         "bad image", 400)
            return
        if r < 0.16:
            t0 = time.perf_counter()
            resp = http.post("/v1/embed", json={"images": [_b64(x) for x in imgs]})
            self._record("embed", resp, time.perf_counter() - t0)
            if resp.status_code == 200 and len(resp.json()["embeddings"]) != len(imgs):
                self._fail("embed: wrong number of embeddings")
            elif resp.status_code != 200:
                self._fail(f"embed: HTTP {resp.status_code} {resp.text[:200]}")
            return
        picked = self._pick(rng)
        if picked is None:
            self.stop_event.wait(0.05)
            return
        name, epoch = picked
        top_k = rng.choice((1, 2, 5))
        t0 = time.perf_counter()
        if rng.random() < 0.5:
            resp = http.post(f"/v1/skills/{name}/predict", files=[("images", (f"{j}.png", x, "image/png"))
                                                                  for j, x in enumerate(imgs)],
                             data={"top_k": str(top_k)})
        else:
            resp = http.post(f"/v1/skills/{name}/predict", json={"images": [_b64(x) for x in imgs], "top_k": top_k})
        dt = time.perf_counter() - t0
        if resp.status_code == 404 and not self._still(name, epoch) and "not in the served model" in resp.text:
            with self._lock:
                self.counts["predict 404"] += 1
                self.expected_4xx["404 skill being taken out (disable/remove)"] += 1
            return
        self._record("predict", resp, dt)
        if resp.status_code != 200:
            self._fail(f"predict {name}: HTTP {resp.status_code} {resp.text[:200]} "
                       f"(still allowed: {self._still(name, epoch)})")
            return
        body = resp.json()
        preds = body.get("predictions", [])
        bad = [p["label"] for row in preds for p in row if not str(p["label"]).startswith(name + "/")]
        if len(preds) != len(imgs) or bad or body.get("skill") != name:
            self._fail(f"predict {name}: wrong answer {str(body)[:200]}")

    def _record(self, kind: str, resp: httpx.Response, dt: float) -> None:
        with self._lock:
            self.counts[f"{kind} {resp.status_code}"] += 1
            if resp.status_code == 200:
                self.latencies.append(dt)
                v = resp.json().get("version")
                if isinstance(v, int):
                    self.versions.add(v)
                if dt > 1.0 and len(self.slow) < 100:
                    self.slow.append((round(time.monotonic() - self.t0 - dt, 2), round(dt, 2), kind, v))

    def _expect(self, resp: httpx.Response, what: str, status: int) -> None:
        with self._lock:
            self.counts[f"{what} {resp.status_code}"] += 1
            if resp.status_code == status:
                self.expected_4xx[f"{status} {what} (deliberate)"] += 1
                return
        self._fail(f"{what}: expected HTTP {status}, got {resp.status_code} {resp.text[:200]}")

    def summary(self, seconds: float) -> dict[str, Any]:
        """Counts, failures, expected 4xx and latency quantiles so far (``seconds``: the time driven, for rates)."""
        with self._lock:
            lat = sorted(self.latencies)
            ok = sum(v for k, v in self.counts.items() if k.endswith(" 200"))

            def q(p: float) -> float | None:
                return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None

            return {"clients": self.clients, "requests": sum(self.counts.values()), "ok_200": ok,
                    "ok_per_second": round(ok / max(seconds, 1e-9), 1),
                    "expected_4xx": dict(self.expected_4xx), "failed": self.n_failures,
                    "failures": list(self.failures), "by_kind_status": dict(sorted(self.counts.items())),
                    "latency_ms": {"p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "max": q(1.0)},
                    "versions_answered_from": len(self.versions), "slow_over_1s": len(self.slow),
                    "slow_samples": self.slow[:20]}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()

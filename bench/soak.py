"""Soak test (issue #5): the real service for N minutes under a stream of changes, bad inputs and inference load.

    .venv/bin/python bench/soak.py --minutes 10 --out bench/results/soak.json
    .venv/bin/python bench/soak.py --seconds 35        # the short run CI makes (tests/test_soak.py)
    .venv/bin/python bench/soak.py --minutes 10 --daemon-env MALLOC_ARENA_MAX=2    # diagnosis: other malloc settings

It builds its own small open_clip model (a ViT image tower at 32 px, nothing downloaded), writes a config and starts
``python -m skillhub run`` as a real subprocess on a real inbox, state folder, SQLite registry and HTTP port. Then:

- a **driver** thread takes one step at a time, at random (seeded): new skills; new versions of known skills;
  bursts of drops; corrupt drops (zero bytes, a git-lfs pointer, a truncated file, HTML, wrong tensor shapes, NaN,
  the base itself as a "finetune"); ``config.toml`` edits (disable/enable a skill; invalid edits that must be
  rejected while the daemon keeps running); enable/disable, pin/unpin and remove over HTTP; remove through the CLI;
  re-adding a removed skill's very bytes. Drops arrive written in place, slowly, renamed from a temp name or moved
  in, named by file stem, header metadata or a sidecar. After every step it waits until the served model holds
  exactly the skills (and versions) it should, and every ~20 s it checks the served weights (below);
- **client** threads send predict (multipart and JSON) and embed requests throughout, to skills the driver knows to
  be served, plus deliberate bad requests (unknown skill → 404, unreadable image → 400);
- a **sampler** reads the daemon's VmRSS (and RssAnon, RssFile, threads, open descriptors) from ``/proc/PID`` every
  second.

At the end it checks (and exits 1 if any check fails):

1. no failed request: every answer is 200, or one of the expected 4xx (a 404 for a skill the driver had just taken
   out while the request was in flight, the deliberate 404/400s), counted separately; every prediction's labels
   belong to the skill asked;
2. every READY registry row (SQLite opened read-only) has its mask file, whose sha256 matches; integrity ``ok``;
3. the served weights (``GET /v1/model/weights``) equal an independent float64 stitch, done here from the base file
   and the mask files of the skills in the served manifest: θ₀ + Σ masked τ / max(count, 1), exactly θ₀ where no
   mask is active and outside the image tower;
4. the served skills and versions are what the driver's actions imply; every step was applied in time;
5. every corrupt drop went to ``inbox/.rejected/`` with a reason naming the problem, and never became a skill;
   every invalid config edit was rejected and the daemon kept serving;
6. the daemon's RSS is flat after warm-up (see :data:`RSS_SLOPE_LIMIT`);
7. the daemon logged no crash (``request_crashed``, ``reconcile_crashed``, ``intake_error`` ...), ``skillhub doctor``
   finds the state folder healthy, and SIGTERM stops it with exit code 0.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from skillhub.client import ApiError, Client

TOKEN = "soak-token"
#: A small CLIP: a 2-block ViT image tower (428k parameters, the part that is merged) and a 1-block text tower.
CLIP_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
            "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
SPARSITY = 0.05
SETTLE_TIMEOUT = 90.0  # seconds a step may take to show in the served model (a truncated drop waits >= 5 s)
WEIGHTS_EVERY = 20.0  # seconds between checks of the served weights during the run
WARMUP_FRACTION = 0.2
DRAIN_SECONDS = 3.0  # clients keep asking for a skill this long after the driver starts taking it out
#: RSS pass rule: the least-squares slope of VmRSS after warm-up stays under RSS_SLOPE_LIMIT MiB/min. Anything this
#: run leaks per version (~35 a minute; the merged tower alone is 1.7 MiB) or per request (~100 a second; a few hundred
#: bytes each) exceeds that many times over. The daemon's RSS moves by ±10-15 MiB from one minute to the next
#: (allocator arenas of its thread pools), so a slope needs RSS_MIN_WINDOW minutes after warm-up to mean anything:
#: shorter runs report the figures without judging them.
RSS_SLOPE_LIMIT = 1.0
RSS_MIN_WINDOW = 3.0
MIN_SKILLS, MAX_SKILLS = 3, 9
#: Error events the daemon logs for expected faults (rejected drops and edits); any other error is a failure.
EXPECTED_ERRORS = {"config_rejected", "skill_failed"}
#: What the reason file of each kind of corrupt drop must mention (one of).
REASONS = {"empty": ("empty", "0 bytes"), "lfs": ("git-lfs",), "truncated": ("truncated",), "html": ("HTML",),
           "wrong_shape": ("shape mismatch",), "nan": ("NaN",), "zero": ("task vector is zero",)}
#: Invalid config edits: (name, transform of the valid text); each must be logged as config_rejected.
INVALID_EDITS = (
    ("toml syntax error", lambda t: t.replace("[skills]", "[skills")),
    ("unknown key", lambda t: t.replace("[watch]\n", "[watch]\nstable_secs = 1\n")),
    ("unknown strategy", lambda t: t.replace('strategy = "dataless"', 'strategy = "no-such-strategy"')),
    ("restart-only change", lambda t: t.replace('policy = "average"', 'policy = "sum"')),
    ("bad value", lambda t: t.replace("keep_versions = 5", "keep_versions = 0")),
)


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the model and the drops ---------------------------------------------------------------------------------------


def build_base(root: Path) -> dict[str, torch.Tensor]:
    """The base CLIP (seeded), its config file ``clip.json`` and weights ``base.safetensors`` in ``root``."""
    from skillhub.families.open_clip import create_clip

    (root / "clip.json").write_text(json.dumps(CLIP_CFG))
    torch.manual_seed(0)
    sd = {k: v.detach().clone().contiguous() for k, v in create_clip(str(root / "clip.json")).state_dict().items()}
    (root / "base.safetensors").write_bytes(save_safetensors(sd))
    return sd


def finetune(base: dict[str, torch.Tensor], seed: int, *, classes: int, tower_only: bool,
             corrupt: str | None = None) -> dict[str, torch.Tensor]:
    """A synthetic finetune: θ₀ + small dense noise on the image tower + a larger change on a random 2% of it (the
    "skill"), and a head ``skillhub.head.weight``. ``corrupt`` makes it unusable: ``wrong_shape``, ``nan``, ``zero``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        if not k.startswith("visual."):
            if not tower_only:
                out[k] = v
            continue
        new = v
        if v.is_floating_point() and corrupt != "zero":
            skill_part = (torch.rand(v.shape, generator=g) < 0.02) * torch.randn(v.shape, generator=g) * 0.05
            new = v + 0.002 * torch.randn(v.shape, generator=g) + skill_part
        out[k.removeprefix("visual.") if tower_only else k] = new.contiguous()
    tower = sorted(k for k in out if (tower_only or k.startswith("visual.")) and out[k].ndim == 2)
    if corrupt == "wrong_shape":
        key = tower[0]
        out[key] = torch.randn(out[key].shape[0] + 3, out[key].shape[1], generator=g)
    elif corrupt == "nan":
        out[tower[-1]] = out[tower[-1]].clone()
        out[tower[-1]].view(-1)[7] = float("nan")
    out["skillhub.head.weight"] = torch.nn.functional.normalize(torch.randn(classes, CLIP_CFG["embed_dim"],
                                                                            generator=g), dim=-1)
    if seed % 3 == 0:
        out["skillhub.head.bias"] = 0.1 * torch.randn(classes, generator=g)
    return out


def class_names(skill: str, n: int) -> list[str]:
    return [f"{skill}/c{i}" for i in range(n)]


def png(seed: int, size: int = 24) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_text(port: int, disabled: list[str]) -> str:
    return f"""# written by bench/soak.py
device = "cpu"
[base]
family = "open_clip"
model = "clip.json"
weights = "base.safetensors"
[watch]
dir = "inbox"
stable_seconds = 0.3
rescan_seconds = 5
[state]
dir = "state"
keep_versions = 5
[localize]
strategy = "dataless"
[localize.params]
sparsity = {SPARSITY}
[stitch]
policy = "average"
[skills]
disabled = {json.dumps(sorted(disabled))}
[serve]
port = {port}
[plugins]
dirs = []
"""


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- the service and what it shows ----------------------------------------------------------------------------------


class Service:
    """``python -m skillhub run`` as a child process; its stderr (JSON log lines) goes to ``daemon.log``."""

    def __init__(self, root: Path, port: int, extra_env: dict[str, str] | None = None) -> None:
        self.root, self.port, self.extra_env = root, port, dict(extra_env or {})
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_pos = 0
        self._events: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._error_samples: list[str] = []
        self._plain: list[str] = []  # log lines that are not JSON
        self._log_lock = threading.Lock()

    @staticmethod
    def env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")}
        env["SKILLHUB_TOKEN"] = TOKEN
        return env

    def start(self, timeout: float = 120.0) -> None:
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([sys.executable, "-m", "skillhub", "run", "--config",
                                          str(self.root / "config.toml")], cwd=self.root,
                                         env=self.env() | self.extra_env, stdout=subprocess.DEVNULL, stderr=logf)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive("starting")
            try:
                if httpx.get(self.url + "/readyz", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5,
                             trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the service did not become ready:\n" + self.tail())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self, what: str) -> None:
        if not self.alive():
            raise RuntimeError(f"the daemon exited ({self.proc.returncode if self.proc else None}) while {what}:\n"
                               + self.tail())

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def scan_log(self) -> None:
        """Count log events (all) and error-level events (by name) written since the last scan."""
        with self._log_lock:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(self._log_pos)
                    data = f.read()
            except OSError:
                return
            end = data.rfind(b"\n") + 1
            self._log_pos += end
            for line in data[:end].splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # not structured: an error only if it looks like one
                    text = line.decode(errors="replace")
                    self._plain.append(text[:300])
                    if any(w in text for w in ("Traceback", "Error", "ERROR", "CRITICAL", "Exception")):
                        self._errors["<plain-text error>"] += 1
                        if len(self._error_samples) < 20:
                            self._error_samples.append(text[:500])
                    continue
                event = str(rec.get("event"))
                self._events[event] += 1
                if rec.get("level") in ("error", "critical", "exception"):
                    self._errors[event] += 1
                    if event not in EXPECTED_ERRORS and len(self._error_samples) < 20:
                        self._error_samples.append(line.decode(errors="replace")[:500])

    def count(self, event: str) -> int:
        self.scan_log()
        with self._log_lock:
            return self._events[event]

    def status(self) -> dict[str, float] | None:
        """VmRSS, RssAnon, RssFile (MiB), threads and open file descriptors of the daemon, from ``/proc``."""
        want = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "Threads:": "threads"}
        out: dict[str, float] = {}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    key = line.split(maxsplit=1)[0] if line.strip() else ""
                    if key in want:
                        value = int(line.split()[1])
                        out[want[key]] = value if key == "Threads:" else value / 1024
            out["fds"] = len(os.listdir(f"/proc/{self.pid}/fd"))
        except (OSError, ValueError, IndexError):
            return None
        return out if "rss" in out else None

    def cpu_seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0


class RssSampler(threading.Thread):
    """The daemon's memory, threads and descriptors (:meth:`Service.status`) every ``every`` seconds, with the
    machine's 1-minute load average."""

    def __init__(self, service: Service, every: float = 1.0) -> None:
        super().__init__(name="soak-rss", daemon=True)
        self.service, self.every = service, every
        self.samples: list[dict[str, float]] = []  # t (seconds since start), rss, anon, file, threads, fds, load
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop_event.is_set():
            st = self.service.status()
            if st is not None:
                self.samples.append(st | {"t": time.monotonic() - self.t0, "load": os.getloadavg()[0]})
            self.stop_event.wait(self.every)


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    mt, mv = sum(t for t, _ in points) / n, sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / var * 60 if var else 0.0


def rss_summary(samples: list[dict[str, float]], warmup_until: float, end: float) -> dict[str, Any]:
    """Least-squares slope (MiB/min) of VmRSS after warm-up, min/max, and the pass rule of :data:`RSS_SLOPE_LIMIT`;
    the same slope for RssAnon and RssFile, and threads and descriptors, to tell what moves."""
    after = [s for s in samples if warmup_until <= s["t"] <= end]
    out: dict[str, Any] = {"samples": len(samples), "warmup_seconds": round(warmup_until, 1),
                           "start_mib": round(samples[0]["rss"], 1) if samples else None,
                           "peak_mib": round(max(s["rss"] for s in samples), 1) if samples else None}
    if len(after) < 5:
        return out | {"ok": False, "judged": False, "why": "too few samples after warm-up"}
    slope = slope_per_min([(s["t"], s["rss"]) for s in after])
    window_min = (after[-1]["t"] - after[0]["t"]) / 60
    judged = window_min >= RSS_MIN_WINDOW
    return out | {
        "judged": judged, "ok": slope <= RSS_SLOPE_LIMIT if judged else True,
        "slope_mib_per_min": round(slope, 3), "window_minutes": round(window_min, 2),
        "min_mib": round(min(s["rss"] for s in after), 1), "max_mib": round(max(s["rss"] for s in after), 1),
        "first_mib": round(after[0]["rss"], 1), "last_mib": round(after[-1]["rss"], 1),
        "anon_slope_mib_per_min": round(slope_per_min([(s["t"], s.get("anon", 0)) for s in after]), 3),
        "file_slope_mib_per_min": round(slope_per_min([(s["t"], s.get("file", 0)) for s in after]), 3),
        "threads_after_warmup": [min(s.get("threads", 0) for s in after), max(s.get("threads", 0) for s in after)],
        "fds_after_warmup": [min(s.get("fds", 0) for s in after), max(s.get("fds", 0) for s in after)],
        "mean_load1": round(sum(s["load"] for s in samples) / len(samples), 2)}


# --- client traffic --------------------------------------------------------------------------------------------------


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
        with self._lock:
            for n in names:
                if n not in self._allowed:
                    self._allowed[n] = self._epoch[n]

    def revoke(self, names: set[str]) -> None:
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
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60,
                          trust_env=False) as http:
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


# --- the independent reference stitch -------------------------------------------------------------------------------


def parse_safetensors_metadata(data: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8:8 + n]).get("__metadata__") or {})


def reference_stitch(base: dict[str, torch.Tensor], base_sha: str, masks: list[Path]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """θ₀ + Σ masked τ / max(count, 1) in float64 from mask files read here (not with skillhub's own reader), and
    the per-entry count. Checks each file's format, base fingerprint, shapes and sorted, in-range indices."""
    total: dict[str, torch.Tensor] = {}
    count: dict[str, torch.Tensor] = {}
    for path in masks:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("skillhub.format") != "sparse-delta/1" or meta.get("skillhub.base") != base_sha:
                raise ValueError(f"{path.name}: format {meta.get('skillhub.format')!r} / base "
                                 f"{meta.get('skillhub.base', '')[:12]} is not sparse-delta/1 of this base")
            shapes = json.loads(meta["skillhub.shapes"])
            for key, shape in shapes.items():
                if list(base[key].shape) != list(shape):
                    raise ValueError(f"{path.name}: shape of {key} is {shape}, the base's {list(base[key].shape)}")
            for name in f.keys():
                if not name.endswith("::indices"):
                    continue
                key = name[: -len("::indices")]
                idx = f.get_tensor(name).long()
                val = f.get_tensor(key + "::values").to(torch.float64)
                if idx.numel() and (bool((idx[1:] <= idx[:-1]).any()) or int(idx[0]) < 0
                                    or int(idx[-1]) >= base[key].numel() or val.shape != idx.shape):
                    raise ValueError(f"{path.name}: indices of {key} not strictly increasing and in range")
                numel = base[key].numel()
                total.setdefault(key, torch.zeros(numel, dtype=torch.float64)).index_add_(0, idx, val)
                count.setdefault(key, torch.zeros(numel, dtype=torch.int64)).index_add_(
                    0, idx, torch.ones_like(idx))
    merged = {}
    for key, t in base.items():
        if key in total:
            flat = t.reshape(-1).to(torch.float64) + total[key] / count[key].clamp(min=1).to(torch.float64)
            merged[key] = flat.to(t.dtype).reshape(t.shape)
        else:
            merged[key] = t
    return merged, count


def check_weights(client: httpx.Client, base: dict[str, torch.Tensor], base_sha: str, masks_dir: Path
                  ) -> dict[str, Any]:
    """Download the served version; compare it with the reference stitch of its manifest's skills' mask files."""
    resp = client.get("/v1/model/weights")
    resp.raise_for_status()
    data = resp.content
    manifest = json.loads(parse_safetensors_metadata(data)["skillhub.manifest"])
    served = load_safetensors(data)
    version = int(resp.headers["x-skillhub-version"])
    masks = [masks_dir / f"{s['mask']}.mask.safetensors" for s in manifest["skills"].values()]
    missing = [p.name for p in masks if not p.is_file()]
    out: dict[str, Any] = {"version": version, "skills": len(masks)}
    if missing:
        return out | {"ok": False, "why": f"mask files of served skills missing: {missing[:3]}"}
    want, count = reference_stitch(base, base_sha, masks)
    problems = []
    if set(served) != set(want):
        problems.append(f"keys differ: {sorted(set(served) ^ set(want))[:3]}")
    max_diff, differing, entries = 0.0, 0, 0
    for key in sorted(set(served) & set(want)):
        got, ref = served[key], want[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            problems.append(f"{key}: {got.dtype}{list(got.shape)} vs {ref.dtype}{list(ref.shape)}")
            continue
        entries += got.numel()
        if got.is_floating_point():
            diff = (got.double() - ref.double()).abs()
            max_diff = max(max_diff, float(diff.max()) if diff.numel() else 0.0)
            differing += int((got != ref).sum())
        elif not torch.equal(got, ref):
            problems.append(f"{key}: integer tensor differs")
        c = count.get(key)
        idle = (c == 0).reshape(got.shape) if c is not None else torch.ones(got.shape, dtype=torch.bool)
        if not torch.equal(got[idle], base[key][idle]):  # no active mask: exactly θ₀, bit for bit
            problems.append(f"{key}: entries outside every mask are not exactly θ₀")
    if max_diff > 1e-6:
        problems.append(f"max |served - reference| = {max_diff:.3g} > 1e-6")
    covered = sum(int((c > 0).sum()) for c in count.values())
    return out | {"ok": not problems, "max_abs_diff": max_diff, "entries_not_bit_identical": differing,
                  "entries": entries, "covered": covered, "problems": problems[:5]}


def check_registry(state: Path, corrupt_shas: set[str]) -> dict[str, Any]:
    """Every READY row's mask file present and matching its sha256; SQLite integrity; no corrupt drop READY."""
    conn = sqlite3.connect(f"file:{state / 'registry.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        rows = conn.execute("SELECT id, skill, version, status, mask_sha, source_sha FROM versions").fetchall()
    finally:
        conn.close()
    problems = [f"integrity_check: {x}" for x in integrity if x != "ok"]
    ready = [r for r in rows if r[3] == "READY"]
    for rid, skill, version, _, mask_sha, source_sha in ready:
        path = state / "masks" / f"{mask_sha}.mask.safetensors"
        if not mask_sha or not path.is_file():
            problems.append(f"{skill} v{version} (id {rid}) is READY but {path.name} is missing")
        elif sha256_path(path) != mask_sha:
            problems.append(f"{skill} v{version} (id {rid}): {path.name} does not match its sha256")
        if source_sha in corrupt_shas:
            problems.append(f"{skill} v{version} (id {rid}) is READY but was made from a corrupt drop")
    by_status = Counter(r[3] for r in rows)
    return {"ok": not problems, "rows": len(rows), "by_status": dict(by_status), "ready_masks_verified": len(ready),
            "problems": problems[:10]}


# --- the driver ------------------------------------------------------------------------------------------------------


@dataclass
class Skill:
    name: str
    source: str | None = None  # sha256 of the newest good drop (None: removed)
    blob: Path | None = None  # that drop's bytes, kept for re-adding after a remove
    api_enabled: bool = True
    cfg_disabled: bool = False
    pinned_mask: str | None = None  # while pinned to an older version: that version's mask sha

    @property
    def served(self) -> bool:
        return self.source is not None and self.api_enabled and not self.cfg_disabled


@dataclass
class CorruptDrop:
    kind: str
    name: str
    t: float
    sha: str
    resolved: float | None = None
    reason: str = ""


@dataclass
class Driver:
    root: Path
    service: Service
    traffic: Traffic
    base: dict[str, torch.Tensor]
    port: int
    seed: int
    skills: dict[str, Skill] = field(default_factory=dict)
    corrupt: list[CorruptDrop] = field(default_factory=list)
    actions: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: list[str] = field(default_factory=list)
    weights_checks: list[dict[str, Any]] = field(default_factory=list)
    invalid_edits: Counter[str] = field(default_factory=Counter)
    cli_runs: list[dict[str, Any]] = field(default_factory=list)
    drops = 0
    counter = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.inbox = self.root / "inbox"
        self.blobs = self.root / "blobs"
        self.outside = self.root / "outside"
        for d in (self.inbox, self.blobs, self.outside):
            d.mkdir(exist_ok=True)
        self.api = Client(self.service.url, token=TOKEN, timeout=60)
        self.http = httpx.Client(base_url=self.service.url, headers={"Authorization": f"Bearer {TOKEN}"},
                                 timeout=60, trust_env=False)
        self.base_sha = sha256_path(self.root / "base.safetensors")
        self.pending: dict[str, str] = {}  # valid drops in the inbox: file name -> skill
        self.timeline: list[tuple[float, str]] = []  # (seconds since the clients started, step)
        kinds = [("new_version", None), ("burst", None), ("config_toggle", None), ("config_invalid", None),
                 ("api_toggle", None), ("remove_http", None), ("remove_cli", None), ("readd", None), ("pin", None),
                 *(("corrupt", k) for k in sorted(REASONS))]
        self.rng.shuffle(kinds)
        self.agenda: list[tuple[str, str | None]] = [("new_skill", None)] * (MIN_SKILLS + 2) + kinds

    # --- expectations ---

    def expected(self) -> dict[str, tuple[str, str]]:
        return {s.name: ("mask", s.pinned_mask) if s.pinned_mask else ("source", s.source or "")
                for s in self.skills.values() if s.served}

    def served_names(self) -> set[str]:
        return set(self.expected())

    def diff(self, served: dict[str, Any]) -> str | None:
        want = self.expected()
        if set(served) != set(want):
            return f"served {sorted(served)}, expected {sorted(want)}"
        for name, (field_, value) in want.items():
            if served[name].get(field_) != value:
                return f"{name}: served {field_} {str(served[name].get(field_))[:12]}, expected {value[:12]}"
        return None

    def settle(self, kind: str, t0: float, *, record: bool = True) -> bool:
        """Wait until the served model is what the expectations say; record how long the step took."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        why = "?"
        while time.monotonic() < deadline:
            self.service.check_alive(f"waiting for {kind}")
            try:
                why = self.diff(self.api.model().get("skills") or {}) or ""
            except ApiError as e:
                why = str(e)
            if not why:
                if record:
                    self.actions[kind].append(time.monotonic() - t0)
                self.traffic.allow(self.served_names())
                return True
            time.sleep(0.05)
        self.failures.append(f"{kind}: not applied within {SETTLE_TIMEOUT:.0f} s: {why}")
        return False

    def note(self, kind: str) -> None:
        self.timeline.append((round(time.monotonic() - self.traffic.t0, 2), kind))

    def change(self, kind: str, mutate: Any, act: Any) -> bool:
        """One step: update the expectations, revoke skills about to leave before acting, act, wait."""
        before = self.served_names()
        mutate()
        self.traffic.revoke(before - self.served_names())
        t0 = time.monotonic()
        act()
        return self.settle(kind, t0)

    # --- files ---

    def busy(self, name: str) -> bool:
        """A drop for skill ``name`` (or named like it) is still in the inbox: removing the skill now would race it."""
        self.pending = {f: n for f, n in self.pending.items() if (self.inbox / f).exists()}
        return (self.inbox / f"{name}.safetensors").exists() or name in self.pending.values() or any(
            c.name == f"{name}.safetensors" and c.resolved is None for c in self.corrupt)

    def put(self, data: bytes, filename: str, mode: str, sidecar: str | None = None, *, skill: str = "") -> None:
        """Drop bytes into the inbox as ``filename``: in place, slowly, renamed from a temp name, or moved in."""
        self.drops += 1
        self.pending[filename] = skill
        dest = self.inbox / filename
        if sidecar is not None:  # before the checkpoint: the intake reads it when the checkpoint is ready
            write_atomic(self.inbox / (filename.removesuffix(".safetensors") + ".toml"), sidecar.encode())
        if mode == "rename":
            tmp = self.inbox / f".{filename}.part"
            tmp.write_bytes(data)
            os.rename(tmp, dest)
        elif mode == "slow":  # 40 %, a pause, the rest (FAULTS A1)
            cut = int(len(data) * 0.4)
            with open(dest, "wb") as f:
                f.write(data[:cut])
                f.flush()
                time.sleep(0.6)
                f.write(data[cut:])
        elif mode == "move":
            src = self.outside / filename
            src.write_bytes(data)
            os.rename(src, dest)
        else:
            dest.write_bytes(data)

    def valid_drop(self, name: str) -> str:
        """Drop a new finetune for skill ``name``, named by file stem, header metadata or a sidecar; keep its bytes
        (and sidecar classes) for a re-add; return its sha256."""
        self.counter += 1
        classes = self.rng.randint(2, 5)
        tensors = finetune(self.base, self.seed * 100_000 + self.counter, classes=classes,
                           tower_only=self.rng.random() < 0.3)
        naming = self.rng.choice(("stem", "stem", "meta", "sidecar"))
        if naming == "stem" and self.busy(name):
            naming = "meta"
        meta, sidecar = {}, None
        if naming == "sidecar":
            sidecar = f'skill = "{name}"\nclasses = {json.dumps(class_names(name, classes))}\n'
        else:
            meta["skillhub.classes"] = json.dumps(class_names(name, classes))
            if naming == "meta":
                meta["skillhub.skill"] = name
        data = save_safetensors(tensors, metadata=meta)
        filename = f"{name}.safetensors" if naming == "stem" else f"upload-{self.drops}-{name}.safetensors"
        self.put(data, filename, self.rng.choice(("rename", "rename", "direct", "slow", "move")), sidecar, skill=name)
        (self.blobs / f"{name}.safetensors").write_bytes(data)
        (self.blobs / f"{name}.sidecar.toml").unlink(missing_ok=True)
        if sidecar is not None:
            (self.blobs / f"{name}.sidecar.toml").write_text(sidecar)
        return sha256_bytes(data)

    # --- actions ---

    def new_name(self) -> str:
        self.counter += 1
        return f"skill{self.counter:04d}"

    def present(self) -> list[Skill]:
        return [s for s in self.skills.values() if s.source is not None]

    def act_new_skill(self) -> bool:
        name = self.new_name()
        return self._drop_and_settle("new skill", [self.skills.setdefault(name, Skill(name))])

    def _drop_and_settle(self, kind: str, skills: list[Skill]) -> bool:
        t0 = time.monotonic()
        for s in skills:
            s.source = self.valid_drop(s.name)
            s.blob = self.blobs / f"{s.name}.safetensors"
            s.pinned_mask = None
        return self.settle(kind, t0)

    def act_new_version(self) -> bool:
        return self._drop_and_settle("new version", [self.rng.choice(self.present())])

    def act_burst(self) -> bool:
        present = self.present()
        olds = self.rng.sample(present, min(len(present), self.rng.randint(1, 2)))
        news = [self.skills.setdefault(n, Skill(n)) for n in (self.new_name() for _ in range(
            1 if len(present) < MAX_SKILLS else 0))]
        return self._drop_and_settle("burst of drops", olds + news)

    def act_corrupt(self, kind: str | None = None) -> bool:
        """Drop an unusable file, named after a served skill or not; it must be rejected and change nothing."""
        kind = kind or self.rng.choice(sorted(REASONS))
        targets = [s.name for s in self.present() if not self.busy(s.name)]
        name = self.rng.choice(targets) if targets and self.rng.random() < 0.5 else f"junk{self.drops}"
        self.counter += 1
        if kind == "empty":
            data = b""
        elif kind == "lfs":
            data = (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + os.urandom(32).hex().encode()
                    + b"\nsize 4919504\n")
        elif kind == "html":
            data = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>nope</body></html>\n"
        else:
            ft = finetune(self.base, self.seed * 100_000 + self.counter, classes=3,
                          tower_only=self.rng.random() < 0.5, corrupt=kind if kind != "truncated" else None)
            data = save_safetensors(ft, metadata={"skillhub.classes": json.dumps(class_names(name, 3))})
            if kind == "truncated":
                data = data[: int(len(data) * 0.6)]
        filename = f"{name}.safetensors"
        self.corrupt.append(CorruptDrop(kind, filename, time.time(), sha256_bytes(data)))
        self.put(data, filename, self.rng.choice(("rename", "direct", "move")), skill=name)
        return self.settle("corrupt drop", time.monotonic(), record=False)  # nothing served changes

    def write_config(self, text: str | None = None) -> None:
        disabled = [s.name for s in self.skills.values() if s.cfg_disabled]
        write_atomic(self.root / "config.toml", (text or config_text(self.port, disabled)).encode())

    def _toggle_target(self, off: list[Skill], on: list[Skill]) -> Skill:
        """A skill to switch: back on (preferred while few are served) or off (while enough are served)."""
        if off and (not on or self.rng.random() < 0.6 or len(self.served_names()) <= MIN_SKILLS):
            return self.rng.choice(off)
        return self.rng.choice(on)

    def act_config_toggle(self) -> bool:
        present = self.present()
        skill = self._toggle_target([s for s in present if s.cfg_disabled],
                                    [s for s in present if s.served] if len(self.served_names()) > MIN_SKILLS else [])

        def mutate() -> None:
            skill.cfg_disabled = not skill.cfg_disabled

        kind = "config: disable" if not skill.cfg_disabled else "config: enable"
        return self.change(kind, mutate, self.write_config)

    def act_config_invalid(self) -> bool:
        name, edit = INVALID_EDITS[sum(self.invalid_edits.values()) % len(INVALID_EDITS)]
        valid = config_text(self.port, [s.name for s in self.skills.values() if s.cfg_disabled])
        bad = edit(valid)
        assert bad != valid, name
        rejected, applied = self.service.count("config_rejected"), self.service.count("config_applied")
        t0 = time.monotonic()
        self.write_config(bad)
        deadline = time.monotonic() + 15
        while self.service.count("config_rejected") == rejected and time.monotonic() < deadline:
            self.service.check_alive("an invalid config edit")
            time.sleep(0.1)
        if self.service.count("config_rejected") == rejected:
            self.failures.append(f"invalid config edit ({name}) was not rejected within 15 s")
        elif self.service.count("config_applied") != applied:
            self.failures.append(f"invalid config edit ({name}) was applied")
        self.invalid_edits[name] += 1
        ok = self.settle("config: invalid edit", t0, record=False)  # still serving what it served
        self.write_config()  # put the valid config back
        deadline = time.monotonic() + 15
        while self.service.count("config_applied") == applied and time.monotonic() < deadline:
            time.sleep(0.1)
        return ok and self.settle("config: invalid edit", t0)

    def act_api_toggle(self) -> bool:
        present = self.present()
        skill = self._toggle_target([s for s in present if not s.api_enabled],
                                    [s for s in present if s.served] if len(self.served_names()) > MIN_SKILLS else [])
        enable = not skill.api_enabled

        def mutate() -> None:
            skill.api_enabled = enable

        def act() -> None:
            (self.api.enable if enable else self.api.disable)(skill.name)

        return self.change("http: enable" if enable else "http: disable", mutate, act)

    def removable(self) -> list[Skill]:
        return [s for s in self.present() if not self.busy(s.name)]

    def _removed(self, skill: Skill) -> None:
        skill.source, skill.api_enabled, skill.pinned_mask = None, True, None  # the registry forgets its settings

    def act_remove_http(self) -> bool:
        skill = self.rng.choice(self.removable())
        return self.change("http: remove", lambda: self._removed(skill), lambda: self.api.remove(skill.name))

    def act_remove_cli(self) -> bool:
        skill = self.rng.choice(self.removable())

        def act() -> None:
            t0 = time.monotonic()
            p = subprocess.run([sys.executable, "-m", "skillhub", "skills", "remove", skill.name, "--config",
                                str(self.root / "config.toml")], cwd=self.root, env=Service.env(),
                               capture_output=True, text=True, timeout=120)
            self.cli_runs.append({"rc": p.returncode, "seconds": round(time.monotonic() - t0, 2),
                                  "out": (p.stdout + p.stderr).strip()[-300:]})
            if p.returncode != 0:
                self.failures.append(f"skillhub skills remove {skill.name}: exit {p.returncode}: {p.stderr[-300:]}")

        return self.change("cli: remove", lambda: self._removed(skill), act)

    def act_readd(self) -> bool:
        """Drop a removed skill's last bytes again (the same sha256 as before the remove)."""
        skill = self.rng.choice(self.gone())
        assert skill.blob is not None
        t0 = time.monotonic()
        data = skill.blob.read_bytes()
        side = self.blobs / f"{skill.name}.sidecar.toml"
        if side.exists():  # it was named (and its classes given) by a sidecar: send that again
            self.put(data, f"readd-{self.drops}-{skill.name}.safetensors", "rename", side.read_text(),
                     skill=skill.name)
        else:
            self.put(data, f"readd-{self.drops}-{skill.name}.safetensors" if self._meta_named(data)
                     else f"{skill.name}.safetensors", self.rng.choice(("rename", "direct")), skill=skill.name)
        skill.source = sha256_bytes(data)
        return self.settle("re-add removed skill", t0)

    @staticmethod
    def _meta_named(data: bytes) -> bool:
        return "skillhub.skill" in parse_safetensors_metadata(data)

    def act_pin(self) -> bool:
        views = {v["name"]: v for v in self.api.skills()}
        cands = []
        for s in self.present():
            ready = [v for v in views.get(s.name, {}).get("versions", []) if v["status"] == "READY"]
            if len(ready) >= 2 and s.served:
                cands.append((s, ready))
        if not cands:
            return self.act_new_version()
        skill, ready = self.rng.choice(cands)
        old = self.rng.choice(ready[:-1])

        def pin() -> None:
            skill.pinned_mask = old["mask"]

        def unpin() -> None:
            skill.pinned_mask = None

        return (self.change("http: pin older version", pin, lambda: self.api.pin(skill.name, old["version"]))
                and self.change("http: unpin", unpin, lambda: self.api.pin(skill.name, None)))

    def act_check_weights(self) -> bool:
        t0 = time.monotonic()
        res = check_weights(self.http, self.base, self.base_sha, self.root / "state" / "masks")
        res["at_seconds"] = round(time.monotonic() - self.start_time, 1)
        self.weights_checks.append(res)
        self.actions["check served weights"].append(time.monotonic() - t0)
        if not res["ok"]:
            self.failures.append(f"served weights differ from the reference stitch: {res}")
        return bool(res["ok"])

    def resolve_corrupt(self) -> None:
        rejected = self.inbox / ".rejected"
        for c in self.corrupt:
            if c.resolved is not None or (self.inbox / c.name).exists():
                continue
            note = rejected / f"{c.name}.reason.txt"
            try:
                if note.stat().st_mtime >= c.t - 1:
                    c.reason = note.read_text(errors="replace").splitlines()[0]
                    c.resolved = time.time()
            except (OSError, IndexError):
                pass

    def gone(self) -> list[Skill]:
        return [s for s in self.skills.values() if s.source is None and s.blob is not None and not self.busy(s.name)]

    def weights(self) -> dict[str, float]:
        """The steps possible now, with their odds."""
        present, served, removable = self.present(), len(self.served_names()), len(self.removable())
        switchable = served > MIN_SKILLS
        return {
            "new_skill": 3.0 if len(present) < MAX_SKILLS else 0.0,
            "new_version": 3.0 if present else 0.0,
            "burst": 0.7 if present else 0.0,
            "corrupt": 2.5,
            "config_toggle": 1.2 if switchable or any(s.cfg_disabled for s in present) else 0.0,
            "config_invalid": 0.6,
            "api_toggle": 1.2 if switchable or any(not s.api_enabled for s in present) else 0.0,
            "remove_http": 0.9 if removable > MIN_SKILLS else 0.0,
            "remove_cli": 0.4 if removable > MIN_SKILLS else 0.0,
            "readd": 1.0 if self.gone() and len(present) < MAX_SKILLS else 0.0,
            "pin": 0.6 if present else 0.0,
        }

    def step(self) -> bool:
        """One step: the first possible one on the agenda (every kind once, so short runs cover them all), else a
        random one."""
        odds = self.weights()
        for i, (action, arg) in enumerate(self.agenda):
            if odds[action] > 0:
                del self.agenda[i]
                break
        else:
            possible = {a: w for a, w in odds.items() if w > 0}
            action, arg = self.rng.choices(list(possible), list(possible.values()))[0], None
        self.note(action + (f" {arg}" if arg else ""))
        return bool(getattr(self, f"act_{action}")(*([arg] if arg else [])))

    def run(self, seconds: float) -> None:
        self.start_time = time.monotonic()
        deadline = self.start_time + seconds
        next_weights = self.start_time + WEIGHTS_EVERY
        next_progress = self.start_time + 30
        self.write_config()
        while time.monotonic() < deadline:
            try:
                ok = self.step()
                self.resolve_corrupt()
                if ok and time.monotonic() >= next_weights:
                    ok = self.act_check_weights()
                    next_weights = time.monotonic() + WEIGHTS_EVERY
            except Exception as e:  # noqa: BLE001 - a failed API call or check ends the driving, and is reported
                self.failures.append(f"driver: {type(e).__name__}: {e}")
                ok = False
            if not ok:
                log("a step failed; stopping the driver: " + (self.failures[-1] if self.failures else "?"))
                return
            now = time.monotonic()
            if now >= next_progress:
                next_progress = now + 30
                t = self.traffic.summary(now - self.start_time)
                log(f"{now - self.start_time:5.0f} s: {sum(len(v) for v in self.actions.values())} steps, "
                    f"{len(self.present())} skills, {t['ok_200']} requests ok, {t['failed']} failed, "
                    f"RSS {(self.service.status() or {}).get('rss', 0):.0f} MiB")
            time.sleep(self.rng.uniform(0.1, 0.8))

    def finish(self) -> None:
        """Let every corrupt drop be rejected (a truncated one waits >= 5 s), then check the served set once more."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.resolve_corrupt()
            if all(c.resolved is not None for c in self.corrupt):
                break
            time.sleep(0.2)
        self.settle("final state", time.monotonic())

    def close(self) -> None:
        self.api.close()
        self.http.close()


# --- main ------------------------------------------------------------------------------------------------------------


def run_doctor(root: Path) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "skillhub", "doctor", "--config", str(root / "config.toml")],
                       cwd=root, env=Service.env(), capture_output=True, text=True, timeout=300)
    return {"ok": p.returncode == 0, "rc": p.returncode, "output": (p.stdout + p.stderr).strip()[-1500:]}


def soak(root: Path, seconds: float, clients: int, think: float, seed: int,
         daemon_env: dict[str, str] | None = None) -> dict[str, Any]:
    t_start = time.time()
    log(f"building the model in {root}")
    base = build_base(root)
    port = free_port()
    (root / "inbox").mkdir()
    (root / "config.toml").write_text(config_text(port, []))
    service = Service(root, port, daemon_env)
    traffic = Traffic(service.url, clients, think, seed)
    driver: Driver | None = None
    sampler: RssSampler | None = None
    checks: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    try:
        service.start()
        sampler = RssSampler(service)
        sampler.start()
        log(f"service ready (pid {service.pid}, port {port}); driving for {seconds:.0f} s with {clients} clients")
        driver = Driver(root, service, traffic, base, port, seed)
        traffic.start()
        t0 = time.monotonic()
        cpu0 = service.cpu_seconds()
        driver.run(seconds)
        driver.finish()
        driving = time.monotonic() - t0
        cpu = service.cpu_seconds() - cpu0
        traffic.stop()
        rss_end = sampler.samples[-1]["t"] if sampler.samples else 0.0
        sampler.stop_event.set()
        rss_start = sampler.samples[0]["t"] if sampler.samples else 0.0
        final_weights = check_weights(driver.http, base, driver.base_sha, root / "state" / "masks")
        final_weights["at_seconds"] = round(time.monotonic() - t0, 1)
        driver.weights_checks.append(final_weights)
        corrupt_shas = {c.sha for c in driver.corrupt}
        registry = check_registry(root / "state", corrupt_shas)
        final_model = driver.api.model()
        doctor = run_doctor(root)
        service.scan_log()
        alive = service.alive()
        rc = service.stop()
        service.scan_log()

        tr = traffic.summary(driving)
        rss = rss_summary(sampler.samples, rss_start + WARMUP_FRACTION * (rss_end - rss_start), rss_end)
        bad_corrupt = [f"{c.kind} {c.name}: {c.reason or 'not rejected'}" for c in driver.corrupt
                       if c.resolved is None or not any(w.lower() in c.reason.lower() for w in REASONS[c.kind])]
        steps = {k: v for k, v in driver.actions.items()}
        for c in driver.corrupt:
            if c.resolved is not None:
                steps.setdefault(f"corrupt drop ({c.kind}): rejected", []).append(c.resolved - c.t)
        unexpected_errors = {k: v for k, v in service._errors.items() if k not in EXPECTED_ERRORS}
        invalid = sum(driver.invalid_edits.values())
        checks = [
            {"check": "no failed requests (expected 4xx counted apart)", "ok": tr["failed"] == 0 and tr["ok_200"] > 0,
             "detail": f"{tr['ok_200']} ok, {sum(tr['expected_4xx'].values())} expected 4xx, {tr['failed']} failed"},
            {"check": "every READY mask file present and matching its sha256", "ok": registry["ok"],
             "detail": f"{registry['ready_masks_verified']} READY rows verified; {registry['problems'][:2]}"},
            {"check": "served weights = independent float64 stitch", "ok": all(w["ok"] for w in driver.weights_checks),
             "detail": f"{len(driver.weights_checks)} checks, max |diff| "
                       f"{max((w.get('max_abs_diff', 0) for w in driver.weights_checks), default=0):.3g}"},
            {"check": "every step applied; served skills as expected", "ok": not driver.failures,
             "detail": f"{sum(len(v) for v in driver.actions.values())} steps; {driver.failures[:2]}"},
            {"check": "corrupt drops rejected with a specific reason", "ok": not bad_corrupt,
             "detail": f"{len(driver.corrupt)} drops; {bad_corrupt[:2]}"},
            {"check": "invalid config edits rejected, daemon kept serving",
             "ok": not any("config edit" in f for f in driver.failures),
             "detail": f"{invalid} edits, {service._events['config_rejected']} rejections logged"},
            {"check": "RSS flat after warm-up", "ok": bool(rss.get("ok")),
             "detail": (f"slope {rss.get('slope_mib_per_min')} MiB/min (limit {RSS_SLOPE_LIMIT}) over "
                        f"{rss.get('window_minutes')} min, {rss.get('min_mib')}-{rss.get('max_mib')} MiB")
                       + ("" if rss.get("judged") else f"; not judged: under {RSS_MIN_WINDOW:.0f} min after warm-up")},
            {"check": "no unexpected daemon errors; doctor healthy; clean SIGTERM",
             "ok": alive and not unexpected_errors and doctor["ok"] and rc == 0,
             "detail": f"alive {alive}, unexpected errors {unexpected_errors or 'none'}, doctor rc {doctor['rc']}, "
                       f"exit {rc}"},
        ]
        result = {
            "command": " ".join(["bench/soak.py", *sys.argv[1:]]),
            "date": datetime.date.today().isoformat(),
            "seed": seed, "daemon_env": daemon_env or {}, "seconds_driven": round(driving, 1),
            "wall_seconds": round(time.time() - t_start, 1),
            "machine": {"cpus": os.cpu_count(), "load1_at_end": round(os.getloadavg()[0], 2),
                        "mean_load1_during": rss.get("mean_load1"), "daemon_cpu_share": round(cpu / driving, 2)},
            "model": {"clip": CLIP_CFG, "sparsity": SPARSITY,
                      "merged_parameters": sum(v.numel() for k, v in base.items() if k.startswith("visual."))},
            "steps": {k: {"n": len(v), "p50_s": round(sorted(v)[len(v) // 2], 2), "max_s": round(max(v), 2)}
                      for k, v in sorted(steps.items())},
            "drops": driver.drops,
            "corrupt_drops": dict(Counter(c.kind for c in driver.corrupt)),
            "corrupt_reasons": {c.kind: c.reason for c in driver.corrupt},
            "invalid_config_edits": dict(driver.invalid_edits),
            "cli_runs": driver.cli_runs[:5],
            "final_model": {"version": final_model.get("version"), "skills": sorted(final_model.get("skills", {}))},
            "versions_published": service._events["version_published"],
            "requests": tr, "rss": rss,
            "status_series": [[round(x["t"], 1), round(x["rss"], 1), round(x.get("anon", 0), 1),
                               round(x.get("file", 0), 1), x.get("threads"), x.get("fds")]
                              for x in sampler.samples[::5]],
            "status_series_columns": ["t s", "VmRSS MiB", "RssAnon MiB", "RssFile MiB", "threads", "fds"],
            "weights_checks": driver.weights_checks, "registry": registry, "doctor": doctor,
            "daemon_errors_by_event": dict(service._errors), "daemon_error_samples": service._error_samples,
            "daemon_plain_text_lines": service._plain[:20],
            "exit_code_on_sigterm": rc, "driver_failures": driver.failures, "timeline": driver.timeline,
            "checks": checks, "ok": all(c["ok"] for c in checks),
        }
    except Exception as e:  # noqa: BLE001 - any crash of the soak itself is reported as a failed check
        log(f"soak aborted: {type(e).__name__}: {e}")
        result = {"ok": False, "checks": [{"check": "soak ran to the end", "ok": False,
                                           "detail": f"{type(e).__name__}: {e}"}],
                  "driver_failures": driver.failures if driver else [], "log_tail": service.tail()}
    finally:
        traffic.stop()
        if sampler is not None:
            sampler.stop_event.set()
        if driver is not None:
            driver.close()
        service.stop()
    if not result.get("ok"):
        result["log_tail"] = service.tail(4000)
    return result


def report(res: dict[str, Any]) -> str:
    lines = []
    if "steps" in res:
        m, r, tr = res["machine"], res["rss"], res["requests"]
        env = "".join(f", daemon env {k}={v}" for k, v in res.get("daemon_env", {}).items())
        lines += [f"soak: {res['seconds_driven']:.0f} s driven ({res['wall_seconds']:.0f} s wall), seed {res['seed']}"
                  f"{env}, {m['cpus']} CPUs, mean load {m['mean_load1_during']}, "
                  f"daemon CPU {m['daemon_cpu_share']:.2f} cores",
                  "", "| step | n | p50 s | max s |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['n']} | {v['p50_s']:.2f} | {v['max_s']:.2f} |" for k, v in res["steps"].items()]
        lat = tr["latency_ms"]
        lines += ["", f"drops {res['drops']} (corrupt: {res['corrupt_drops']}), versions published "
                      f"{res['versions_published']}, final version {res['final_model']['version']} with "
                      f"{len(res['final_model']['skills'])} skills",
                  f"requests: {tr['requests']} sent by {tr['clients']} clients, {tr['ok_200']} ok "
                  f"({tr['ok_per_second']}/s), expected 4xx {tr['expected_4xx']}, failed {tr['failed']}; "
                  f"latency ms p50 {lat['p50']} p95 {lat['p95']} p99 {lat['p99']} max {lat['max']}; answered from "
                  f"{tr['versions_answered_from']} versions",
                  f"RSS: start {r.get('start_mib')} MiB, after warm-up ({r.get('warmup_seconds')} s) "
                  f"{r.get('first_mib')} -> {r.get('last_mib')} MiB, min {r.get('min_mib')} max {r.get('max_mib')}, "
                  f"slope {r.get('slope_mib_per_min')} MiB/min over {r.get('window_minutes')} min "
                  + (f"(pass: <= {RSS_SLOPE_LIMIT} MiB/min)" if r.get("judged") else
                     f"(not judged: under {RSS_MIN_WINDOW:.0f} min after warm-up)"),
                  f"     RssAnon slope {r.get('anon_slope_mib_per_min')} MiB/min, RssFile slope "
                  f"{r.get('file_slope_mib_per_min')} MiB/min; threads {r.get('threads_after_warmup')}, open fds "
                  f"{r.get('fds_after_warmup')} (min, max after warm-up)", ""]
    lines += ["| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'PASS' if c['ok'] else 'FAIL'} | {c['detail']} |" for c in res["checks"]]
    lines += ["", "soak: PASS" if res.get("ok") else "soak: FAIL"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long to drive the service (default 10)")
    length.add_argument("--seconds", type=float, help="the same in seconds, for short runs")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--clients", type=int, default=4, help="client threads sending requests")
    ap.add_argument("--think-ms", type=float, default=20.0, help="mean pause of a client between requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="work here and keep it (default: a temporary folder, removed)")
    ap.add_argument("--daemon-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the daemon only, for diagnosis (e.g. MALLOC_ARENA_MAX=2)")
    args = ap.parse_args(argv)
    if any("=" not in kv for kv in args.daemon_env):
        ap.error("--daemon-env takes KEY=VALUE")
    daemon_env = dict(kv.split("=", 1) for kv in args.daemon_env)
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes if args.minutes is not None else 10)
    if seconds <= 0 or args.clients < 1:
        ap.error("--minutes/--seconds and --clients must be positive")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=False)
        res = soak(args.workdir, seconds, args.clients, args.think_ms / 1000, args.seed, daemon_env)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="skillhub-soak-"))
        try:
            res = soak(tmp, seconds, args.clients, args.think_ms / 1000, args.seed, daemon_env)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(report(res))
    if not res.get("ok") and res.get("log_tail"):
        print("\ndaemon log tail:\n" + res["log_tail"][-2000:], file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())

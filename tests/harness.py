"""The real service for end-to-end and fault tests: `skillhub run` as a subprocess on a real inbox, state folder,
SQLite file and HTTP port, with checkpoints written by other processes and an independent float64 reference stitch.

Crash tests arm a :mod:`skillhub.faultpoints` point: the child writes the point's name to a marker file and stops
itself there; :meth:`Service.start_until` waits for that handshake, and the test sends SIGKILL.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

TOKEN = "e2e-secret-token"
SHAPES = {"enc.weight": (24, 16), "enc.bias": (24,), "head.weight": (5, 24)}
SPARSITY = 0.1

WRITER = r"""
import sys, time, os
data = open(sys.argv[1], "rb").read()
dest, mode = sys.argv[2], sys.argv[3]
if mode == "slow":  # 40%, pause, the rest: must not be ingested before it is complete (FAULTS A1)
    cut = int(len(data) * 0.4)
    with open(dest, "wb") as f:
        f.write(data[:cut]); f.flush()
    time.sleep(1.5)
    with open(dest, "ab") as f:
        f.write(data[cut:])
elif mode == "rename":  # temp name, then rename into place (FAULTS A2)
    tmp = os.path.join(os.path.dirname(dest), "." + os.path.basename(dest) + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
    time.sleep(0.5)
    os.rename(tmp, dest)
else:
    with open(dest, "wb") as f:
        f.write(data)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model(seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if base is None:
        return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}


def reference(base: dict[str, torch.Tensor], fts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Independent float64 L&S: exact global top-k of |τ| (ties by key order then index), averaged stitch."""
    keys = sorted(base)
    n = sum(base[k].numel() for k in keys)
    k_top = math.floor(SPARSITY * n)
    total = {k: torch.zeros(base[k].numel(), dtype=torch.float64) for k in keys}
    count = {k: torch.zeros(base[k].numel(), dtype=torch.float64) for k in keys}
    for ft in fts:
        taus = {k: (ft[k].double() - base[k].double()).reshape(-1) for k in keys}
        entries = sorted(((-abs(float(taus[k][i])), ki, i) for ki, k in enumerate(keys) for i in range(base[k].numel())
                          if float(taus[k][i]) != 0))[:k_top]
        for _, ki, i in entries:
            key = keys[ki]
            total[key][i] += float((ft[key].reshape(-1)[i] - base[key].reshape(-1)[i]))
            count[key][i] += 1
    return {k: (base[k].double().reshape(-1) + total[k] / count[k].clamp(min=1)).reshape(base[k].shape).float()
            for k in keys}


class Service:
    """One `skillhub run` child process on ``root/config.toml``; its stderr (JSON log lines) goes to ``daemon.log``
    (or ``log``). ``args`` are more flags of `skillhub run` (``--follow --port N`` for a follower)."""

    def __init__(self, root: Path, port: int, *, args: tuple[str, ...] = (), log: str = "daemon.log") -> None:
        self.root, self.port, self.args = root, port, args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / log
        self.marker = root / "faultpoint.reached"

    def spawn(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start the child and return at once."""
        full = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")}
        full["SKILLHUB_TOKEN"] = TOKEN
        full.update(env or {})
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "skillhub", "run", "--config",
                                          str(self.root / "config.toml"), *self.args],
                                         cwd=self.root, env=full, stdout=subprocess.DEVNULL, stderr=log)
        return self.proc

    def start(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start the child and wait until it serves a version."""
        self.spawn(env)
        self.wait(lambda: self.get("/readyz").status_code == 200, "service ready")
        return self.proc  # type: ignore[return-value]

    def arm(self, spec: str) -> dict[str, str]:
        """The environment that arms a fault point (``stop:mask_write``) with the handshake marker file."""
        self.marker.unlink(missing_ok=True)
        return {"SKILLHUB_FAULTPOINT": spec, "SKILLHUB_FAULTPOINT_FILE": str(self.marker)}

    def wait_stopped_at(self, point: str, timeout: float = 60) -> None:
        """Wait for the child's handshake: it wrote ``point`` to the marker and stopped itself there."""
        self.wait(lambda: self.marker.is_file() and self.marker.read_text() == point, f"fault point {point}",
                  timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def get(self, route: str) -> httpx.Response:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}{route}", headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=10)
        except httpx.HTTPError:
            return httpx.Response(599)

    def post(self, route: str, **kw) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{self.port}{route}", headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=30, **kw)

    def wait(self, cond, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) waiting for {what}:\n"
                                     + self.log.read_text(errors="replace")[-3000:])
            if cond():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n" + self.log.read_text(errors="replace")[-3000:])

    def model(self) -> dict:
        return self.get("/v1/model").json()

    def skills(self) -> dict[str, dict]:
        return {s["name"]: s for s in self.get("/v1/skills").json()}

    def weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        r = self.get("/v1/model/weights")
        assert r.status_code == 200, r.text
        return int(r.headers["X-Skillhub-Version"]), load_safetensors(r.content)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(30)


def query(state: Path, sql: str) -> list[tuple]:
    """Run ``sql`` on the registry, opened read-only by this process (beside the running service)."""
    conn = sqlite3.connect(f"file:{state / 'registry.sqlite3'}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def integrity(state: Path) -> list[tuple]:
    """``PRAGMA integrity_check`` of the registry: ``[("ok",)]`` when sound."""
    return query(state, "PRAGMA integrity_check")


def rows(state: Path) -> list[tuple]:
    """(skill, version, status, mask_sha) of every registry row."""
    return query(state, "SELECT skill, version, status, mask_sha FROM versions ORDER BY id")


def make_world(tmp_path: Path, extra_config: str = "") -> tuple[Path, dict[str, torch.Tensor],
                                                              dict[str, dict[str, torch.Tensor]], Service]:
    """A base, three finetunes a/b/c (as ``NAME.src`` files to drop) and a config for a real service."""
    base = model(0)
    (tmp_path / "base.safetensors").write_bytes(save_safetensors(base))
    fts = {name: model(i + 1, base) for i, name in enumerate(["a", "b", "c"])}
    for name, ft in fts.items():
        (tmp_path / f"{name}.src").write_bytes(save_safetensors(ft))
    port = free_port()
    (tmp_path / "config.toml").write_text(f"""
[base]
weights = "base.safetensors"
[watch]
dir = "inbox"
stable_seconds = 0.3
rescan_seconds = 2
[state]
dir = "state"
[localize]
strategy = "dataless"
[localize.params]
sparsity = {SPARSITY}
[serve]
port = {port}
""" + extra_config)
    return tmp_path, base, fts, Service(tmp_path, port)


@pytest.fixture
def world(tmp_path: Path):
    root, base, fts, svc = make_world(tmp_path)
    yield root, base, fts, svc
    if svc.proc is not None and svc.proc.poll() is None:
        svc.proc.kill()
        svc.proc.wait()


def drop(root: Path, name: str, mode: str) -> subprocess.Popen[bytes]:
    (root / "inbox").mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root / f"{name}.src"),
                             str(root / "inbox" / f"{name}.safetensors"), mode])


def assert_weights_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


# --- one running service shared by independent fault cases --------------------------------------------------


@dataclass
class World:
    root: Path
    base: dict[str, torch.Tensor]
    svc: Service
    served: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # skill -> finetune being served

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def put(self, name: str | bytes, data: bytes, mode: int | None = None) -> Path:
        """Write ``data`` beside the inbox's files under a temp name, then rename it into place as ``name``."""
        tmp = self.inbox / f".{len(data)}-{time.monotonic_ns()}.incoming"
        tmp.write_bytes(data)
        if mode is not None:
            os.chmod(tmp, mode)
        dest = os.path.join(os.fsencode(self.inbox), name if isinstance(name, bytes) else os.fsencode(name))
        os.rename(tmp, dest)
        return Path(os.fsdecode(dest))

    def reason(self, name: str, timeout: float = 20) -> str:
        """Wait for the drop ``name`` to be rejected; its reason file's text."""
        note = self.inbox / ".rejected" / f"{name}.reason.txt"
        self.svc.wait(note.is_file, f"{name!r} rejected", timeout)
        assert os.path.lexists(self.inbox / ".rejected" / name) and not os.path.lexists(self.inbox / name)
        return note.read_text()

    def rejected(self) -> list[str]:
        folder = self.inbox / ".rejected"
        return sorted(os.listdir(folder)) if folder.exists() else []

    def expected(self) -> dict[str, torch.Tensor]:
        return reference(self.base, list(self.served.values()))

    def skills(self) -> dict:
        return self.svc.model().get("skills", {})

    def serve_new(self, name: str, ft: dict[str, torch.Tensor]) -> None:
        """Drop a good finetune ``name`` and wait until it is served."""
        self.put(f"{name}.safetensors", save_safetensors(ft))
        self.svc.wait(lambda: name in self.skills(), f"{name} served")
        self.served[name] = ft

    def log(self) -> list[dict]:
        out = []
        for line in self.svc.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def events(self, event: str, name: str | None = None) -> list[dict]:
        return [r for r in self.log() if r.get("event") == event and (name is None or r.get("name") == name)]


@dataclass(frozen=True)
class Before:
    version: int
    weights: dict[str, torch.Tensor]
    ready: frozenset[tuple[str, int, str]]
    rejected: frozenset[str]


def snapshot(w: World) -> Before:
    version, weights = w.svc.weights()
    assert_weights_equal(weights, w.expected())
    return Before(version, weights, frozenset((s, v, m) for s, v, st, m in rows(w.state) if st == "READY"),
                  frozenset(w.rejected()))


def new_rejections(w: World, before: Before) -> list[str]:
    """What ``inbox/.rejected/`` has gained since ``before``."""
    return sorted(set(w.rejected()) - before.rejected)


def assert_kept(w: World, before: Before, *, same_version: bool = True) -> None:
    """The promise: still serving (the same version and weights unless the case added a skill), the weights those of
    the skills served, nothing stored lost."""
    assert w.svc.proc is not None and w.svc.proc.poll() is None, "the daemon died"
    assert w.svc.get("/readyz").status_code == 200
    version, weights = w.svc.weights()
    if same_version:
        assert version == before.version
        for k in before.weights:
            assert torch.equal(weights[k], before.weights[k]), k
    assert_weights_equal(weights, w.expected())
    assert integrity(w.state) == [("ok",)]
    now = {(s, v, m) for s, v, st, m in rows(w.state) if st == "READY"}
    assert before.ready <= now, before.ready - now
    for _, _, mask in before.ready:
        assert (w.state / "masks" / f"{mask}.mask.safetensors").is_file()
    assert [p.name for p in (w.state / "staging").iterdir() if p.name.endswith(".tmp")] == []


def serving_a(world: World, fts: dict[str, dict[str, torch.Tensor]]) -> Iterator[World]:
    """For a module-scoped fixture: start ``world``'s service with skill ``a`` stored and served before any fault
    begins; yield the world; stop it cleanly (SIGTERM, exit 0), or kill it if a test left it in a bad state."""
    svc = world.svc
    try:
        svc.start()
        assert drop(world.root, "a", "plain").wait(30) == 0
        svc.wait(lambda: "a" in svc.model().get("skills", {}), "a served")
        world.served["a"] = fts["a"]
        yield world
        assert svc.stop() == 0
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()

"""End to end: `skillhub run` as a real subprocess on a real inbox, state folder, SQLite file and HTTP port.

Checkpoints are written into the inbox by other processes (one slowly in pieces, one under a temp name then
renamed); the merged weights downloaded over HTTP must equal an independent float64 stitch computed here.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
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
    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "daemon.log"

    def start(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")}
        env["SKILLHUB_TOKEN"] = TOKEN
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "skillhub", "run", "--config",
                                          str(self.root / "config.toml")],
                                         cwd=self.root, env=env, stdout=subprocess.DEVNULL, stderr=log)
        self.wait(lambda: self.get("/readyz").status_code == 200, "service ready")
        return self.proc

    def get(self, route: str) -> httpx.Response:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}{route}", headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=10)
        except httpx.HTTPError:
            return httpx.Response(599)

    def wait(self, cond, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) waiting for {what}:\n"
                                     + self.log.read_text()[-3000:])
            if cond():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n" + self.log.read_text()[-3000:])

    def model(self) -> dict:
        return self.get("/v1/model").json()

    def weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        r = self.get("/v1/model/weights")
        assert r.status_code == 200, r.text
        return int(r.headers["X-Skillhub-Version"]), load_safetensors(r.content)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(30)


@pytest.fixture
def world(tmp_path: Path):
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
""")
    svc = Service(tmp_path, port)
    yield tmp_path, base, fts, svc
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


def test_drop_disable_kill_restart(world) -> None:
    root, base, fts, svc = world
    svc.start()
    v0, w0 = svc.weights()
    assert_weights_equal(w0, base)  # no skills yet: exactly the base

    writers = [drop(root, "a", "slow"), drop(root, "b", "rename"), drop(root, "c", "plain")]
    for w in writers:
        assert w.wait(30) == 0
    svc.wait(lambda: set(svc.model().get("skills", {})) == {"a", "b", "c"}, "three skills served")
    version, weights = svc.weights()
    assert version > v0
    assert_weights_equal(weights, reference(base, [fts["a"], fts["b"], fts["c"]]))
    assert not list((root / "inbox" / ".rejected").glob("*")) if (root / "inbox" / ".rejected").exists() else True
    skills = svc.get("/v1/skills").json()
    assert {s["name"]: len(s["versions"]) for s in skills} == {"a": 1, "b": 1, "c": 1}

    # Disable b in config.toml: a version without it follows, no restart.
    cfg = root / "config.toml"
    cfg.write_text(cfg.read_text() + '\n[skills]\ndisabled = ["b"]\n')
    svc.wait(lambda: set(svc.model().get("skills", {})) == {"a", "c"}, "b disabled")
    version2, weights2 = svc.weights()
    assert version2 > version
    want2 = reference(base, [fts["a"], fts["c"]])
    assert_weights_equal(weights2, want2)

    # An invalid edit is rejected; the running config and version stay (B11).
    good = cfg.read_text()
    cfg.write_text(good + "\n[serve]\nbogus_key = 1\n")
    time.sleep(2.0)
    assert svc.get("/readyz").status_code == 200
    assert svc.model()["version"] == version2
    cfg.write_text(good)

    # SIGKILL and restart: the same version is served, nothing lost.
    svc.stop(signal.SIGKILL)
    svc.start()
    version3, weights3 = svc.weights()
    assert version3 == version2
    assert_weights_equal(weights3, want2)
    assert svc.stop() == 0


def test_second_daemon_refused(world) -> None:
    root, _, _, svc = world
    svc.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")}
    env["SKILLHUB_TOKEN"] = TOKEN
    r = subprocess.run([sys.executable, "-m", "skillhub", "run", "--config", str(root / "config.toml")], cwd=root,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"already in use by pid {svc.proc.pid}" in r.stderr
    assert svc.get("/readyz").status_code == 200
    assert svc.stop() == 0


def test_new_version_rollback_and_burst(world) -> None:
    root, base, fts, svc = world
    svc.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")} | {"SKILLHUB_TOKEN": TOKEN}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "skillhub", *args, "--config", str(root / "config.toml")],
                              cwd=root, env=env, capture_output=True, text=True, timeout=120)

    # A5: the same skill name with new content becomes version 2; version 1 is kept and can be pinned back.
    assert drop(root, "a", "rename").wait(30) == 0
    svc.wait(lambda: svc.model().get("skills", {}).get("a", {}).get("version") == 1, "a@1 served")
    (root / "a.src").write_bytes(save_safetensors(fts["b"]))  # new content under the name "a"
    assert drop(root, "a", "rename").wait(30) == 0
    svc.wait(lambda: svc.model().get("skills", {}).get("a", {}).get("version") == 2, "a@2 served")
    _, w2 = svc.weights()
    assert_weights_equal(w2, reference(base, [fts["b"]]))
    listed = cli("skills", "list")
    assert listed.returncode == 0 and listed.stdout.startswith("a\tv2"), listed
    pinned = cli("skills", "pin", "a", "1")
    assert pinned.returncode == 0 and "running service" in pinned.stdout, pinned
    svc.wait(lambda: svc.model()["skills"]["a"]["version"] == 1, "rollback to a@1")
    _, w1 = svc.weights()
    assert_weights_equal(w1, reference(base, [fts["a"]]))
    assert cli("skills", "pin", "a", "none").returncode == 0
    svc.wait(lambda: svc.model()["skills"]["a"]["version"] == 2, "unpinned: a@2 again")

    # A burst of ten drops becomes one or a few versions, not ten.
    before = svc.model()["version"]
    for i in range(10):
        (root / f"burst{i}.src").write_bytes(save_safetensors(model(50 + i, base)))
    writers = [drop(root, f"burst{i}", "rename") for i in range(10)]
    for w in writers:
        assert w.wait(30) == 0
    svc.wait(lambda: sum(n.startswith("burst") for n in svc.model().get("skills", {})) == 10, "burst served")
    assert svc.model()["version"] - before <= 3
    assert svc.stop() == 0

"""End to end: `skillhub run` as a real subprocess on a real inbox, state folder, SQLite file and HTTP port.

Checkpoints are written into the inbox by other processes (one slowly in pieces, one under a temp name then
renamed); the merged weights downloaded over HTTP must equal an independent float64 stitch computed here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from safetensors.torch import save as save_safetensors

from harness import (TOKEN, Service, assert_weights_equal, drop, model, reference,
                     world)


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

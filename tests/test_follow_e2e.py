"""End to end: a real primary and two real followers (`skillhub run --follow`) on one state folder, on 127.0.0.1.

Drop, disable and remove on the primary; both followers converge on its weights, byte for byte, through
``GET /v1/model/weights`` (the merged model and a skill's own); changes sent to a follower are refused with 409; the
primary is killed (SIGKILL) and the followers keep serving the last version, writing nothing in the state folder.
"""

from __future__ import annotations

import hashlib
import signal
import time
from pathlib import Path

import httpx

from harness import TOKEN, Service, assert_weights_equal, drop, free_port, reference, world  # noqa: F401


def _tree(state: Path) -> dict[str, str]:
    """Every path under ``state`` (folders too), with its bytes' sha256 for files."""
    return {str(p.relative_to(state)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(state.rglob("*"))}


def _converged(primary: Service, followers: list[Service], skills: set[str]) -> bytes:
    """Wait until the primary serves ``skills`` and every follower its version; the weights' bytes, checked equal."""
    primary.wait(lambda: set(primary.model().get("skills", {})) == skills, f"primary serves {sorted(skills)}")
    number = primary.model()["version"]
    for f in followers:
        f.wait(lambda f=f: f.model().get("version") == number, f"follower on :{f.port} serves version {number}", 30)
    body = primary.get("/v1/model/weights")
    assert body.status_code == 200 and body.headers["x-skillhub-version"] == str(number)
    for f in followers:
        theirs = f.get("/v1/model/weights")
        assert theirs.headers["x-skillhub-version"] == str(number)
        assert theirs.content == body.content, f"follower on :{f.port} differs from the primary"
        for name in skills:
            assert f.get(f"/v1/model/weights?skill={name}").content == \
                primary.get(f"/v1/model/weights?skill={name}").content, name
    return body.content


def test_a_primary_and_two_followers_converge_and_the_followers_outlive_the_primary(world) -> None:
    root, base, fts, primary = world
    primary.start()
    ports = [free_port(), free_port()]  # one given by --port, the other by SKILLHUB_SERVE__PORT
    followers = [Service(root, ports[0], args=("--follow", "--port", str(ports[0])), log="follower1.log"),
                 Service(root, ports[1], args=("--follow",), log="follower2.log")]
    try:
        followers[0].start()
        followers[1].start(env={"SKILLHUB_SERVE__PORT": str(followers[1].port)})
        _converged(primary, followers, set())

        for name in ("a", "b", "c"):
            assert drop(root, name, "rename").wait(30) == 0
        _converged(primary, followers, {"a", "b", "c"})
        _, weights = followers[0].weights()
        assert_weights_equal(weights, reference(base, [fts["a"], fts["b"], fts["c"]]))

        cfg = root / "config.toml"  # disable b in the primary's config (followers do not apply config edits)
        cfg.write_text(cfg.read_text() + '\n[skills]\ndisabled = ["b"]\n')
        _converged(primary, followers, {"a", "c"})
        r = httpx_delete(primary, "/v1/skills/c")  # remove c through the primary's API
        assert r.status_code == 200, r.text
        last = _converged(primary, followers, {"a"})

        for f in followers:  # a follower changes nothing: 409, and where to go instead
            for r in (f.post("/v1/skills/a/disable"), f.post("/v1/skills/a/pin", json={"version": None}),
                      httpx_delete(f, "/v1/skills/a")):
                assert r.status_code == 409, r.text
                assert "read-only follower" in r.json()["error"] and "primary" in r.json()["error"]
            health = f.get("/healthz").json()
            assert health["role"] == "follower" and health["follow"]["ok"] is True
            assert health["follow"]["version"] == primary.model()["version"]
            assert isinstance(health["follow"]["lag_seconds"], float)
            assert {s["name"] for s in f.get("/v1/skills").json()} == {"a"}
            metrics = f.get("/metrics").text
            assert f"skillhub_follow_version {float(primary.model()['version'])}" in metrics
            assert "skillhub_follow_lag_seconds" in metrics

        primary.kill()  # SIGKILL: current stays where it was, and so do the followers
        before = _tree(root / "state")
        time.sleep(1.0)
        for f in followers:
            assert f.get("/readyz").status_code == 200
            assert f.get("/v1/model/weights").content == last
            assert f.get("/healthz").json()["follow"]["ok"] is True
        assert _tree(root / "state") == before  # the followers wrote nothing, created nothing
        for f in followers:
            assert f.stop(signal.SIGTERM) == 0
        assert _tree(root / "state") == before
    finally:
        for f in followers:
            if f.proc is not None and f.proc.poll() is None:
                f.proc.kill()
                f.proc.wait()


def httpx_delete(svc: Service, route: str) -> httpx.Response:
    return httpx.delete(f"http://127.0.0.1:{svc.port}{route}", headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=30)

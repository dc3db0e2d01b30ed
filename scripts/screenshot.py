"""The README's dashboard screenshot, made from the demo by the real service (run it through ``scripts/screenshot``).

Builds the demo in ``demo/`` (``skillhub demo``'s model and skills; reused when present), runs ``skillhub run`` on
it in a fresh folder (``bench/out/screenshot/``), drops the three demo skills and one unreadable file (so the inbox
panel shows a rejection and its reason), waits until every drop is decided, then opens ``GET /`` in the system
Chromium (Playwright, no browser download), enters the token and saves the page as ``docs/dashboard.png``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("SKILLHUB_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(what: str, cond, proc: subprocess.Popen[bytes], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited ({proc.returncode}) waiting for {what}")
        try:
            if cond():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=REPO / "demo")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "screenshot")
    ap.add_argument("--width", type=int, default=1280)
    args = ap.parse_args()

    from skillhub.demo import SKILLS, make_demo

    base, model_cfg, skills = make_demo(args.demo)
    shutil.rmtree(args.work, ignore_errors=True)
    (args.work / "inbox").mkdir(parents=True)
    port, token = free_port(), secrets.token_urlsafe(24)
    (args.work / "config.toml").write_text(f"""
[base]
family = "open_clip"
weights = "{base.resolve()}"
model = "{model_cfg.resolve()}"
[watch]
dir = "inbox"
stable_seconds = 0.5
[state]
dir = "state"
[serve]
port = {port}
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")} | {"SKILLHUB_TOKEN": token}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    log = open(args.work / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "skillhub", "run", "--config", str(args.work / "config.toml")],
                            cwd=args.work, env=env, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30, trust_env=False)
    try:
        wait("the service", lambda: http.get("/readyz").status_code == 200, proc)
        for name in SKILLS:  # one at a time, as an operator would: the history shows each version's change
            tmp = args.work / "inbox" / f".{name}.part"
            shutil.copyfile(skills[name], tmp)
            os.rename(tmp, args.work / "inbox" / f"{name}.safetensors")
            wait(f"{name} decided", lambda n=name: _decided(http, n), proc)
        (args.work / "inbox" / "notes.safetensors").write_bytes(b"these are my notes, not a model\n")
        wait("the bad drop rejected", lambda: http.get("/v1/inbox").json()["rejected"], proc)
        _shoot(url, token, args.out, args.width)
        print(f"{args.out}: the dashboard of version {http.get('/readyz').json()['version']}", file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        http.close()
        log.close()
    return 0


def _decided(http: httpx.Client, name: str) -> bool:
    """``name`` is served (merged or held on its own route) or failed, and no localization is in flight."""
    skills = {s["name"]: s for s in http.get("/v1/skills").json()}
    s = skills.get(name)
    if s is None or any(v["status"] == "PENDING" for v in s["versions"]):
        return False
    return s["versions"][-1]["status"] == "FAILED" or name in http.get("/v1/model").json().get("skills", {}) \
        or s.get("held") is not None


def _shoot(url: str, token: str, out: Path, width: int) -> None:
    from playwright.sync_api import sync_playwright

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="skillhub-chromium-") as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                                                   viewport={"width": width, "height": 900}, device_scale_factor=1)
        try:
            page = ctx.new_page()
            page.goto(url + "/")
            page.fill("#token", token)
            page.click("#login button[type=submit]")
            page.wait_for_selector("svg.heatmap")
            page.wait_for_selector("tr.rejected")
            page.screenshot(path=str(out), full_page=True)
        finally:
            ctx.close()


if __name__ == "__main__":
    sys.exit(main())

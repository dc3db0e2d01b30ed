"""The dashboard in a real browser: the real daemon (`skillhub run` as a subprocess on a tiny model), two skills
dropped into its inbox, Debian's Chromium driven by Playwright (never a downloaded browser).

Skipped, with the reason, when Playwright or the system Chromium is missing (``scripts/setup`` installs both when
it can)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import httpx
import pytest

from harness import TOKEN, drop, make_world
from skillhub.dashboard import render_page, render_panels

CHROMIUM = os.environ.get("SKILLHUB_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the python package playwright is not installed (pip install -e '.[dev]')"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and shutil.which(CHROMIUM) is None:
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; scripts/setup does it as root)"
    return None


@pytest.fixture(scope="module")
def browser():
    """Chromium on a fresh profile of its own; each page is its own tab, with its own session storage."""
    why = _browser_missing()
    if why:
        pytest.skip(f"browser test skipped: {why}")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="skillhub-chromium-")
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS)
            try:
                yield ctx
            finally:
                ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _served(svc) -> set[str]:
    return set(svc.model().get("skills", {}))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """One real daemon for this module, serving two dropped skills a and b (the browser test disables b)."""
    root, _, _, svc = make_world(tmp_path_factory.mktemp("dashboard"))
    try:
        svc.start()
        for name in ("a", "b"):
            assert drop(root, name, "plain").wait(30) == 0
        svc.wait(lambda: _served(svc) == {"a", "b"}, "a and b served")
        yield svc
        assert svc.stop() == 0
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()


def test_dashboard_in_chromium(browser, service) -> None:  # browser first: a skip starts no daemon
    svc = service
    svc.post("/v1/skills/b/enable")  # whatever ran before: both served
    svc.wait(lambda: _served(svc) == {"a", "b"}, "a and b served")
    version = svc.model()["version"]
    url = f"http://127.0.0.1:{svc.port}/"

    # Without the token: what /healthz shows, and no skill.
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#health")
    assert "status" in page.inner_text("#health")
    page.wait_for_timeout(500)  # the script has run: it must not have fetched anything for a page without a token
    assert page.locator("tr.skill").count() == 0 and page.locator("svg.heatmap").count() == 0
    assert page.inner_text("#panels").strip() == ""
    page.close()

    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url)
    page.fill("#token", TOKEN)
    page.click("#login button[type=submit]")
    page.wait_for_selector("tr.skill[data-skill=b]")
    assert {page.locator("tr.skill").nth(i).get_attribute("data-skill")
            for i in range(page.locator("tr.skill").count())} == {"a", "b"}
    assert page.get_attribute("#served-version", "data-version") == str(version)
    assert page.inner_text("#version") == f"version {version}"
    cells = page.locator("svg.heatmap g.cell")
    assert cells.count() == 4  # 2 × 2: the diagonal and both orders of the pair
    assert page.locator("svg.layerbars rect").count() >= 2
    assert page.locator("tr.version").first.get_attribute("data-version") == str(version)
    # the token is never in a URL, and only this origin was asked for anything
    assert all(TOKEN not in u for u in requests) and TOKEN not in page.url
    assert all(u.startswith(f"http://127.0.0.1:{svc.port}/") for u in requests), requests
    assert TOKEN not in page.content()

    # Disable b from the page: a new version without it follows, and the page shows it by itself.
    page.click("tr.skill[data-skill=b] button[data-action=disable]")
    svc.wait(lambda: _served(svc) == {"a"}, "b disabled")
    new = svc.model()["version"]
    assert new > version
    # (a selector, not a function: the page's Content-Security-Policy forbids evaluating strings, even the test's)
    page.wait_for_selector(f"#served-version[data-version='{new}']", timeout=20000)
    assert page.inner_text("tr.skill[data-skill=b] .status") == "disabled"
    assert page.locator("svg.heatmap").count() == 0  # one skill served: no pair to draw
    assert "− b" in page.inner_text("tr.version >> nth=0")

    # A change made elsewhere (the API, as the CLI does): the open page follows the new version by itself.
    assert svc.post("/v1/skills/b/enable").status_code == 200
    svc.wait(lambda: _served(svc) == {"a", "b"}, "b enabled again")
    newest = svc.model()["version"]
    page.wait_for_selector(f"#served-version[data-version='{newest}']", timeout=20000)
    assert page.locator("svg.heatmap g.cell").count() == 4

    # A fresh tab of the same browser has no token (sessionStorage is per tab): no skill again.
    other = browser.new_page()
    other.goto(url)
    other.wait_for_timeout(300)
    assert other.locator("tr.skill").count() == 0


def test_public_routes_and_token(service) -> None:
    """The page shell and its files answer without the token and hold no data; the panels, analytics, history and
    inbox need it; the Host check still applies to the page."""
    svc = service
    base = f"http://127.0.0.1:{svc.port}"
    r = httpx.get(base + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert ">a<" not in r.text and "data-skill" not in r.text
    for name in ("dashboard.js", "dashboard.css"):
        assert httpx.get(f"{base}/static/{name}").status_code == 200
    assert httpx.get(base + "/static/../server.py").status_code in (401, 404)
    for route in ("/v1/dashboard", "/v1/analytics", "/v1/history", "/v1/inbox", "/static/other.js"):
        assert httpx.get(base + route).status_code == 401, route
    assert httpx.post(base + "/").status_code == 401  # public means GET only
    assert httpx.get(base + "/", headers={"host": "evil.example"}).status_code == 400
    panels = svc.get("/v1/dashboard")
    assert panels.status_code == 200 and 'data-skill="a"' in panels.text
    assert panels.headers["x-skillhub-version"] == str(svc.model()["version"])
    history = svc.get("/v1/history").json()["versions"]
    assert any([a["name"] for a in h["added"]] == ["a", "b"] for h in history)


def test_panels_escape_what_drops_bring() -> None:
    """Names and reasons come from whoever drops files: rendered escaped, never as markup."""
    evil = '<img src=x onerror="alert(1)">'
    skills = [{"name": evil, "enabled": True, "pinned": None, "active_version": None, "held": None,
               "accuracy": None, "quality": "", "versions": [{"version": 1, "status": "FAILED", "reason": evil,
                                                              "nnz": 0, "strategy": "dataless", "params": {},
                                                              "mask": None}]}]
    html = render_panels(model={"version": None}, skills=skills, history=[],
                         inbox={"pending": [{"name": evil, "bytes": 1, "modified": 0}],
                                "rejected": [{"name": evil, "reason": evil, "rejected": 0}]}, analytics=None)
    assert evil not in html and "<img" not in html
    assert html.count("&lt;img src=x") >= 4
    assert re.search(r'<tr class="skill" data-skill="&lt;img', html)
    page = render_page({"status": "ok", "inbox": {"ok": True, "detail": evil}})
    assert evil not in page and "&lt;img" in page  # the public page escapes health details too

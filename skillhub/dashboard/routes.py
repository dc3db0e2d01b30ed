"""The dashboard's routes, a thin layer over :class:`~skillhub.hub.Hub`'s views and :mod:`skillhub.dashboard`'s
renderers: ``GET /`` and its two static files (public: they carry no data, see
:data:`~skillhub.dashboard.PUBLIC_PATHS`), and ``GET /v1/dashboard`` (token), the panels as an HTML fragment.

Every answer carries a Content-Security-Policy that allows this origin's script, stylesheet and API only: no inline
script or style, no frames, no form posts elsewhere (the panels hold names and reasons from whoever drops files,
escaped by the templates; the policy is the second fence)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from skillhub.dashboard import STATIC, render_page, render_panels, static_file
from skillhub.errors import SkillhubError

if TYPE_CHECKING:
    from skillhub.hub import Hub

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
           "x-frame-options": "DENY", "cache-control": "no-store"}


def dashboard_router(hub: Hub, health: Callable[[], dict[str, Any]]) -> APIRouter:
    """The dashboard's routes over ``hub``; ``health`` gives the ``/healthz`` body the public page shows."""
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse)
    def page() -> Response:
        return HTMLResponse(render_page(health()), headers=HEADERS)

    @router.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:
            return Response(b'{"error": "not found"}', status_code=404, media_type="application/json")
        return Response(static_file(name), media_type=STATIC[name], headers=HEADERS)

    @router.get("/v1/dashboard", response_class=HTMLResponse)
    def panels() -> Response:
        current = hub.current
        analytics, error = None, None
        if current is not None:
            try:
                analytics = hub.analytics()
            except SkillhubError as e:  # a missing or damaged mask file: the rest of the page still shows
                error = f"mask analytics unavailable: {e}"
        ready: dict[str, Any] = {}
        if hub.last_error:
            ready["reason"] = f"last error: {hub.last_error}"
        if hub.read_only:
            ready["reason"] = f"the registry is read-only: {hub.read_only}"
        html = render_panels(model=hub.model_view(), skills=hub.skills_view(), history=hub.history(),
                             inbox=hub.inbox(), analytics=analytics, analytics_error=error, ready=ready)
        return HTMLResponse(html, headers={**HEADERS, "x-skillhub-version": "" if current is None
                                           else str(current.number)})

    return router

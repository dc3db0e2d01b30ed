"""The dashboard (``GET /``) and the HTML analytics report, rendered from the views the JSON API answers.

- :func:`render_page`: the page shell, public (no token): what ``/healthz`` shows, the token form, the script;
- :func:`render_panels`: the panels for a holder of the token (served version, skills with their controls, the
  overlap heatmap and per-layer bars, version history with the gate's decisions, the inbox), fetched by the page's
  script from ``GET /v1/dashboard`` with the bearer header and refreshed when a new version is published;
- :func:`render_report`: a self-contained HTML file of a version's mask analytics (``skillhub analytics --out``).

Jinja2 templates with autoescaping (skill names and reasons come from whoever drops files) and inline SVG; the
static script and stylesheet ship in the package: no build step, nothing fetched from elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from functools import cache
from importlib.resources import files
from typing import Any

import jinja2

from skillhub.dashboard.charts import bars, colours, heatmap, pct

__all__ = ["PUBLIC_PATHS", "STATIC", "render_page", "render_panels", "render_report", "static_file"]

#: the dashboard's files, served without a token (they hold no data); name -> media type
STATIC = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
#: paths that need no token: the page shell and its static files
PUBLIC_PATHS = frozenset({"/", *(f"/static/{n}" for n in STATIC)})


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "?"


def _acc(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


@cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("skillhub.dashboard", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=_when, pct=pct, acc=_acc)
    return env


def static_file(name: str) -> bytes:
    """One of :data:`STATIC`'s files (KeyError for any other name: nothing else of the package is served)."""
    if name not in STATIC:
        raise KeyError(name)
    return (files("skillhub.dashboard") / "static" / name).read_bytes()


def render_page(health: Mapping[str, Any]) -> str:
    """The public page: ``health`` (the ``/healthz`` body) and the token form; no skill data."""
    return _env().get_template("page.html").render(health=health)


def _status(s: Mapping[str, Any], served: Mapping[str, Any]) -> tuple[str, list[str]]:
    """A skill's one-word status and the reasons worth showing beside it."""
    newest = s["versions"][-1] if s["versions"] else {}
    reasons = [f"v{v['version']}: {v['reason']}" for v in s["versions"]
               if v.get("status") == "FAILED" and v.get("reason")]
    if s.get("held"):
        return "held", [s["held"]["reason"], *reasons]
    if s["name"] in served:
        status = "served"
    elif not s.get("enabled", True):
        status = "disabled"
    elif newest.get("status") == "FAILED":
        status = "failed"
    elif newest.get("status") == "PENDING":
        status = "localizing"
    else:
        status = "not served"
    return status, reasons


def skill_rows(skills: Sequence[Mapping[str, Any]], model: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The skills table: per skill its status, the version it serves and how it was localized, its mask size, its
    accuracy per route and any failure reason."""
    served = model.get("skills") or {}
    total = model.get("included_parameters") or 0
    palette = colours([s["name"] for s in skills])
    rows = []
    for s in sorted(skills, key=lambda s: s["name"]):
        status, reasons = _status(s, served)
        shown = s.get("active_version") or (s.get("held") or {}).get("version")
        entry = next((v for v in s["versions"] if v["version"] == shown), s["versions"][-1] if s["versions"] else {})
        params = entry.get("params") or {}
        nnz = entry.get("nnz") or 0
        rows.append({"name": s["name"], "colour": palette[s["name"]], "status": status, "reasons": reasons,
                     "enabled": s.get("enabled", True), "pinned": s.get("pinned"), "version": shown,
                     "versions": [v["version"] for v in s["versions"] if v.get("status") == "READY"],
                     "strategy": entry.get("strategy") or "–",
                     "sparsity": params.get("sparsity", "default") if isinstance(params, Mapping) else "–",
                     "nnz": nnz, "density": pct(nnz / total) if total and nnz else "–",
                     "accuracy": s.get("accuracy") or {}, "note": s.get("quality") or ""})
    return rows


def render_panels(*, model: Mapping[str, Any], skills: Sequence[Mapping[str, Any]],
                  history: Sequence[Mapping[str, Any]], inbox: Mapping[str, Any],
                  analytics: Mapping[str, Any] | None, analytics_error: str | None = None,
                  ready: Mapping[str, Any] | None = None) -> str:
    """The token holder's panels, from the JSON API's views (``/v1/model``, ``/v1/skills``, ``/v1/history``,
    ``/v1/inbox``, ``/v1/analytics``)."""
    charts = analytics is not None and len(analytics.get("skills") or {}) > 0
    return _env().get_template("panels.html").render(
        model=model, rows=skill_rows(skills, model), history=history, inbox=inbox, analytics=analytics,
        analytics_error=analytics_error, ready=ready or {},
        heat=heatmap(analytics) if charts and analytics is not None and len(analytics["skills"]) > 1 else None,
        bars=bars(analytics) if charts and analytics is not None else None)


def render_report(analytics: Mapping[str, Any], *, title: str = "skillhub mask analytics") -> str:
    """A self-contained HTML report of :func:`skillhub.analytics.analyze`'s answer: the heatmap, the per-layer bars
    and the tables, with the stylesheet inlined (no script, no external reference)."""
    multi = len(analytics["skills"]) > 1
    return _env().get_template("report.html").render(
        an=analytics, title=title, css=static_file("dashboard.css").decode(), generated=time.time(),
        heat=heatmap(analytics) if multi else None, bars=bars(analytics) if analytics["skills"] else None,
        palette=colours(list(analytics["skills"])))

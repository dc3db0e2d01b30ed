"""The HTTP API (DESIGN §5): a thin FastAPI layer over :class:`~skillhub.hub.Hub`, served by uvicorn in a thread.

This module owns the app (:func:`create_app`: routes, and error handlers that answer every failed request with a
JSON body ``{"error": "..."}``) and the server (:class:`Server`: uvicorn in a background thread). Every request
passes the :class:`~skillhub.guard.Guard` middleware first: Host header, bearer token (every route but
``GET /healthz`` needs ``Authorization: Bearer <token>``, FAULTS D1), body size, concurrency and timeouts.

``GET /v1/model/weights`` streams the served version as a safetensors file built on the fly, one bounded chunk at a
time (:mod:`skillhub.wire`): the version is taken once, when the request starts, so a publish during the download
never mixes two versions (FAULTS C9).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictInt
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request

from skillhub.dashboard import PUBLIC_PATHS
from skillhub.dashboard.routes import dashboard_router
from skillhub.errors import (
    DiskFullError,
    FollowerError,
    RegistryCorruptError,
    RegistryError,
    SkillhubError,
    printable,
)
from skillhub.guard import Guard, default_allowed_hosts
from skillhub.httpd import Server
from skillhub.inference import HeldOut, Overloaded
from skillhub.log import get_logger
from skillhub.publish import ModelVersion
from skillhub.routing import ROUTES
from skillhub.wire import iter_safetensors, safetensors_header, version_metadata

if TYPE_CHECKING:
    from skillhub.hub import Hub

__all__ = ["PinRequest", "Server", "create_app", "iter_safetensors", "safetensors_header", "version_metadata"]

log = get_logger("skillhub.server")


# --- request bodies -----------------------------------------------------------------------------------------------


class PinRequest(BaseModel):
    """Body of ``POST /v1/skills/{name}/pin``: a version number, or ``null`` to follow the latest READY version."""

    model_config = ConfigDict(extra="forbid")
    version: StrictInt | None


# --- the app ------------------------------------------------------------------------------------------------------


def _not_found(e: SkillhubError) -> bool:
    """Registry errors that mean "no such skill / version" (HTTP 404) rather than a bad request."""
    return isinstance(e, RegistryError) and (e.message.startswith(("unknown skill", "no skill version",
                                                                   "unknown version"))
                                             or " has no version " in e.message)


def create_app(hub: Hub, *, token: str | None, health: Callable[[], dict[str, Any]] | None = None,
               allowed_hosts: list[str] | None = None, receive_timeout: float = 30.0,
               send_timeout: float = 60.0) -> FastAPI:
    """The HTTP API over ``hub`` (a started :class:`~skillhub.hub.Hub`).

    :param token: the bearer token every route but ``/healthz`` requires; ``None`` disables auth (the daemon allows
        that only on a loopback bind).
    :param health: extra fields for ``/healthz`` (e.g. the inbox watch state); an exception in it is reported in the
        body, never as a failed liveness check.
    :param allowed_hosts: host names the ``Host`` header may carry (any port); ``None``: ``127.0.0.1``,
        ``localhost``, ``[::1]`` and ``[serve] host`` (no check when bound to a wildcard address); ``["*"]``: any.
    :param receive_timeout: seconds a client may pause while sending its request body (408 after that).
    :param send_timeout: seconds a client may leave the response unread before the connection is dropped.
    """
    serve = hub.config.serve
    if allowed_hosts is None:
        hosts = default_allowed_hosts(serve.host)
    else:
        hosts = None if "*" in allowed_hosts else allowed_hosts
    app = FastAPI(title="skillhub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub
    app.include_router(inference_router(hub))
    app.state.max_concurrency = serve.max_concurrency

    def observe(route: str, status: int, seconds: float) -> None:
        hub.metrics.requests.labels(route=route, status=str(status)).observe(seconds)

    app.add_middleware(Guard, routes=lambda: app.router.routes, token=token, allowed_hosts=hosts,
                       max_body_bytes=serve.max_body_bytes, max_concurrency=serve.max_concurrency, observe=observe,
                       receive_timeout=receive_timeout, send_timeout=send_timeout, public=PUBLIC_PATHS)

    # --- errors: always JSON, never a traceback ---

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code in (408, 413):
            headers["connection"] = "close"
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ())[1:]) or "body"
            problems.append(f"{loc}: {err.get('msg', 'invalid')}")
        return JSONResponse({"error": "invalid request: " + "; ".join(problems)}, status_code=400)

    @app.exception_handler(SkillhubError)
    async def _skillhub_error(request: Request, exc: SkillhubError) -> Response:
        # 503: the registry is read-only until restored (C5); 507: the state folder's disk is full (C4); 409: a
        # follower (`skillhub run --follow`) changes nothing, the primary does.
        status = 404 if _not_found(exc) else 503 if isinstance(exc, RegistryCorruptError) else \
            507 if isinstance(exc, DiskFullError) else 409 if isinstance(exc, FollowerError) else 400
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        log.error("request_crashed", path=printable(request.url.path), error=f"{type(exc).__name__}: {exc}")
        return JSONResponse({"error": "internal server error"}, status_code=500)

    # --- routes ---

    def health_body() -> dict[str, Any]:
        out: dict[str, Any] = {}
        if health is not None:
            try:
                out.update(health())
            except Exception as e:  # liveness must answer whatever a health probe does
                out["health_error"] = type(e).__name__
        out["status"] = "ok"
        return out

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return health_body()

    app.include_router(dashboard_router(hub, health_body))  # GET / (public: what /healthz shows) and its panels

    @app.get("/readyz")
    def readyz() -> Response:
        current = hub.current
        if current is not None:
            return JSONResponse({"ready": True, "version": current.number})
        reason = "no model version published yet"
        if hub.last_error:
            reason += f"; last error: {hub.last_error}"
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)

    @app.get("/v1/model")
    def model() -> dict[str, Any]:
        return dict(hub.model_view())

    @app.get("/v1/model/weights")
    def weights(skill: str | None = None) -> Response:
        """The served merged model, or (``?skill=NAME``) that skill's own localized model θ₀ + γ⊙τ."""
        version: ModelVersion | None = hub.current  # taken once: the whole download is this version (C9)
        if version is None:
            return JSONResponse({"error": "no model version published yet"}, status_code=503,
                                headers={"retry-after": "1"})
        tensors = version.tensors
        meta, name = version_metadata(version), f"skillhub-v{version.number}"
        if skill is not None:
            if skill not in hub.engine.served_skills(version):
                raise HTTPException(404, f"skill {skill!r} is not in the served model (version {version.number})")
            _, tensors = hub.skill_weights(skill, version)
            meta["skillhub.skill"] = skill
            name += f"-{printable(skill)}"
        # the header needs shapes and dtypes only: the base's, so that no patched tensor is built twice
        prefix, order, data_bytes = safetensors_header(version.tensors, meta)
        headers = {
            "content-length": str(len(prefix) + data_bytes),
            "content-disposition": f'attachment; filename="{name}.safetensors"',
            "x-skillhub-version": str(version.number),
        }
        return StreamingResponse(iter_safetensors(prefix, order, tensors), media_type="application/octet-stream",
                                 headers=headers)

    @app.get("/v1/skills")
    def skills() -> list[dict[str, Any]]:
        return list(hub.skills_view())

    @app.post("/v1/skills/{name}/enable")
    def enable(name: str) -> dict[str, Any]:
        hub.set_enabled(name, True)
        return {"name": name, "enabled": True}

    @app.post("/v1/skills/{name}/disable")
    def disable(name: str) -> dict[str, Any]:
        hub.set_enabled(name, False)
        return {"name": name, "enabled": False}

    @app.post("/v1/skills/{name}/pin")
    def pin(name: str, body: PinRequest) -> dict[str, Any]:
        hub.pin(name, body.version)
        return {"name": name, "pinned": body.version}

    @app.delete("/v1/skills/{name}")
    def remove(name: str) -> dict[str, Any]:
        n = hub.remove(name)
        return {"name": name, "removed_versions": n}

    @app.get("/v1/analytics")
    def analytics(version: int | None = None) -> dict[str, Any]:
        """Mask analytics of the served version (or a kept ``version``): shares per tensor and layer, overlaps."""
        return hub.analytics(version)

    @app.get("/v1/history")
    def history() -> dict[str, Any]:
        return {"versions": hub.history()}

    @app.get("/v1/inbox")
    def inbox() -> dict[str, Any]:
        return hub.inbox()

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(hub.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


# --- inference routes: images in, over HTTP -----------------------------------------------------------------------

MAX_IMAGES_PER_REQUEST = 64
MAX_IMAGE_PIXELS = 40_000_000


def decode_images(raw: list[bytes]) -> list[Any]:
    """Bytes → PIL images, refusing non-images and decompression bombs with a 400 naming the image."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    images = []
    for i, data in enumerate(raw):
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception as e:  # PIL raises many types for bad input
            raise HTTPException(400, f"image {i} is not a readable image ({type(e).__name__})") from None
        images.append(img)
    return images


@dataclass
class ImageRequest:
    """What an inference request sent: the encoded images and its options (form fields, JSON fields or query
    parameters; a JSON/form field wins over the query)."""

    raw: list[bytes]
    top_k: int = 5
    route: str | None = None
    skills: list[str] | None = None


async def read_images(request: Request) -> ImageRequest:
    """Images from a multipart form (fields ``images``/``image``/``file``) or JSON ``{"images": [base64...]}``, and
    the options ``top_k``, ``route`` and ``skills`` (a list, or a comma-separated string)."""
    ctype = request.headers.get("content-type", "")
    fields: dict[str, Any] = dict(request.query_params)
    raw: list[bytes] = []
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        for key, value in form.multi_items():
            if key in ("images", "image", "file") and hasattr(value, "read"):
                raw.append(await value.read())
            elif key in ("top_k", "route", "skills"):
                fields[key] = value
    else:
        try:
            body = await request.json()
            items = body.get("images") if isinstance(body, dict) else None
            if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
                raise ValueError
            raw = [base64.b64decode(s, validate=True) for s in items]
            fields.update({k: body[k] for k in ("top_k", "route", "skills") if k in body})
        except (ValueError, binascii.Error):
            raise HTTPException(400, 'send multipart "images" files, or JSON {"images": ["<base64>", ...]}') from None
    if not raw:
        raise HTTPException(400, "no images in the request")
    if len(raw) > MAX_IMAGES_PER_REQUEST:
        raise HTTPException(413, f"at most {MAX_IMAGES_PER_REQUEST} images per request")
    route = fields.get("route")
    if route is not None and route not in ROUTES:
        raise HTTPException(400, f"route must be one of {', '.join(ROUTES)}, not {route!r}")
    return ImageRequest(raw, max(1, _int(fields.get("top_k", 5))), route, _names(fields.get("skills")))


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HTTPException(400, "top_k must be an integer") from None


def _names(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise HTTPException(400, "skills must be a list of skill names, or a comma-separated string")


def inference_router(hub: Hub) -> APIRouter:
    """The ``predict`` and ``embed`` routes over the hub's inference engine (started on the first request)."""
    router = APIRouter()

    def served() -> ModelVersion:
        version = hub.current  # taken once: the whole request is answered by this version (C9)
        if version is None:
            raise HTTPException(503, "no model version is being served yet")
        return version

    async def embeddings(req: ImageRequest, version: ModelVersion, mask: str | None = None) -> torch.Tensor:
        engine = hub.engine
        images = await run_in_threadpool(decode_images, req.raw)
        batch = await run_in_threadpool(lambda: engine.preprocess(version, images, mask=mask))
        try:
            return await asyncio.wrap_future(engine.submit(version, batch, mask=mask))
        except Overloaded as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None

    def check_skill(version: ModelVersion, name: str, route: str = "merged") -> None:
        if name not in hub.engine.served_skills(version):
            raise HTTPException(404, f"skill {name!r} is not in the served model (version {version.number})")
        try:
            hub.engine.head(version, name, route)
        except SkillhubError as e:
            raise HTTPException(409 if isinstance(e, HeldOut) else 400, e.message) from None

    @router.post("/v1/skills/{name}/predict")
    async def predict(name: str, request: Request) -> dict[str, Any]:
        """One skill's classes for each image, on ``route`` ``skill`` (its own localized model) or ``merged``."""
        version = served()
        req = await read_images(request)
        route = req.route or hub.config.serve.route
        check_skill(version, name, route)
        mask = await run_in_threadpool(hub.engine.route_mask, version, name, route)  # may read the mask file
        emb = await embeddings(req, version, mask)
        return hub.engine.answer(version, name, route, emb, req.top_k)

    @router.post("/v1/predict")
    async def predict_all(request: Request) -> dict[str, Any]:
        """Several skills' classes for each image (``skills``; default: every skill the merged model serves), from
        one forward pass of the merged model."""
        version = served()
        req = await read_images(request)
        if req.route not in (None, "merged"):
            raise HTTPException(400, "POST /v1/predict runs the merged model only; for one skill's own model use "
                                     "POST /v1/skills/{name}/predict?route=skill")
        skills = req.skills if req.skills is not None else sorted(version.manifest["skills"])
        for name in skills:
            check_skill(version, name)
        emb = await embeddings(req, version)
        return hub.engine.predict_many(version, skills, emb, req.top_k)

    @router.post("/v1/embed")
    async def embed(request: Request) -> dict[str, Any]:
        version = served()
        emb = await embeddings(await read_images(request), version)
        return {"version": version.number, "embeddings": emb.tolist()}

    return router

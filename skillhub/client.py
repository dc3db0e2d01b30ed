"""``skillhub.Client``: the HTTP API (DESIGN §5) from Python, for scripts, the CLI and tests.

Every failure (connection refused, timeout, an error status) raises a :class:`~skillhub.errors.SkillhubError`
whose message carries the server's ``error`` text and the HTTP status.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from skillhub.errors import SkillhubError

if TYPE_CHECKING:
    import torch

DEFAULT_URL = "http://127.0.0.1:8750"


class ApiError(SkillhubError):
    """The server answered with an error status; :attr:`status` is the HTTP status code (0: no answer at all)."""

    def __init__(self, message: str, *, status: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class Client:
    """A synchronous client of a running skillhub service. Use it as a context manager, or call :meth:`close`.

    :param base_url: where ``skillhub run`` listens (``[serve] host`` and ``port``).
    :param token: the bearer token (``$SKILLHUB_TOKEN``, or ``state/token`` for a loopback service).
    :param timeout: seconds for connecting and for each read or write.
    """

    def __init__(self, base_url: str = DEFAULT_URL, token: str | None = None, timeout: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # trust_env=False: a proxy from the environment must not intercept calls to a local service (or see its token)
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, trust_env=False)

    # --- life ---

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ---

    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (), **kw: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ApiError(f"{method} {self.base_url}{path} failed: {type(e).__name__}: {e}", status=0,
                           hint="is `skillhub run` running, and is the URL right?") from None
        if response.status_code >= 400 and response.status_code not in ok:
            raise ApiError(f"{method} {path}: HTTP {response.status_code}: {_error_text(response)}",
                           status=response.status_code,
                           hint="set the token ($SKILLHUB_TOKEN or state/token)" if response.status_code == 401
                           else None)
        return response

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        response = self._request(method, path, **kw)
        try:
            return response.json()
        except ValueError:
            raise ApiError(f"{method} {path}: the server did not answer JSON", status=response.status_code) from None

    # --- the API ---

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: liveness (no token needed)."""
        return dict(self._json("GET", "/healthz"))

    def ready(self) -> dict[str, Any]:
        """``GET /readyz``: ``{"ready": true, "version": N}``, or ``{"ready": false, "reason": ...}`` (not an error)."""
        response = self._request("GET", "/readyz", ok=(503,))
        return dict(response.json())

    def model(self) -> dict[str, Any]:
        """``GET /v1/model``: the served version, base fingerprint, skills, overlaps."""
        return dict(self._json("GET", "/v1/model"))

    def skills(self) -> list[dict[str, Any]]:
        """``GET /v1/skills``: every registered skill with its versions and settings."""
        return list(self._json("GET", "/v1/skills"))

    def enable(self, name: str) -> dict[str, Any]:
        return dict(self._json("POST", f"/v1/skills/{_segment(name)}/enable"))

    def disable(self, name: str) -> dict[str, Any]:
        return dict(self._json("POST", f"/v1/skills/{_segment(name)}/disable"))

    def remove(self, name: str) -> dict[str, Any]:
        return dict(self._json("DELETE", f"/v1/skills/{_segment(name)}"))

    def pin(self, name: str, version: int | None) -> dict[str, Any]:
        """Pin ``name`` to ``version`` (rollback), or unpin it with ``None``."""
        return dict(self._json("POST", f"/v1/skills/{_segment(name)}/pin", json={"version": version}))

    def predict(self, skill: str, images: Sequence[bytes | str | Path], top_k: int = 5, *,
                route: str | None = None) -> dict[str, Any]:
        """Classify images (encoded bytes, or paths of image files) with ``skill``.

        Mirrors ``POST /v1/skills/{skill}/predict`` and :meth:`skillhub.hub.Hub.predict`: ``route`` ``"skill"``
        (the skill's own localized model) or ``"merged"`` (the stitched model), default the service's
        ``[serve] route``. The answer names the ``version`` and ``route`` that produced it and, per image, the
        top-k ``{"label", "index", "score"}``.
        """
        data = {"top_k": str(top_k)} | ({"route": route} if route else {})
        return dict(self._json("POST", f"/v1/skills/{_segment(skill)}/predict", files=_files(images), data=data))

    def predict_all(self, images: Sequence[bytes | str | Path], skills: Sequence[str] | None = None,
                    top_k: int = 5) -> dict[str, Any]:
        """Several skills' top-k classes per image (default: every skill the merged model serves), from one forward
        pass of the merged model: ``POST /v1/predict``, :meth:`skillhub.hub.Hub.predict_all`."""
        data = {"top_k": str(top_k)} | ({"skills": ",".join(skills)} if skills is not None else {})
        return dict(self._json("POST", "/v1/predict", files=_files(images), data=data))

    def embed(self, images: Sequence[bytes | str | Path]) -> tuple[int, torch.Tensor]:
        """Normalised image embeddings from the served merged image tower: (version, [N, D])."""
        body = self._json("POST", "/v1/embed", files=_files(images))
        import torch

        return int(body["version"]), torch.tensor(body["embeddings"])

    def weights(self, skill: str | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        """``GET /v1/model/weights``: the served version's number and its full merged state dict, or (``skill``)
        that skill's own localized model θ₀ + γ⊙τ."""
        from safetensors.torch import load

        response = self._request("GET", "/v1/model/weights", params={"skill": skill} if skill else None)
        try:
            version = int(response.headers["x-skillhub-version"])
            return version, load(response.content)
        except Exception as e:  # a missing header, a bad number, a truncated or malformed file
            raise ApiError(f"GET /v1/model/weights: unreadable answer ({type(e).__name__}: {e})",
                           status=response.status_code) from None

    def analytics(self, version: int | None = None) -> dict[str, Any]:
        """``GET /v1/analytics``: the served version's (or kept ``version``'s) mask analytics: per skill its share of
        each tensor and layer, per pair the overlap of their masks (:func:`skillhub.analytics.analyze`)."""
        return dict(self._json("GET", "/v1/analytics", params={"version": version} if version is not None else None))

    def history(self) -> list[dict[str, Any]]:
        """``GET /v1/history``: what each kept version changed, newest first, with the quality gate's decisions."""
        return list(self._json("GET", "/v1/history")["versions"])

    def inbox(self) -> dict[str, Any]:
        """``GET /v1/inbox``: the drops waiting in the inbox and the rejected ones with their reasons."""
        return dict(self._json("GET", "/v1/inbox"))

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus text."""
        return self._request("GET", "/metrics").text


def _files(images: Sequence[bytes | str | Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"image{i}", _image_bytes(img), "application/octet-stream")) for i, img in enumerate(images)]


def _segment(name: str) -> str:
    """A skill name as one URL path segment (a '/' or '?' in a name must not change the route)."""
    from urllib.parse import quote

    return quote(name, safe="")


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return str(body)[:200]


def _image_bytes(image: bytes | str | Path) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()

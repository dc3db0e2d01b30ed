"""The soak's checks (bench/soak.py): the served weights against an independent float64 stitch, the registry
against its mask files, the daemon's RSS slope, ``skillhub doctor``, and the verdicts of the end of a run.

The reference stitch reads mask files with ``safetensors`` directly, not with skillhub's own reader, so a bug there
cannot hide itself.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from soak_service import EXPECTED_ERRORS, Service
from soak_world import REASONS, parse_safetensors_metadata, sha256_path

if TYPE_CHECKING:
    from soak_driver import Driver

WARMUP_FRACTION = 0.2
#: RSS pass rule: the least-squares slope of VmRSS after warm-up stays under RSS_SLOPE_LIMIT MiB/min. Anything this
#: run leaks per version (~35 a minute; the merged tower alone is 1.7 MiB) or per request (~100 a second; a few hundred
#: bytes each) exceeds that many times over. The daemon's RSS moves by ±10-15 MiB from one minute to the next
#: (allocator arenas of its thread pools), so a slope needs RSS_MIN_WINDOW minutes after warm-up to mean anything:
#: shorter runs report the figures without judging them.
RSS_SLOPE_LIMIT = 1.0
RSS_MIN_WINDOW = 3.0


# --- the served weights and the registry ----------------------------------------------------------------------------


def reference_stitch(base: dict[str, torch.Tensor], base_sha: str, masks: list[Path]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """θ₀ + Σ masked τ / max(count, 1) in float64 from mask files read here (not with skillhub's own reader), and
    the per-entry count. Checks each file's format, base fingerprint, shapes and sorted, in-range indices."""
    total: dict[str, torch.Tensor] = {}
    count: dict[str, torch.Tensor] = {}
    for path in masks:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("skillhub.format") != "sparse-delta/1" or meta.get("skillhub.base") != base_sha:
                raise ValueError(f"{path.name}: format {meta.get('skillhub.format')!r} / base "
                                 f"{meta.get('skillhub.base', '')[:12]} is not sparse-delta/1 of this base")
            shapes = json.loads(meta["skillhub.shapes"])
            for key, shape in shapes.items():
                if list(base[key].shape) != list(shape):
                    raise ValueError(f"{path.name}: shape of {key} is {shape}, the base's {list(base[key].shape)}")
            names = set(f.keys())
            for name in sorted(names):
                if not name.endswith("::values"):
                    continue
                key = name[: -len("::values")]
                val = f.get_tensor(name).to(torch.float64)
                if key + "::indices" in names:
                    idx = f.get_tensor(key + "::indices").long()
                else:  # the dense form: values for every entry, the mask is where they are non-zero
                    if val.numel() != base[key].numel():
                        raise ValueError(f"{path.name}: dense values of {key} do not cover the tensor")
                    idx = val.reshape(-1).nonzero().squeeze(1)
                    val = val.reshape(-1)[idx]
                if idx.numel() and (bool((idx[1:] <= idx[:-1]).any()) or int(idx[0]) < 0
                                    or int(idx[-1]) >= base[key].numel() or val.shape != idx.shape):
                    raise ValueError(f"{path.name}: indices of {key} not strictly increasing and in range")
                numel = base[key].numel()
                total.setdefault(key, torch.zeros(numel, dtype=torch.float64)).index_add_(0, idx, val)
                count.setdefault(key, torch.zeros(numel, dtype=torch.int64)).index_add_(
                    0, idx, torch.ones_like(idx))
    merged = {}
    for key, t in base.items():
        if key in total:
            flat = t.reshape(-1).to(torch.float64) + total[key] / count[key].clamp(min=1).to(torch.float64)
            merged[key] = flat.to(t.dtype).reshape(t.shape)
        else:
            merged[key] = t
    return merged, count


def check_weights(client: httpx.Client, base: dict[str, torch.Tensor], base_sha: str, masks_dir: Path
                  ) -> dict[str, Any]:
    """Download the served version; compare it with the reference stitch of its manifest's skills' mask files."""
    resp = client.get("/v1/model/weights")
    resp.raise_for_status()
    data = resp.content
    manifest = json.loads(parse_safetensors_metadata(data)["skillhub.manifest"])
    served = load_safetensors(data)
    version = int(resp.headers["x-skillhub-version"])
    masks = [masks_dir / f"{s['mask']}.mask.safetensors" for s in manifest["skills"].values()]
    missing = [p.name for p in masks if not p.is_file()]
    out: dict[str, Any] = {"version": version, "skills": len(masks)}
    if missing:
        return out | {"ok": False, "why": f"mask files of served skills missing: {missing[:3]}"}
    want, count = reference_stitch(base, base_sha, masks)
    problems = []
    if set(served) != set(want):
        problems.append(f"keys differ: {sorted(set(served) ^ set(want))[:3]}")
    max_diff, differing, entries = 0.0, 0, 0
    for key in sorted(set(served) & set(want)):
        got, ref = served[key], want[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            problems.append(f"{key}: {got.dtype}{list(got.shape)} vs {ref.dtype}{list(ref.shape)}")
            continue
        entries += got.numel()
        if got.is_floating_point():
            diff = (got.double() - ref.double()).abs()
            max_diff = max(max_diff, float(diff.max()) if diff.numel() else 0.0)
            differing += int((got != ref).sum())
        elif not torch.equal(got, ref):
            problems.append(f"{key}: integer tensor differs")
        c = count.get(key)
        idle = (c == 0).reshape(got.shape) if c is not None else torch.ones(got.shape, dtype=torch.bool)
        if not torch.equal(got[idle], base[key][idle]):  # no active mask: exactly θ₀, bit for bit
            problems.append(f"{key}: entries outside every mask are not exactly θ₀")
    if max_diff > 1e-6:
        problems.append(f"max |served - reference| = {max_diff:.3g} > 1e-6")
    covered = sum(int((c > 0).sum()) for c in count.values())
    return out | {"ok": not problems, "max_abs_diff": max_diff, "entries_not_bit_identical": differing,
                  "entries": entries, "covered": covered, "problems": problems[:5]}


def check_registry(state: Path, corrupt_shas: set[str]) -> dict[str, Any]:
    """Every READY row's mask file present and matching its sha256; SQLite integrity; no corrupt drop READY."""
    conn = sqlite3.connect(f"file:{state / 'registry.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        rows = conn.execute("SELECT id, skill, version, status, mask_sha, source_sha FROM versions").fetchall()
    finally:
        conn.close()
    problems = [f"integrity_check: {x}" for x in integrity if x != "ok"]
    ready = [r for r in rows if r[3] == "READY"]
    for rid, skill, version, _, mask_sha, source_sha in ready:
        path = state / "masks" / f"{mask_sha}.mask.safetensors"
        if not mask_sha or not path.is_file():
            problems.append(f"{skill} v{version} (id {rid}) is READY but {path.name} is missing")
        elif sha256_path(path) != mask_sha:
            problems.append(f"{skill} v{version} (id {rid}): {path.name} does not match its sha256")
        if source_sha in corrupt_shas:
            problems.append(f"{skill} v{version} (id {rid}) is READY but was made from a corrupt drop")
    by_status = Counter(r[3] for r in rows)
    return {"ok": not problems, "rows": len(rows), "by_status": dict(by_status), "ready_masks_verified": len(ready),
            "problems": problems[:10]}


# --- the daemon's memory ---------------------------------------------------------------------------------------------


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    mt, mv = sum(t for t, _ in points) / n, sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / var * 60 if var else 0.0


def rss_summary(samples: list[dict[str, float]], warmup_until: float, end: float) -> dict[str, Any]:
    """Least-squares slope (MiB/min) of VmRSS after warm-up, min/max, and the pass rule of :data:`RSS_SLOPE_LIMIT`;
    the same slope for RssAnon and RssFile, and threads and descriptors, to tell what moves."""
    after = [s for s in samples if warmup_until <= s["t"] <= end]
    out: dict[str, Any] = {"samples": len(samples), "warmup_seconds": round(warmup_until, 1),
                           "start_mib": round(samples[0]["rss"], 1) if samples else None,
                           "peak_mib": round(max(s["rss"] for s in samples), 1) if samples else None}
    if len(after) < 5:
        return out | {"ok": False, "judged": False, "why": "too few samples after warm-up"}

    def slope(key: str) -> float:
        return slope_per_min([(s["t"], s.get(key, 0)) for s in after])

    def span(key: str) -> list[float]:
        return [min(s.get(key, 0) for s in after), max(s.get(key, 0) for s in after)]

    rss = slope("rss")
    window_min = (after[-1]["t"] - after[0]["t"]) / 60
    judged = window_min >= RSS_MIN_WINDOW
    low, high = span("rss")
    return out | {
        "judged": judged, "ok": rss <= RSS_SLOPE_LIMIT if judged else True,
        "slope_mib_per_min": round(rss, 3), "window_minutes": round(window_min, 2),
        "min_mib": round(low, 1), "max_mib": round(high, 1),
        "first_mib": round(after[0]["rss"], 1), "last_mib": round(after[-1]["rss"], 1),
        "anon_slope_mib_per_min": round(slope("anon"), 3), "file_slope_mib_per_min": round(slope("file"), 3),
        "threads_after_warmup": span("threads"), "fds_after_warmup": span("fds"),
        "mean_load1": round(sum(s["load"] for s in samples) / len(samples), 2)}


# --- the end of a run ------------------------------------------------------------------------------------------------


def check_doctor(service: Service) -> dict[str, Any]:
    """``skillhub doctor`` on the state folder, as a user would run it."""
    p = service.cli("doctor", timeout=300)
    return {"ok": p.returncode == 0, "rc": p.returncode, "output": (p.stdout + p.stderr).strip()[-1500:]}


@dataclass
class Outcome:
    """What a finished soak leaves to judge and report."""

    driver: Driver
    service: Service
    requests: dict[str, Any]  # Traffic.summary
    rss: dict[str, Any]  # rss_summary
    registry: dict[str, Any]  # check_registry
    doctor: dict[str, Any]  # check_doctor
    alive: bool  # the daemon was still running at the end
    exit_code: int | None  # on SIGTERM
    final_model: dict[str, Any]  # GET /v1/model at the end
    samples: list[dict[str, float]]  # RssSampler.samples
    base: dict[str, torch.Tensor]
    seed: int
    daemon_env: dict[str, str]
    seconds_driven: float
    daemon_cpu_seconds: float
    wall_seconds: float  # of the whole soak, building the model included

    def bad_corrupt(self) -> list[str]:
        """Corrupt drops not rejected, or rejected with a reason that does not name their problem."""
        return [f"{c.kind} {c.name}: {c.reason or 'not rejected'}" for c in self.driver.inbox.corrupt
                if c.resolved is None or not any(w.lower() in c.reason.lower() for w in REASONS[c.kind])]

    def unexpected_errors(self) -> dict[str, int]:
        return {k: v for k, v in self.service.errors.items() if k not in EXPECTED_ERRORS}


def end_checks(o: Outcome) -> list[dict[str, Any]]:
    """The verdicts of a run, each with a one-line detail: what the soak promises (see bench/soak.py)."""
    tr, rss, registry, driver = o.requests, o.rss, o.registry, o.driver
    bad_corrupt, unexpected = o.bad_corrupt(), o.unexpected_errors()
    return [
        {"check": "no failed requests (expected 4xx counted apart)", "ok": tr["failed"] == 0 and tr["ok_200"] > 0,
         "detail": f"{tr['ok_200']} ok, {sum(tr['expected_4xx'].values())} expected 4xx, {tr['failed']} failed"},
        {"check": "every READY mask file present and matching its sha256", "ok": registry["ok"],
         "detail": f"{registry['ready_masks_verified']} READY rows verified; {registry['problems'][:2]}"},
        {"check": "served weights = independent float64 stitch", "ok": all(w["ok"] for w in driver.weights_checks),
         "detail": f"{len(driver.weights_checks)} checks, max |diff| "
                   f"{max((w.get('max_abs_diff', 0) for w in driver.weights_checks), default=0):.3g}"},
        {"check": "every step applied; served skills as expected", "ok": not driver.failures,
         "detail": f"{sum(len(v) for v in driver.actions.values())} steps; {driver.failures[:2]}"},
        {"check": "corrupt drops rejected with a specific reason", "ok": not bad_corrupt,
         "detail": f"{len(driver.inbox.corrupt)} drops; {bad_corrupt[:2]}"},
        {"check": "invalid config edits rejected, daemon kept serving",
         "ok": not any("config edit" in f for f in driver.failures),
         "detail": f"{sum(driver.invalid_edits.values())} edits, {o.service.events['config_rejected']} rejections "
                   "logged"},
        {"check": "RSS flat after warm-up", "ok": bool(rss.get("ok")),
         "detail": (f"slope {rss.get('slope_mib_per_min')} MiB/min (limit {RSS_SLOPE_LIMIT}) over "
                    f"{rss.get('window_minutes')} min, {rss.get('min_mib')}-{rss.get('max_mib')} MiB")
                   + ("" if rss.get("judged") else f"; not judged: under {RSS_MIN_WINDOW:.0f} min after warm-up")},
        {"check": "no unexpected daemon errors; doctor healthy; clean SIGTERM",
         "ok": o.alive and not unexpected and o.doctor["ok"] and o.exit_code == 0,
         "detail": f"alive {o.alive}, unexpected errors {unexpected or 'none'}, doctor rc {o.doctor['rc']}, "
                   f"exit {o.exit_code}"},
    ]

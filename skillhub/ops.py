"""Whole operations on files, as the CLI and the service use them: localize one finetuned checkpoint against a
base (the offline stitch of mask files is :mod:`skillhub.offline`). The CLI is a thin layer over these."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from skillhub.checkpoint import Checkpoint
from skillhub.delta import Provenance, SparseDelta
from skillhub.errors import CheckpointError, SkillhubError
from skillhub.families import ModelFamily, Prepared
from skillhub.fingerprints import fingerprint
from skillhub.localize import LocalizeContext, run_localizer
from skillhub.plugins import Plugins
from skillhub.taskvector import TaskVector, squares_of


@dataclass(frozen=True)
class LocalizeResult:
    delta: SparseDelta
    seconds: float
    checkpoint_bytes: int


def localize_checkpoint(
    base: Checkpoint,
    prepared: Prepared,
    *,
    family: ModelFamily,
    localizer: str,
    params: Mapping[str, Any] | None,
    plugins: Plugins,
    skill: str,
    ctx: LocalizeContext | None = None,
    base_sha: str | None = None,
    source_sha: str | None = None,
    max_relative_delta: float | None = None,
) -> LocalizeResult:
    """Localize a finetuned checkpoint that its family has prepared (:meth:`ModelFamily.prepare`: keys mapped onto
    the base's and validated) with the named strategy.

    :param max_relative_delta: refuse a task vector with ‖τ‖/‖θ₀‖ above this (FAULTS B7, B9): no finetune moves a
        model that far, so it is another base model with the same shapes, or a damaged file.
    """
    t0 = time.perf_counter()
    finetuned = prepared.checkpoint
    # Provenance hashes of files not hashed before run beside the localization (hashlib releases the GIL). The
    # distance check (FAULTS B7, B9) needs ‖τ‖ and ‖θ₀‖ per tensor: ‖τ‖² is recorded by the localizer's own pass
    # over τ (TaskVector.squares; tensors it did not compute are computed after it), and ‖θ₀‖² depends on the base
    # alone, so it is kept per base fingerprint (computed beside the localization the first time). A drop it
    # refuses is refused all the same, after the localization.
    side = ThreadPoolExecutor(2, thread_name_prefix="skillhub-localize-side")
    shas = side.submit(lambda: (base_sha or fingerprint(base), source_sha or fingerprint(finetuned)))
    keys = family.included_keys(base)
    task = TaskVector(base, finetuned, keys, norms=max_relative_delta is not None)
    base_sq: Future[dict[str, float]] | None = None
    if max_relative_delta is not None:
        known = _BASE_SQUARES.get((base_sha, tuple(task.keys))) if base_sha else None
        base_sq = _done(known) if known is not None else side.submit(base_squares, base, task.keys, shas)
    side.shutdown(wait=False)
    try:
        delta = run_localizer(plugins.localizer(localizer), task, params, ctx or LocalizeContext(),
                              Provenance(skill=skill))
    except SkillhubError:
        _check_distance(task, base_sq, max_relative_delta, finetuned)  # "another model" explains a failure best
        raise
    _check_distance(task, base_sq, max_relative_delta, finetuned)
    base_fp, source_fp = shas.result()
    delta = dataclasses.replace(delta, provenance=dataclasses.replace(delta.provenance, base=base_fp,
                                                                      source=source_fp))
    if delta.nnz == 0:
        raise CheckpointError("the task vector is zero: this checkpoint is the base model itself", path=finetuned.path,
                              hint="drop a finetuned checkpoint, not the base")
    return LocalizeResult(delta, time.perf_counter() - t0, finetuned.nbytes)


#: ‖θ₀‖² per included tensor, per (base fingerprint, included keys): the base's side of the distance check
_BASE_SQUARES: dict[tuple[str, tuple[str, ...]], dict[str, float]] = {}


def base_squares(base: Checkpoint, keys: Sequence[str], sha: str | Future[tuple[str, str]] | None = None
                 ) -> dict[str, float]:
    """‖θ₀‖² of each included tensor (:func:`~skillhub.taskvector.squares_of`), computed once per base: kept under the
    base's fingerprint ``sha`` (given, or the first of a pair a future yields), which names its bytes."""
    sq = squares_of(base, keys)
    fp = sha.result()[0] if isinstance(sha, Future) else sha
    if fp:
        _BASE_SQUARES[(fp, tuple(keys))] = sq
    return sq


def _done(value: Any) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(value)
    return f


def _check_distance(task: TaskVector, base_sq: Future[dict[str, float]] | None, limit: float | None,
                    finetuned: Checkpoint) -> None:
    """Refuse a task vector with ‖τ‖/‖θ₀‖ over ``limit``: no finetune moves a model that far."""
    if base_sq is None or limit is None:
        return
    rel = task.relative_norm(base_sq.result())
    if rel > limit:
        raise CheckpointError(
            f"the finetune is {rel:.3g}× the base's norm away from it (‖τ‖/‖θ₀‖ over the merged tensors; a "
            f"finetune stays well under {limit:g}): it looks like another base model with the same shapes, or a "
            "damaged file", path=finetuned.path,
            hint="drop a finetune of the configured base; if it really is one, raise [localize] max_relative_delta")

"""Whole operations on files, as the CLI and the service use them: localize one finetuned checkpoint against a
base, and stitch mask files offline. The CLI is a thin layer over these."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skillhub.checkpoint import Checkpoint, fingerprint, open_checkpoint
from skillhub.delta import Provenance, SparseDelta
from skillhub.errors import CheckpointError, SkillhubError, StitchError
from skillhub.families import ModelFamily, Prepared
from skillhub.localize import LocalizeContext, run_localizer
from skillhub.modelfolder import Shard, layout_of, write_model
from skillhub.plugins import Plugins
from skillhub.publish import finite
from skillhub.stitch import Stitcher, StitchPolicy
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


#: entries per piece of the offline stitch (:func:`stitch_tensor`): the stitcher's state for 2M entries stays at
#: some 30 MB whatever the tensor (a 128k×4096 embedding is 256 pieces)
PIECE = 1 << 21

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


def stitch_masks(
    base_path: str | Path,
    mask_paths: Sequence[str | Path],
    out: str | Path,
    *,
    policy: StitchPolicy,
    device: str = "auto",
    check_base: bool = True,
    progress: Callable[[int, int], None] | None = None,
    piece: int = PIECE,
) -> dict[str, Any]:
    """Offline merge: θ₀ (every tensor of the base) with the masks stitched in, written to ``out`` in the layout of
    the base (:mod:`skillhub.modelfolder`): a single file for a single-file base; for a base folder, a folder of the
    same shards under the base's tensor names, with the index and the config and tokenizer files, which
    ``transformers.AutoModel.from_pretrained(out)`` loads.

    It streams: the masks are read (and checked) first, then each output shard is written tensor by tensor, each
    merged tensor computed by :func:`stitch_tensor` (a :class:`~skillhub.stitch.Stitcher` per piece of at most
    ``piece`` entries, with the masks' entries there: the policy's own arithmetic, so the bytes are those of the
    service's stitch, with its default float64 accumulators), and each base tensor's mapped pages are given back
    once it is written. Peak memory is the masks plus the largest tensor plus one piece's stitcher state, not the
    model nor a shard. ``progress`` is called once per shard written.
    A policy with model-wide state (:func:`tensor_local`) is stitched over every included tensor at once instead.

    Masks must be made for this base: their ``skillhub.base`` fingerprint is checked unless ``check_base`` is False.
    Returns the manifest that is also written into the output's header metadata (``skillhub.manifest``).
    """
    base = open_checkpoint(base_path)
    base_sha = fingerprint(base)
    deltas: dict[str, SparseDelta] = {}
    for i, p in enumerate(mask_paths):
        d = SparseDelta.load(p)
        if check_base and d.provenance.base and d.provenance.base != base_sha:
            raise StitchError(f"mask was made for base {d.provenance.base[:12]}…, not this base ({base_sha[:12]}…)",
                              path=p, hint="localize the skill against this base, or pass the right --base")
        name = d.provenance.skill or Path(p).name
        if name in deltas:
            name = f"{name}#{i}"
        deltas[name] = d
    if not deltas:
        raise StitchError("no mask files given", hint="pass one or more *.mask.safetensors files")
    shapes = next(iter(deltas.values())).shapes
    for name, d in deltas.items():
        if d.shapes != shapes:
            raise StitchError(f"mask {name!r} covers other tensors than the first mask", key=name,
                              hint="all masks must come from the same base model and family")
    missing = [k for k in shapes if k not in base]
    if missing:
        raise StitchError(f"masks cover tensors the base lacks: {missing[:5]}", key=missing[0])
    for k, shape in shapes.items():
        if tuple(base[k].shape) != tuple(shape):
            raise StitchError(f"masks give {k!r} the shape {list(shape)}, the base {list(base[k].shape)}", key=k,
                              hint="the masks were made for another base model")
    manifest = {
        "base": base_sha,
        "policy": policy.name,
        "policy_params": policy.params.model_dump(mode="json"),
        "skills": {n: {"source": d.provenance.source, "strategy": d.provenance.strategy, "nnz": d.nnz}
                   for n, d in deltas.items()},
        "created": time.time(),
    }
    whole = None if tensor_local(policy) else Stitcher({k: base.tensor(k) for k in shapes}, policy, device=device)
    if whole is not None:
        for name, d in deltas.items():
            whole.add(name, d)

    def produce(key: str) -> torch.Tensor:
        if key not in shapes:
            return base.tensor(key)
        merged = whole.tensor(key) if whole is not None else \
            stitch_tensor(key, base.tensor(key), deltas, policy, device=device, piece=piece)
        if finite({key: merged}) is not None:
            raise StitchError(f"stitching produced NaN or Inf in {key!r}", key=key)
        return merged

    def tensor_done(key: str) -> None:
        f, raw = base.locate(key)
        f.evict(raw)  # its mapped pages leave this process: the base is never resident beyond a tensor

    layout = layout_of(base)
    done = [0]

    def shard_done(shard: Shard) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], len(layout.shards))

    layouts = {k: torch.empty(base[k].shape, dtype=base[k].dtype, device="meta") for k in base}
    write_model(Path(out), layout, layouts, produce, {"skillhub.manifest": json.dumps(manifest, sort_keys=True)},
                shard_done=shard_done, tensor_done=tensor_done)
    return manifest


def tensor_local(policy: StitchPolicy) -> bool:
    """Whether ``policy``'s merged value at an entry depends on that entry's accumulators alone, so that a tensor
    (or a shard) can be stitched without the rest of the model. A policy says so with a ``tensor_local`` attribute;
    without one, a policy that keeps a model-wide quantity (it overrides ``settle``, as TIES's ``majority`` zero
    sign needs) is taken as not local, except TIES-like policies whose params say they keep none."""
    declared = getattr(policy, "tensor_local", None)
    if declared is not None:
        return bool(declared)
    if type(policy).settle is StitchPolicy.settle:
        return True
    return getattr(policy.params, "zero_sign", "majority") != "majority"


def stitch_tensor(key: str, base: torch.Tensor, deltas: Mapping[str, SparseDelta], policy: StitchPolicy, *,
                  device: str = "auto", piece: int = PIECE) -> torch.Tensor:
    """One merged tensor, stitched a piece of at most ``piece`` flat entries at a time: a
    :class:`~skillhub.stitch.Stitcher` over that piece of θ₀ with each delta's entries in it (:func:`part_of`), so
    the stitcher's accumulators never exceed one piece. Only for a :func:`tensor_local` policy, whose merged entries
    depend on their own accumulators alone: the result is then the whole-model stitcher's, bit for bit."""
    flat = base.reshape(-1)
    n = flat.numel()
    out: torch.Tensor | None = None
    for start in range(0, max(n, 1), piece):
        stop = min(n, start + piece)
        st = Stitcher({key: flat[start:stop]}, policy, device=device)
        for name, d in deltas.items():
            part = part_of(d, key, start, stop)
            if part is not None:
                st.add(name, part)
        merged = st.tensor(key)
        if start == 0 and stop == n:
            return merged.reshape(base.shape)
        if out is None:
            out = torch.empty(n, dtype=base.dtype)
        out[start:stop] = merged.to("cpu")
    assert out is not None
    return out.reshape(base.shape)


def part_of(delta: SparseDelta, key: str, start: int, stop: int) -> SparseDelta | None:
    """``delta``'s entries of tensor ``key`` within flat positions [start, stop), as a delta over that piece alone
    (shape ``(stop - start,)``, indices shifted to it), or ``None`` when it has none there. Views, no copy, but the
    shifted indices."""
    shape = {key: (stop - start,)}
    dtypes = {key: delta.dtypes[key]} if key in delta.dtypes else {}
    if key in delta.indices:
        idx, vals = delta.indices[key], delta.values[key]
        lo, hi = (int(i) for i in torch.searchsorted(idx, torch.tensor([start, stop], dtype=idx.dtype)))
        if hi == lo:
            return None
        return SparseDelta({key: idx[lo:hi] - start}, {key: vals[lo:hi]}, shape, dtypes, delta.provenance)
    if key in delta.values:
        return SparseDelta({}, {key: delta.values[key][start:stop]}, shape, dtypes, delta.provenance)
    return None

"""The offline ``skillhub stitch``: mask files stitched into a base model and written in its layout, in memory
bounded by one tensor, not by the model, a shard or the masks.

It imports only what that needs (the checkpoint and mask readers, the :class:`~skillhub.stitch.Stitcher`, the
model folder writer): no model family, no localization, no registry or logging, so that the command's interpreter
is torch and little more (``tests/test_offline.py`` keeps it so).

The masks are checked up front from their headers (:class:`~skillhub.delta.MaskFile`: format, metadata, tensor
names, dtypes and shapes; the base they were made for; the same tensors in every mask, all in the base with its
shapes), then each output tensor is stitched from that tensor's entries of every mask, read from the mapped mask
files as it comes and given back once written. What only the values tell (a mask's indices out of order or out of
range; NaN or Inf in a merged tensor) is found when that tensor is reached: the error names the file and the key,
and nothing is left behind, because a folder output is written into a hidden sibling and moved into place only once
complete (:func:`~skillhub.modelfolder.write_model_staged`; a single file is written atomically anyway).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from skillhub.checkpoint import Checkpoint, open_checkpoint
from skillhub.delta import MaskFile, SparseDelta
from skillhub.errors import StitchError
from skillhub.fingerprints import fingerprint
from skillhub.modelfolder import Shard, finite, layout_of, write_model_staged
from skillhub.stitch import Stitcher, StitchPolicy

#: entries per piece of the offline stitch (:func:`stitch_tensor`): the stitcher's state for 2M entries stays at
#: some 30 MB whatever the tensor (a 128k×4096 embedding is 256 pieces)
PIECE = 1 << 21


def open_masks(base: Checkpoint, mask_paths: Sequence[str | Path], *, check_base: bool = True
               ) -> dict[str, MaskFile]:
    """Open every mask file and check it against ``base`` from its header alone (see the module docstring):
    skill name → mask file, a second mask of the same name becoming ``NAME#i``."""
    masks: dict[str, MaskFile] = {}
    base_sha = fingerprint(base) if check_base else ""
    for i, p in enumerate(mask_paths):
        m = MaskFile(p)
        if check_base and m.provenance.base and m.provenance.base != base_sha:
            raise StitchError(f"mask was made for base {m.provenance.base[:12]}…, not this base ({base_sha[:12]}…)",
                              path=p, hint="localize the skill against this base, or pass the right --base")
        name = m.provenance.skill or Path(p).name
        if name in masks:
            name = f"{name}#{i}"
        masks[name] = m
    if not masks:
        raise StitchError("no mask files given", hint="pass one or more *.mask.safetensors files")
    shapes = next(iter(masks.values())).shapes
    for name, m in masks.items():
        if m.shapes != shapes:
            raise StitchError(f"mask {name!r} covers other tensors than the first mask", path=m.path, key=name,
                              hint="all masks must come from the same base model and family")
    missing = [k for k in shapes if k not in base]
    if missing:
        raise StitchError(f"masks cover tensors the base lacks: {missing[:5]}", key=missing[0])
    for k, shape in shapes.items():
        if tuple(base[k].shape) != tuple(shape):
            raise StitchError(f"masks give {k!r} the shape {list(shape)}, the base {list(base[k].shape)}", key=k,
                              hint="the masks were made for another base model")
    return masks


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

    It streams (module docstring): each output shard is written tensor by tensor, each merged tensor computed by
    :func:`stitch_tensor` from that tensor's entries of every mask (a :class:`~skillhub.stitch.Stitcher` per piece
    of at most ``piece`` entries: the policy's own arithmetic, so the bytes are those of the service's stitch, with
    its default float64 accumulators); the base's and the masks' mapped pages are given back as soon as a piece or a
    tensor is done. Peak memory is the largest merged tensor plus one piece's stitcher state plus one tensor's mask
    entries. The manifest's mask sizes come from the headers too (a dense-form tensor's by counting its values, one
    tensor at a time). ``progress`` is called once per shard written. A policy with model-wide state
    (:func:`tensor_local`) is stitched over every included tensor at once instead, with the masks read whole.

    Masks must be made for this base: their ``skillhub.base`` fingerprint is checked unless ``check_base`` is False.
    Returns the manifest that is also written into the output's header metadata (``skillhub.manifest``).
    """
    base = open_checkpoint(base_path)
    masks = open_masks(base, mask_paths, check_base=check_base)
    shapes = next(iter(masks.values())).shapes
    manifest = {
        "base": fingerprint(base),
        "policy": policy.name,
        "policy_params": policy.params.model_dump(mode="json"),
        "skills": {n: {"source": m.provenance.source, "strategy": m.provenance.strategy, "nnz": m.nnz()}
                   for n, m in masks.items()},
        "created": time.time(),
    }
    whole = None
    if not tensor_local(policy):
        whole = Stitcher({k: base.tensor(k) for k in shapes}, policy, device=device)
        for name, m in masks.items():
            whole.add(name, m.delta())

    def produce(key: str) -> torch.Tensor:
        if key not in shapes:
            return base.tensor(key)
        if whole is not None:
            merged = whole.tensor(key)
        else:
            f, raw = base.locate(key)
            parts = {name: m.delta((key,), copy=False) for name, m in masks.items()}
            merged = stitch_tensor(key, base.tensor(key), parts, policy, device=device, piece=piece,
                                   piece_done=lambda start, stop: f.evict(raw, (start, stop)))
        if finite({key: merged}) is not None:
            raise StitchError(f"stitching produced NaN or Inf in {key!r}", key=key,
                              hint="a mask or the base holds NaN or Inf there; nothing was written")
        return merged

    def tensor_done(key: str) -> None:
        f, raw = base.locate(key)
        f.evict(raw)  # its mapped pages leave this process: the base is never resident beyond a tensor
        for m in masks.values():
            m.evict(key)

    layout = layout_of(base)
    done = [0]

    def shard_done(shard: Shard) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], len(layout.shards))

    layouts = {k: torch.empty(base[k].shape, dtype=base[k].dtype, device="meta") for k in base}
    write_model_staged(Path(out), layout, layouts, produce, {"skillhub.manifest": json.dumps(manifest, sort_keys=True)},
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
                  device: str = "auto", piece: int = PIECE,
                  piece_done: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """One merged tensor, stitched a piece of at most ``piece`` flat entries at a time: a
    :class:`~skillhub.stitch.Stitcher` over that piece of θ₀ with each delta's entries in it (:func:`part_of`), so
    the stitcher's accumulators never exceed one piece. Only for a :func:`tensor_local` policy, whose merged entries
    depend on their own accumulators alone: the result is then the whole-model stitcher's, bit for bit.
    ``piece_done(start, stop)`` is called once a piece of θ₀ is no longer needed (to give its pages back)."""
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
        del st, merged
        if piece_done is not None:
            piece_done(start, stop)
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

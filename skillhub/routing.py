"""Skill-routed inference: a request that names its skill is answered by that skill's own localized model,
θ₀ + γₜ⊙τₜ, with no interference from the other skills.

Nothing model-sized is built per skill or per request. One runnable copy of θ₀ (:class:`SkillPatcher`) has the
mask's values written into it when a batch of that skill comes up, and the base's values written back when another
skill's batch does: a switch costs O(mask) (a gather, an add and a scatter per masked tensor), the same order as one
stitcher add. The inference worker runs batches one at a time on one thread, so one copy is enough and needs no
lock; the batcher groups queued images by (version, route, skill) so one switch serves a whole batch.

The masks themselves are read from the registry's mask files and kept in a small LRU cache bounded in bytes
(``[serve] skill_cache_mb``): a skill used often never re-reads its file.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from skillhub.errors import StitchError

if TYPE_CHECKING:
    import torch

    from skillhub.delta import SparseDelta
    from skillhub.families import Runtime

ROUTES = ("skill", "merged")


def check_route(route: str) -> str:
    """``route`` if it is one of :data:`ROUTES`, else a :class:`StitchError` naming the field."""
    if route not in ROUTES:
        raise StitchError(f"unknown route {route!r}", key="route", hint=f"use one of: {', '.join(ROUTES)}")
    return route


def route_key(mask_sha: str, statistics_sha: str | None = None) -> str:
    """What the skill route patches in: a mask, or a mask with the normalization statistics the quality gate
    re-estimated on the skill's own model (``<mask>+<statistics>``; :func:`with_statistics`)."""
    return f"{mask_sha}+{statistics_sha}" if statistics_sha else mask_sha


def split_route_key(key: str) -> tuple[str, str | None]:
    """The mask and the statistics (or ``None``) a :func:`route_key` names."""
    mask, _, stats = key.partition("+")
    return mask, stats or None


def with_statistics(delta: SparseDelta, base: Mapping[str, torch.Tensor],
                    statistics: Mapping[str, torch.Tensor]) -> SparseDelta:
    """``delta`` with the tensors of ``statistics`` set to those values on θ₀ (``base``): each becomes a dense entry
    holding new − θ₀, replacing what the mask had there, so that patching the result into θ₀ gives the model the
    statistics were estimated for with the statistics in place."""
    from dataclasses import replace

    indices, values = dict(delta.indices), dict(delta.values)
    shapes, dtypes = dict(delta.shapes), dict(delta.dtypes)
    for key, new in statistics.items():
        if key not in base:
            raise StitchError(f"recalibrated statistics name tensor {key!r}, which θ₀ does not have", key=key)
        b = base[key]
        indices.pop(key, None)
        values[key] = (new.to(b.dtype) - b).reshape(-1)
        shapes[key], dtypes[key] = tuple(b.shape), b.dtype
    return replace(delta, indices=indices, values=values, shapes=shapes, dtypes=dtypes)


class SkillPatcher:
    """One runnable copy of θ₀ with at most one skill's γ⊙τ patched in at a time.

    :param runtime: a runnable model built from θ₀ (the family's ``runtime`` on the base's tensors); it becomes this
        patcher's own: nothing else may run or change it.

    Not thread-safe by design: only the inference worker's thread calls :meth:`use`.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        runtime.pack()  # when it can, the model's tensors become views of one buffer: a switch is then one scatter
        self._live = runtime.tensors()
        self._buffer, self._offsets = _one_buffer(self._live)
        self._global: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # mask -> (index, values)
        # key -> (flat indices or None for a dense tensor, the base's values there): what restore() writes back
        self._saved: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._saved_buffer: tuple[torch.Tensor, torch.Tensor] | None = None
        self.current: str | None = None  # the mask (sha256) patched in now
        self.switches = 0

    def use(self, mask_sha: str, delta: SparseDelta) -> Runtime:
        """The runnable model θ₀ + γ⊙τ of the mask ``mask_sha`` (``delta`` is its content)."""
        if self.current == mask_sha:
            return self.runtime
        import torch

        self.restore()
        packed = self._packed(mask_sha, delta)
        with torch.no_grad():
            if packed is not None and self._buffer is not None:  # one gather, one add, one scatter
                idx, values = packed
                old = self._buffer[idx]
                self._buffer[idx] = old + values
                self._saved_buffer = (idx, old)
                self.current = mask_sha
                self.switches += 1
                return self.runtime
            for key, values in delta.values.items():
                target = self._live.get(key)
                if target is None:
                    raise StitchError(f"the mask names tensor {key!r}, which the served model does not have", key=key)
                flat = target.view(-1)  # parameters are contiguous; view() raises rather than patch a copy
                values = values.to(device=flat.device, dtype=flat.dtype)
                if key in delta.indices:
                    idx = delta.indices[key].to(device=flat.device, dtype=torch.long)
                    old = flat[idx]  # a copy (advanced indexing)
                    flat[idx] = old + values
                    self._saved[key] = (idx, old)
                else:  # dense form: zeros outside the mask add nothing
                    self._saved[key] = (None, flat.clone())
                    flat.add_(values)
        self.current = mask_sha
        self.switches += 1
        return self.runtime

    def restore(self) -> None:
        """Write θ₀ back where a skill was patched in (bit-exact: the saved values, not a subtraction)."""
        import torch

        with torch.no_grad():
            if self._saved_buffer is not None and self._buffer is not None:
                self._buffer[self._saved_buffer[0]] = self._saved_buffer[1]
                self._saved_buffer = None
            for key, (idx, old) in self._saved.items():
                flat = self._live[key].view(-1)
                if idx is None:
                    flat.copy_(old)
                else:
                    flat[idx] = old
        self._saved.clear()
        self.current = None


    def _packed(self, mask_sha: str, delta: SparseDelta) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The mask as one index array into the model's one buffer, and its values there (made once per mask; the
        last few are kept); ``None`` when the model has no one buffer holding every tensor the mask names."""
        if self._buffer is None or any(k not in self._offsets for k in delta.values):
            return None
        if mask_sha in self._global:
            self._global.move_to_end(mask_sha)
            return self._global[mask_sha]
        import torch

        buf = self._buffer
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for key, values in delta.values.items():
            if key in delta.indices:
                idx = delta.indices[key].to(device=buf.device, dtype=torch.long)
            else:  # dense form: the masked entries are the non-zero values
                idx = values.nonzero().reshape(-1).to(buf.device)
                values = values[idx.to(values.device)]
            parts.append((idx + self._offsets[key], values.to(device=buf.device, dtype=buf.dtype)))
        packed = (torch.cat([i for i, _ in parts]), torch.cat([v for _, v in parts])) if parts else \
            (torch.zeros(0, dtype=torch.long, device=buf.device), torch.zeros(0, dtype=buf.dtype, device=buf.device))
        self._global[mask_sha] = packed
        while len(self._global) > PACKED_KEPT:
            self._global.popitem(last=False)
        return packed


def _one_buffer(live: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor | None, dict[str, int]]:
    """The one storage most of ``live``'s floating tensors are contiguous views of, as a flat tensor, and each such
    tensor's offset in it; ``(None, {})`` when no storage holds more than one of them."""
    import torch

    groups: dict[tuple[int, torch.dtype], list[str]] = {}
    for key, t in live.items():
        if t.is_floating_point() and t.is_contiguous():
            groups.setdefault((t.untyped_storage().data_ptr(), t.dtype), []).append(key)
    if not groups:
        return None, {}
    keys = max(groups.values(), key=len)
    if len(keys) < 2:
        return None, {}
    first = live[keys[0]]
    buffer = torch.empty(0, dtype=first.dtype, device=first.device).set_(first.untyped_storage())
    return buffer, {k: live[k].storage_offset() for k in keys}


PACKED_KEPT = 8  # masks kept in their one-buffer form (each: int64 indices and values of its entries)


class MaskCache:
    """Mask files by sha256, read once and kept while they fit in ``max_bytes`` (least recently used leaves first).

    :param load: reads a mask file by its sha256 (the registry's ``load_mask``).
    """

    def __init__(self, load: Callable[[str], SparseDelta], max_bytes: int) -> None:
        self._load, self.max_bytes = load, max_bytes
        self._items: OrderedDict[str, SparseDelta] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, sha: str) -> SparseDelta:
        with self._lock:
            delta = self._items.get(sha)
            if delta is not None:
                self._items.move_to_end(sha)
                return delta
        delta = self._load(sha)  # outside the lock: a read of one file must not stall the others' hits
        with self._lock:
            if sha not in self._items:
                self._items[sha] = delta
                self._bytes += delta.nbytes
                while self._bytes > self.max_bytes and len(self._items) > 1:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
        return delta

    def __len__(self) -> int:
        return len(self._items)


class PatchedTensors(Mapping[str, "torch.Tensor"]):
    """θ₀ + γ⊙τ as a read-only mapping built one tensor at a time when read (the weights download of one skill
    streams through it, holding one patched tensor at a time rather than a copy of the model)."""

    def __init__(self, base: Mapping[str, torch.Tensor], delta: SparseDelta) -> None:
        self._base, self._delta = base, delta

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._base[key]
        if self._delta.nnz_of(key) == 0:
            return t
        if self._delta.is_dense(key):  # zeros outside the mask add nothing
            return t + self._delta.dense(key, t.dtype).to(t.device)
        return _patched(t, self._delta, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


def _patched(t: torch.Tensor, delta: SparseDelta, key: str) -> torch.Tensor:
    import torch

    out = t.detach().to(copy=True).reshape(-1)
    idx = delta.indices[key].to(device=out.device, dtype=torch.long)
    out[idx] += delta.values[key].to(device=out.device, dtype=out.dtype)
    return out.reshape(t.shape)

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


class SkillPatcher:
    """One runnable copy of θ₀ with at most one skill's γ⊙τ patched in at a time.

    :param runtime: a runnable model built from θ₀ (the family's ``runtime`` on the base's tensors); it becomes this
        patcher's own: nothing else may run or change it.

    Not thread-safe by design: only the inference worker's thread calls :meth:`use`.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._live = runtime.tensors()
        # key -> (flat indices or None for a dense tensor, the base's values there): what restore() writes back
        self._saved: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.current: str | None = None  # the mask (sha256) patched in now
        self.switches = 0

    def use(self, mask_sha: str, delta: SparseDelta) -> Runtime:
        """The runnable model θ₀ + γ⊙τ of the mask ``mask_sha`` (``delta`` is its content)."""
        if self.current == mask_sha:
            return self.runtime
        import torch

        self.restore()
        with torch.no_grad():
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
            for key, (idx, old) in self._saved.items():
                flat = self._live[key].view(-1)
                if idx is None:
                    flat.copy_(old)
                else:
                    flat[idx] = old
        self._saved.clear()
        self.current = None


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

"""Stitching: combine the sparse deltas of the active skills into merged weights, incrementally.

Localize-and-Stitch (He et al., arXiv 2408.13656, §3.2): θ = θ₀ + Σₜ γₜ⊙τₜ / max(Σₜ γₜ, 1). Where masks overlap
the tasks' values are averaged; entries in no mask stay exactly θ₀; there is no scaling factor.

The :class:`Stitcher` keeps, per included tensor and on its device, the merged tensor (in the base dtype: the one
full copy of the model it holds) and the state it is computed from: θ₀, the per-entry mask count C = Σₜ γₜ and
the policy's accumulators (for ``average``, Σ = Σₜ γₜ⊙τₜ). :mod:`skillhub.stitchstate` keeps them dense, or only
where masks are, in sorted runs; or (``derived``, :mod:`skillhub.stitchderive`, the service's choice for big
models) not at all: they are recomputed from the masks the stitcher keeps anyway, at the entries a change touches.
Adding or removing a skill updates the state at that skill's indices and recomputes the merged entries there
only, so its cost follows the mask, not the model (DESIGN §2).

A tensor in the *dense* form (:class:`~skillhub.delta.SparseDelta`: values for every entry, no indices; what
``localize --sparsity 1`` makes) turns the tensor's accumulators dense and is added with whole-tensor operations
when the policy supports it (``whole_tensor``; :mod:`skillhub.stitchdense`); its merged tensor is recomputed when
next read. The arithmetic is the same on every path, entry for entry, so the result does not depend on the form
or the order of the adds.

Accumulators are float64 by default: sums of a few float32 values are exact in float64, so an add followed by a
remove restores the stored accumulators bit for bit (the derived layout stores none: every change is a stitch
from scratch of its entries). Where the count returns to 0 the merged entry is θ₀ exactly, whatever the dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from skillhub.delta import SparseDelta, index_dtype
from skillhub.errors import StitchError
from skillhub.stitchcow import Versions
from skillhub.stitchdense import CHUNK, apply_dense, recompute_dense
from skillhub.stitchderive import Entries, change, derive, sources, union
from skillhub.stitchderive import counts as derived_counts
from skillhub.stitchfinite import NonFinite
from skillhub.stitchlayout import dense_share_for, resolve_device, service_layout
from skillhub.stitchpolicy import Index, ScaleParams, StitchPolicy, zero_at
from skillhub.stitchstate import DENSE_SHARE, Segment, TensorState, count_dtype

__all__ = ["CHUNK", "COUNT_MAX", "Index", "ScaleParams", "StitchPolicy", "Stitcher", "count_dtype", "dense_share_for",
           "resolve_device", "service_layout", "stitch", "zero_at"]

if TYPE_CHECKING:
    import torch


COUNT_MAX = 2**15 - 1  # torch.iinfo(count_dtype()).max, without importing torch


class Stitcher:
    """Incremental stitcher over the included tensors of one base model.

    :param base: θ₀ for every included tensor (``{key: tensor}``); copied to ``device``.
    :param policy: the stitch policy (``average`` is Localize-and-Stitch).
    :param device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:1"``...
    :param accumulate: accumulator dtype; float64 (default) makes add/remove cycles drift-free.
    :param dense_share: covered share of a tensor from which its accumulators are kept dense
        (:mod:`skillhub.stitchstate`); 0 keeps every tensor dense from the start, above 1 keeps them sparse unless a
        dense-form mask arrives.
    :param derived: keep no sparse accumulators: recompute them from the kept masks at the entries each change
        touches, and read θ₀ there from ``base``, which must then not change while the stitcher lives
        (:mod:`skillhub.stitchderive`). Every delta is then kept, ``removable`` or not. Ignored when
        ``dense_share`` is 0 (dense from the start).
    """

    def __init__(self, base: Mapping[str, torch.Tensor], policy: StitchPolicy, *, device: str | torch.device = "auto",
                 accumulate: torch.dtype | None = None, dense_share: float = DENSE_SHARE,
                 derived: bool = False) -> None:
        import torch

        accumulate = torch.float64 if accumulate is None else accumulate
        self.device = resolve_device(device)
        self.policy = policy
        self.accumulate = accumulate
        self.derived = derived and dense_share > 0
        self._state = {k: TensorState(t, policy, self.device, accumulate, dense_share, self.derived)
                       for k, t in base.items()}
        self._tasks: dict[str, SparseDelta | None] = {}  # None: added for good
        self._for_good: set[str] = set()  # derived layout: added for good, yet kept (the state is the masks)
        self._covered = 0
        self._overlapping = 0
        # Copy on write: a merged tensor handed out by snapshot() belongs to a published version and is never
        # written again; the next change to it writes a copy, made beforehand when prepare() ran.
        self._versions = Versions()
        self._writable = self._versions.writable
        # Non-finite merged entries per tensor, kept as entries change, so the smoke check of a new version
        # (nonfinite()) costs O(changed entries), not a pass over the model.
        self._finite = NonFinite(self._state.values())

    @property
    def keys(self) -> list[str]:
        return list(self._state)

    @property
    def active(self) -> list[str]:
        """Ids of the skills currently stitched in, in the order they were added."""
        return list(self._tasks)

    def check(self, delta: SparseDelta) -> None:
        """Raise :class:`StitchError` unless ``delta`` fits this base (keys and shapes)."""
        for key, shape in delta.shapes.items():
            if key not in self._state:
                raise StitchError(f"mask covers tensor {key!r}, which the base does not include", key=key,
                                  hint="the mask was made for another base model or family")
            if tuple(shape) != self._state[key].shape:
                raise StitchError(f"mask shape {list(shape)} for {key!r} differs from the base's "
                                  f"{list(self._state[key].shape)}", key=key)

    def add(self, task_id: str, delta: SparseDelta, *, removable: bool = True) -> None:
        """Stitch one skill in; cost O(its mask). The stitcher keeps ``delta`` to take it out again; a one-shot
        merge that never removes passes ``removable=False`` and the delta is not kept (for task arithmetic's dense
        masks, a model's worth of memory per skill)."""
        if task_id in self._tasks:
            raise StitchError(f"skill {task_id!r} is already stitched in", key=task_id)
        self.check(delta)
        delta = delta.to(self.device)
        if len(self._tasks) >= COUNT_MAX:  # a count never exceeds the number of skills in: only then look
            for key in delta.values:
                if int(self.count(key).max()) >= COUNT_MAX:
                    raise StitchError(f"more than {COUNT_MAX} masks overlap in {key!r}", key=key)
        done: list[str] = []
        try:
            self._apply(task_id, delta, +1, done)
        except BaseException:
            # All or nothing (FAULTS C8): a device running out of memory half-way must not leave half a skill in.
            self._apply(task_id, delta, -1, keys=done)
            raise
        self._tasks[task_id] = delta if removable or self.derived else None
        if not removable and self.derived:
            self._for_good.add(task_id)
        self._settle()

    def remove(self, task_id: str) -> SparseDelta:
        """Take one skill out; cost O(its mask). Entries no mask covers any more become exactly θ₀."""
        if task_id not in self._tasks:
            raise StitchError(f"skill {task_id!r} is not stitched in", key=task_id)
        if self._tasks[task_id] is None or task_id in self._for_good:
            raise StitchError(f"skill {task_id!r} was stitched in for good (removable=False)", key=task_id)
        delta = self._tasks[task_id]
        assert delta is not None
        self._apply(task_id, delta, -1)
        del self._tasks[task_id]
        self._settle()
        return delta

    def _settle(self) -> None:
        for key in self.policy.settle({k: st.settle_view() for k, st in self._state.items()}):
            self._state[key].stale = True

    def _sources(self, key: str, st: TensorState, skip: str | None = None,
                 last: SparseDelta | None = None) -> list[Entries]:
        """The kept masks' entries of ``key`` in the order the skills were added, but ``skip``'s, and ``last``'s
        after them (derived layout)."""
        kept = [d for t, d in self._tasks.items() if d is not None and t != skip]
        return sources([*kept, *([last] if last is not None else [])], key, index_dtype(st.numel))

    def _apply(self, task_id: str, delta: SparseDelta, sign: int, done: list[str] | None = None,
               keys: list[str] | None = None) -> None:
        """Add (``sign`` = +1) or take out (-1) one mask's entries, tensor by tensor (only ``keys`` if given),
        appending each finished tensor's key to ``done``. Meanwhile the skill is among :attr:`_tasks` when it is
        being taken out, not when it is being added."""
        for key in delta.values if keys is None else keys:
            st = self._state[key]
            # A dense-form mask goes in with whole-tensor operations when the policy takes them and the tensor is,
            # or is about to be, mostly covered; else through its indices (a sparse tensor stays sparse).
            whole = key not in delta.indices and self.policy.whole_tensor and (
                st.dense or st.covered + delta.nnz_of(key) >= st.dense_share * st.numel)
            if whole:
                st.densify(self._sources(key, st) if st.derived and not st.dense else ())  # the state before
                self._cover(st, *apply_dense(st, delta.values[key], delta.nnz_of(key), sign))
            else:
                # Sparse, or a dense mask given to a policy that only takes indices: its non-zero entries.
                idx = delta.flat_indices(key).long()
                if idx.numel():
                    values = delta.values[key] if key in delta.indices else delta.values[key][idx]
                    if st.derived and not st.dense:
                        # Per-tensor totals, when taking a mask out, need the state before the change too: every
                        # kept mask (this one in its place, or last when an add is being undone).
                        before = (self._sources(key, st, last=None if task_id in self._tasks else delta)
                                  if sign < 0 and st.totals else None)
                        self._apply_derived(st, self._sources(key, st, skip=task_id), idx, values, sign, before)
                    else:
                        self._apply_sparse(st, idx, values, sign)
            self._tidy(key, st, task_id, delta if sign > 0 else None)
            if done is not None:
                done.append(key)

    def _tidy(self, key: str, st: TensorState, task_id: str, adding: SparseDelta | None) -> None:
        """Compact, densify or sparsify ``st`` when its covered share calls for it (:meth:`TensorState.tidy`)
        after ``task_id`` went in (``adding``: its delta, not yet among the kept ones) or out."""
        if st.wants_sparse():
            if st.stale:  # entries a dense removal freed are θ₀ again only once recomputed
                self._materialise(key, st)
            st.sparsify()
        elif st.derived and not st.dense:
            if st.covered >= st.dense_share * st.numel:
                st.densify(self._sources(key, st, skip=task_id, last=adding))
        else:
            st.tidy()

    def _apply_derived(self, st: TensorState, others: list[Entries], idx: torch.Tensor, values: torch.Tensor,
                       sign: int, before: list[Entries] | None = None) -> None:
        """One mask's entries of one derived tensor in or out (:func:`~skillhub.stitchderive.change`) and the
        merged entries there recomputed. Only merged entries and totals are stored, so running out of memory
        half-way changes nothing (FAULTS C8)."""
        self._writable(st)
        acc, count, slots, moved, doubled = change(st, others, before, idx, values, sign, self.accumulate)
        self._cover(st, sign * moved, sign * doubled)
        # Written even when the tensor is stale: its recomputation covers only the entries masks still cover, so
        # the entries this change frees must be θ₀ already.
        self._finite.store(st, idx, [(idx, self._merged_at(st, st.theta0_at(idx), acc, count, slots))])

    def _merged_at(self, st: TensorState, base: torch.Tensor, acc: dict[str, torch.Tensor], count: torch.Tensor,
                   slots: Index, freed: bool = True) -> torch.Tensor:
        """Merged entries from θ₀ there, the accumulators and the counts: θ₀ exactly where the count is 0 (θ₀ + 0.0
        would turn -0.0 into +0.0), unless no count there can be 0 (not ``freed``)."""
        import torch

        merged = (base.to(self.accumulate) + self.policy.delta(acc, count, slots)).to(st.merged.dtype)
        return torch.where(count == 0, base, merged) if freed else merged

    def _apply_sparse(self, st: TensorState, idx: torch.Tensor, values: torch.Tensor, sign: int) -> None:
        """One mask's entries of one tensor (sorted unique int64 ``idx``) in or out, in each stretch of accumulators
        that holds them (:meth:`TensorState.segments`), and the merged entries there recomputed."""
        import torch

        if not st.stale:
            self._writable(st)
        segs, new = st.segments(idx, sign > 0)
        values = values.to(self.accumulate)
        # Everything is allocated and counted before the first in-place change, so running out of memory leaves
        # this tensor as it was (FAULTS C8).
        plans: list[tuple[Segment, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        moved = doubled = 0
        for seg in segs:
            before = seg.count[seg.slots]
            # Coverage statistics kept incrementally, so reading them is O(1), not a pass over the model.
            edge, double = ((before == 0, before == 1) if sign > 0 else (before == 1, before == 2))
            m = int(edge.sum())
            moved, doubled = moved + m, doubled + int(double.sum())
            idle = seg.slots[edge] if sign < 0 and m else None  # entries no mask covers any more
            vals, flat = (values, idx) if seg.sel is None else (values[seg.sel], idx[seg.sel])
            plans.append((seg, before, before + sign, vals, flat, idle))
        applied: list[tuple[Segment, torch.Tensor, torch.Tensor]] = []
        try:
            for seg, before, after, vals, _, _ in plans:
                seg.count[seg.slots] = after  # slots are unique: a plain scatter
                try:
                    self.policy.update(seg.acc, seg.slots, vals, sign)
                except BaseException:
                    seg.count[seg.slots] = before
                    raise
                applied.append((seg, before, vals))
        except BaseException:
            for seg, before, vals in applied:  # exact with float64 sums: the stretches done so far, undone
                self.policy.update(seg.acc, seg.slots, vals, -sign)
                seg.count[seg.slots] = before
            raise
        self._cover(st, sign * moved, sign * doubled)
        for seg, _, _, _, _, idle in plans:
            if idle is not None:
                self.policy.reset(seg.acc, idle)
        if not st.stale:  # else the whole tensor is recomputed before it is read anyway
            self._finite.store(st, idx, [(flat, self._merged_at(st, seg.base[seg.slots], seg.acc, after,
                                                                seg.slots, freed=idle is not None))
                                         for seg, _, after, _, flat, idle in plans])
        del plans, segs, applied  # the new run goes in last, with nothing else holding the runs' arrays
        if new is not None:
            st.keep(new)

    def _cover(self, st: TensorState, covered: int, overlapping: int) -> None:
        st.covered += covered
        st.overlapping += overlapping
        self._covered += covered
        self._overlapping += overlapping

    def _materialise(self, key: str, st: TensorState) -> None:
        """Recompute a stale merged tensor: the sparse path's arithmetic, chunk by chunk, and θ₀ bit for bit
        wherever the count is 0. Dense: every entry; sparse: the entries the runs hold (the others are θ₀)."""
        import torch

        self._writable(st, whole=st.dense)
        if st.dense:
            recompute_dense(st)
        elif st.derived:  # every entry a kept mask covers (the others are θ₀)
            sources = self._sources(key, st)
            pos = union(sources, index_dtype(st.numel)).to(self.device)
            acc, count = derive(pos, sources, self.policy, self.accumulate)
            flat = pos.long()
            st.merged[flat] = self._merged_at(st, st.theta0_at(flat), {**acc, **st.totals}, count,
                                              torch.arange(pos.numel(), device=self.device))
        for run in st.runs:
            acc = {**run.acc, **st.totals}
            for start in range(0, len(run), CHUNK):
                slots = torch.arange(start, min(start + CHUNK, len(run)), device=self.device)
                count, base = run.count[slots], run.base[slots]
                merged = (base.to(self.accumulate) + self.policy.delta(acc, count, slots)).to(st.merged.dtype)
                st.merged[run.pos[slots].long()] = torch.where(count == 0, base, merged)
        st.stale = False
        self._finite.count(st)

    def nonfinite(self) -> str | None:
        """The first merged tensor holding NaN or ±Inf, else ``None``: the smoke check of a version's merged
        weights, from counts kept as entries change (O(changed entries); stale tensors are recomputed first)."""
        for key, st in self._state.items():
            if st.stale:
                self._materialise(key, st)
            if self._finite.holds(st):
                return key
        return None

    def tensor(self, key: str) -> torch.Tensor:
        """The live merged tensor (do not modify; use :meth:`snapshot` for a copy that stays fixed)."""
        st = self._state[key]
        if st.stale:
            self._materialise(key, st)
        return st.merged.reshape(st.shape)

    def snapshot(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The merged included tensors, fixed: what a published version holds. Nothing ever changes them.

        On the stitcher's own device no copy is made: the live merged tensors are handed out and frozen, and the
        stitcher writes a copy of a frozen tensor before it next changes it (copy on write; :meth:`prepare` makes
        those copies ahead of time, off the path of the next change). Tensors no change touched between two
        snapshots are the same tensors in both. On another device, a copy."""
        import torch

        dev = torch.device(device)
        if dev.type != self.device.type or (dev.index is not None and dev.index != self.device.index):
            return {k: self.tensor(k).to(device, copy=True) for k in self._state}
        out = {}
        for k, st in self._state.items():
            out[k] = self.tensor(k)
            self._versions.freeze(st)
        return out

    def prepare(self) -> None:
        """Copy every frozen merged tensor that has no spare copy yet (safe to call from another thread while the
        stitcher works: a copy is used only if it is still a copy of the live tensor). Run it when the service is
        idle after a publication: the next change then writes into the copy instead of copying first."""
        self._versions.prepare()

    def count(self, key: str) -> torch.Tensor:
        """Per-entry number of active masks covering ``key`` (a copy)."""
        st = self._state[key]
        if st.derived and not st.dense:
            return derived_counts(st.numel, self._sources(key, st), self.device).reshape(st.shape)
        return st.counts().reshape(st.shape)

    def footprint(self) -> dict[str, int]:
        """Bytes the stitcher holds, by kind: ``merged`` (the live merged tensors: the model itself, in its dtype),
        ``base``, ``count``, ``accumulators`` and ``positions`` (its extra state: O(Σ mask sizes) for tensors kept
        sparse, :mod:`skillhub.stitchstate`) and ``masks`` (the deltas of the skills in, kept to take them out)."""
        out = {"merged": 0, "base": 0, "count": 0, "accumulators": 0, "positions": 0}
        for st in self._state.values():
            for kind, n in st.nbytes().items():
                out[kind] += n
        out["masks"] = sum(t.numel() * t.element_size() for d in self._tasks.values() if d is not None
                           for t in (*d.indices.values(), *d.values.values()))
        return out

    def overlap(self) -> dict[str, int]:
        """Entries covered by at least one mask and by two or more, over all tensors (kept incrementally)."""
        return {"covered": self._covered, "overlapping": self._overlapping}


def stitch(base: Mapping[str, torch.Tensor], deltas: Mapping[str, SparseDelta], policy: StitchPolicy,
           *, device: str | torch.device = "cpu", accumulate: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Stitch from scratch: θ₀ with every delta added (one pass per skill). Returns CPU tensors."""
    s = Stitcher(base, policy, device=device, accumulate=accumulate)
    for task_id, delta in deltas.items():
        s.add(task_id, delta, removable=False)
    return s.snapshot()

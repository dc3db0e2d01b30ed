"""Sparse accumulators derived from the kept masks instead of stored (``Stitcher(derived=True)``, the service's
layout for models of ``[stitch] sparse_from`` parameters and more).

The stitcher keeps every active skill's mask (sorted indices and values per tensor) anyway, to be able to take it
out again. Everything the sparse accumulators of :mod:`skillhub.stitchstate` hold per covered entry (the mask
count, the policy's per-entry accumulators, the position) is a function of those masks, and θ₀ is in the base the
stitcher was built from (for the service a memory-mapped checkpoint: page cache, not the process's own memory).
So instead of 16 bytes per covered entry (position 4, θ₀ 2, count 2, float64 sum 8 for a bf16 model) the derived
layout keeps nothing beyond the masks, and an add or remove of mask t recomputes the entries t covers from scratch:

- for each other active mask s, in the order the skills were added, the positions of t's entries found in s
  (a binary search of the smaller sorted index array in the larger; :func:`intersect`), and s's values there added
  to fresh accumulators of ``len(t)`` entries through the policy's own ``update``;
- on an add, t's own values last. The merged entries are then θ₀ + the policy's ``delta``, exactly θ₀ where no
  mask is left.

Per entry that is the same arithmetic as a stitch from scratch of the active set in the same order (every
accumulator starts at 0 and receives the same values in the same order), so the result equals it bit for bit,
whatever the accumulator dtype and however many removals came before: no residue of add/remove cycles at all.
The cost of a change is O(|t| · T · log) for T active skills instead of O(|t| · log runs): a few searches of sorted
arrays per skill (about 15 ns per entry of t and per other skill on the CPU), small beside localization.

A policy's per-tensor ``totals`` (TIES's model-wide balance with ``zero_sign = "majority"``: a few integers per
tensor; sums over entries) are still stored. An add changes them by the mask's own ``update`` on the state just
rebuilt, as in the stored layouts; a removal by what the rebuilt entries add up to without the mask less what
they add up to with it, rebuilt once more with the mask in its place (twice the searches, for such policies only):
both exact, so the totals are a stitch from scratch's too, whatever the accumulator dtype. A tensor most of which masks cover still
turns dense (:attr:`TensorState.dense_share`), its dense accumulators built by replaying the masks once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from skillhub.delta import index_dtype
from skillhub.stitchstate import count_dtype, search

if TYPE_CHECKING:
    import torch

    from skillhub.delta import SparseDelta
    from skillhub.stitchpolicy import StitchPolicy
    from skillhub.stitchstate import TensorState

#: One mask's part of one tensor: sorted unique flat indices (one integer dtype per tensor) and the values there.
Entries = tuple["torch.Tensor", "torch.Tensor"]


def entries(delta: SparseDelta, key: str, dtype: torch.dtype) -> Entries | None:
    """``delta``'s mask of ``key`` as sorted indices of ``dtype`` and their values (``None`` when it has none);
    a tensor in the dense form gives its non-zero entries, as on the stitcher's index path."""
    if key not in delta.values:
        return None
    idx = delta.flat_indices(key)
    if not idx.numel():
        return None
    values = delta.values[key] if key in delta.indices else delta.values[key][idx]
    return idx.to(dtype), values


def sources(deltas: Iterable[SparseDelta], key: str, dtype: torch.dtype) -> list[Entries]:
    """The :func:`entries` of ``key`` of every delta that has some, in order."""
    found = (entries(d, key, dtype) for d in deltas)
    return [e for e in found if e is not None]


def intersect(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where two sorted arrays of unique integers (same dtype) hold the same values: int64 positions in ``a`` and
    in ``b``, in increasing order. The smaller array is searched in the larger."""
    import torch

    if not a.numel() or not b.numel():
        empty = torch.zeros(0, dtype=torch.int64, device=a.device)
        return empty, empty
    if b.numel() >= a.numel():
        j = search(b, a).clamp_(max=b.numel() - 1)
        in_a = (b[j] == a).nonzero().squeeze(1)
        return in_a, j[in_a]
    j = search(a, b).clamp_(max=a.numel() - 1)
    in_b = (a[j] == b).nonzero().squeeze(1)
    return j[in_b], in_b


def derive(pos: torch.Tensor, sources: Iterable[Entries], policy: StitchPolicy, dtype: torch.dtype
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The policy's accumulators (of ``dtype``) and the mask counts at the sorted unique positions ``pos`` (of the
    sources' index dtype) with every source's values there added, in order: what a stitch from scratch of those
    masks holds at ``pos``."""
    import torch

    n = pos.numel()
    acc = policy.accumulators(n, pos.device, dtype)
    count = torch.zeros(n, dtype=count_dtype(), device=pos.device)
    for idx, values in sources:
        slots, at = intersect(pos, idx)
        if slots.numel():
            policy.update(acc, slots, values[at].to(dtype), +1)
            count[slots] += 1
    return acc, count


def change(st: TensorState, others: Sequence[Entries], before: Sequence[Entries] | None, idx: torch.Tensor,
           values: torch.Tensor, sign: int, dtype: torch.dtype
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, int, int]:
    """One mask (sorted int64 ``idx``, ``values``) going into (``sign`` +1) or out of (-1) the derived ``st``:
    the accumulators (of ``dtype``, with ``st``'s totals) and counts at ``idx`` after the change, rebuilt from the
    ``others`` (the other kept masks, in order) and, adding, this one last; the slots to read them at; the numbers
    of entries the change moves in or out of covered and of overlapping. ``st``'s totals take the mask's own update
    on the rebuilt ``others`` when adding; when taking it out, the difference between what the entries' rebuilt
    states add up to without it (``others``) and with it (``before``: every kept mask, this one in its place; needed
    only when ``st`` has totals), which must therefore be sums over entries, as TIES's are."""
    import torch

    policy = st.policy
    pos = idx.to(index_dtype(st.numel))
    acc, count = derive(pos, others, policy, dtype)
    # The others' counts: an add moves entries at 0 to covered and at 1 to overlapping; a remove the reverse.
    moved, doubled = int(torch.count_nonzero(count == 0)), int(torch.count_nonzero(count == 1))
    slots = torch.arange(idx.numel(), device=idx.device)
    values = values.to(dtype)
    if sign > 0:
        policy.update({**acc, **st.totals}, slots, values, +1)
        count += 1
    elif before is not None:  # the totals the entries add up to after, less what they added up to before
        prior = derive(pos, before, policy, dtype)[0]
        for name, total in st.totals.items():
            total += acc[name] - prior[name]
    acc.update(st.totals)
    return acc, count, slots, moved, doubled


def union(sources: Sequence[Entries], dtype: torch.dtype) -> torch.Tensor:
    """Every position some source covers, sorted (of ``dtype``)."""
    import torch

    if not sources:
        return torch.zeros(0, dtype=dtype)
    return torch.unique(torch.cat([idx for idx, _ in sources]), sorted=True).to(dtype)


def counts(numel: int, sources: Iterable[Entries], device: torch.device) -> torch.Tensor:
    """Per-entry mask counts of a tensor of ``numel`` entries from its sources (flat)."""
    import torch

    out = torch.zeros(numel, dtype=count_dtype(), device=device)
    for idx, _ in sources:
        out[idx.long()] += 1
    return out

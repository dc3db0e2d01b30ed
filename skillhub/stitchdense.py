"""Whole-tensor operations on a tensor whose accumulators are dense (:mod:`skillhub.stitchstate`): a mask in the
dense form goes in or out with no index built and no gather or scatter, and the merged tensor is recomputed in
full, in cache-sized chunks, when it is next read (n dense adds in a row cost one recomputation, not n)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from skillhub.stitchpolicy import Index
    from skillhub.stitchstate import TensorState

#: Entries per step when a whole tensor is recomputed: float64 temporaries of this size stay in the CPU cache
#: (about 4× faster than one pass over a 2M-entry tensor, which streams every temporary through memory).
CHUNK = 1 << 18


def apply_dense(st: TensorState, values: torch.Tensor, nnz: int, sign: int) -> tuple[int, int]:
    """One dense mask (the non-zero ``values``, ``nnz`` of them) in (``sign`` +1) or out (-1) of the dense ``st``;
    marks it stale and returns the changes of its covered and overlapping entries. Running out of memory leaves
    ``st`` as it was."""
    import torch

    assert st.count is not None
    policy = st.policy
    numel = values.numel()
    inside = None if nnz == numel else values != 0
    # Coverage changes and the entries that become free, from the counts before the change (and allocated before
    # it, so running out of memory leaves this tensor as it was).
    free: torch.Tensor | None = None
    if inside is None and sign > 0:
        # Every count goes up by one: all entries are covered after, and those covered before overlap after.
        moved, doubled = numel - st.covered, st.covered - st.overlapping
    elif inside is None:
        # Every count goes down by one: what overlapped stays covered; entries at 1 become free.
        moved, doubled = st.covered - st.overlapping, st.overlapping - int(torch.count_nonzero(st.count > 2))
        free = st.count == 1 if moved else None
    else:
        edge, double = (st.count == 0, st.count == 1) if sign > 0 else (st.count == 1, st.count == 2)
        edge &= inside
        double &= inside
        moved, doubled = int(torch.count_nonzero(edge)), int(torch.count_nonzero(double))
        free = edge if sign < 0 and moved else None
    step = sign if inside is None else inside
    st.count.add_(step, alpha=1 if inside is None else sign)
    try:
        # Values go in as they are stored: the accumulator's in-place add widens them, no float64 copy.
        policy.update(st.acc, slice(None), values, sign)
    except BaseException:
        st.count.add_(step, alpha=-1 if inside is None else -sign)
        raise
    if free is not None:
        policy.reset(st.acc, free)
    st.stale = True
    return sign * moved, sign * doubled


def recompute_dense(st: TensorState) -> None:
    """Every merged entry of the dense ``st`` from its accumulators, chunk by chunk: the sparse path's arithmetic,
    and θ₀ bit for bit wherever the count is 0."""
    import torch

    assert st.base is not None and st.count is not None
    policy, n = st.policy, st.numel
    for start in range(0, n, CHUNK):
        part = slice(start, min(start + CHUNK, n))
        idx: Index = part if policy.whole_tensor else torch.arange(part.start, part.stop, device=st.device)
        count = st.count[part]
        merged = (st.base[part].to(st.dtype) + policy.delta(st.acc, count, idx)).to(st.merged.dtype)
        st.merged[part] = torch.where(count == 0, st.base[part], merged)

"""What the :class:`~skillhub.stitch.Stitcher` keeps per tensor: the merged tensor, and accumulators only where masks
are (DESIGN §7: the stitcher's extra state is O(Σ mask sizes), not O(model)).

A tensor's accumulators take one of two forms, chosen by the share of its entries that masks cover:

- **sparse** (the usual case: masks of a few percent): only the covered entries are kept, in *runs*. A run is a
  sorted array of flat positions with, per position, θ₀, the mask count and the policy's per-entry accumulators
  (16 bytes per covered entry for a bf16 model with float64 sums and int32 positions). θ₀ needs no copy of its
  own elsewhere: an entry no mask covers holds θ₀ exactly in the merged tensor, so θ₀ is read from there when a
  mask first covers it.
- **dense** (most of the tensor covered, or a mask in the dense form): θ₀, the count and the accumulators for every
  entry, as whole tensors (12 bytes per entry for bf16 with float64 sums: cheaper than sparse beyond ~75% covered,
  and whole-tensor operations need no index at all).

A tensor turns dense when the entries covered reach ``dense_share`` of it (or a dense-form mask arrives for a policy
that takes whole tensors), and sparse again when they fall below a quarter of that: each conversion is O(tensor),
paid for by the O(tensor) worth of mask entries added or removed since the last one.

**Runs, and why add/remove stay O(mask).** One sorted array would need O(covered) element moves to insert a new
mask's positions. Instead, the positions an add brings that no run holds yet become a new run (a mask's indices are
sorted already), and the last two runs are merged while the newer one is at least half the size of the older (a
linear merge of two sorted arrays): run sizes fall geometrically, so there are O(log(covered / mask)) runs, and each
entry is moved O(log) times over its life, amortised. Finding a mask's positions is a binary search per run.
An entry whose count returns to 0 stays in its run, with its accumulators reset to 0 (a mask covering it again
reuses it); when such idle entries outnumber the live ones, the runs are compacted (again amortised against the
removals that idled them).

Policies see exactly their contract (:class:`~skillhub.stitchpolicy.StitchPolicy`): accumulators of ``numel``
entries and int64 indices into them; for a run those are positions within the run. Accumulators a policy names in
``totals`` (one value per tensor, such as TIES's model-wide balance) are kept once per tensor and handed in with
every run's.

**Derived** (``derived=True``, :mod:`skillhub.stitchderive`): no runs at all. The sparse accumulators are
recomputed from the masks the stitcher keeps, at the entries each change touches, and θ₀ is read from the base
tensor the state was built from (:attr:`TensorState.theta0`, not copied). The dense form is the same as above,
built by replaying the masks once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from skillhub.delta import index_dtype

if TYPE_CHECKING:
    import torch

    from skillhub.stitchpolicy import StitchPolicy

#: Default covered share at which a tensor's accumulators turn dense.
DENSE_SHARE = 0.5
#: Idle entries (count 0) below this many per tensor are never worth a compaction.
COMPACT_MIN = 1 << 12


def count_dtype() -> torch.dtype:
    """The dtype of the per-entry mask counts: int16 (its largest value is ``stitch.COUNT_MAX``)."""
    import torch

    return torch.int16


def search(sorted_: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``searchsorted`` (left) as int64; numpy's on the CPU, which is about 10× faster than torch's there."""
    import numpy as np
    import torch

    if sorted_.device.type == "cpu":
        return torch.from_numpy(np.searchsorted(sorted_.numpy(), query.numpy()).astype(np.int64, copy=False))
    return torch.searchsorted(sorted_, query)


class Run:
    """Sorted flat positions of one tensor and, per position, θ₀, the mask count and the per-entry accumulators."""

    __slots__ = ("acc", "base", "count", "pos")

    def __init__(self, pos: torch.Tensor, count: torch.Tensor, base: torch.Tensor,
                 acc: dict[str, torch.Tensor]) -> None:
        self.pos, self.count, self.base, self.acc = pos, count, base, acc

    def __len__(self) -> int:
        return int(self.pos.numel())

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.pos
        yield self.count
        yield self.base
        yield from self.acc.values()

    def take(self, keep: torch.Tensor) -> Run:
        """The entries at ``keep`` (sorted int64 positions in this run), as a new run."""
        return Run(self.pos[keep], self.count[keep], self.base[keep], {k: t[keep] for k, t in self.acc.items()})


def merge(a: Run, b: Run) -> Run:
    """Two runs with disjoint positions as one sorted run, in linear time and little scratch: each entry of ``b``
    lands at its rank in ``a`` plus its own, ``a``'s entries fill the places left, in order. Fields are merged one
    at a time and the old arrays let go as soon as their field is done, so the scratch on top of the runs is one
    field of the merged run, not a second copy of every field. On the CPU through numpy, whose gathers and scatters
    are several times faster than torch's on arrays of this kind."""
    import numpy as np
    import torch

    n = len(a) + len(b)
    cpu = a.pos.device.type == "cpu"
    if cpu:
        to_b_np = np.arange(len(b)) + np.searchsorted(a.pos.numpy(), b.pos.numpy())
        left_np = np.ones(n, dtype=bool)
        left_np[to_b_np] = False
    else:
        to_b = torch.arange(len(b), device=b.pos.device) + torch.searchsorted(a.pos, b.pos)
        left = torch.ones(n, dtype=torch.bool, device=a.pos.device)
        left[to_b] = False

    def cat(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not cpu:
            out = x.new_empty(n)
            out[left] = x
            out[to_b] = y
            return out
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16: move its bits
            return cat(x.view(torch.int16), y.view(torch.int16)).view(torch.bfloat16)
        res = np.empty(n, dtype=x.numpy().dtype)
        res[left_np] = x.numpy()
        res[to_b_np] = y.numpy()
        return torch.from_numpy(res)

    # ``a`` and ``b`` are consumed: each field's old arrays are let go once the merged field is built.
    acc = {k: cat(a.acc.pop(k), b.acc.pop(k)) for k in list(a.acc)}
    base = cat(a.base, b.base)
    a.base = b.base = torch.empty(0)
    count = cat(a.count, b.count)
    a.count = b.count = torch.empty(0)
    return Run(cat(a.pos, b.pos), count, base, acc)


class Segment:
    """One stretch of accumulators an add or remove touches: where in the mask (``sel``, int64 positions in its
    indices, or ``None`` for all of them), where in the accumulators (``slots``), and those accumulators."""

    __slots__ = ("acc", "base", "count", "run", "sel", "slots")

    def __init__(self, sel: torch.Tensor | None, slots: torch.Tensor, count: torch.Tensor, base: torch.Tensor,
                 acc: dict[str, torch.Tensor], run: Run | None = None) -> None:
        self.sel, self.slots, self.count, self.base, self.acc, self.run = sel, slots, count, base, acc, run


class TensorState:
    """The stitcher's state for one included tensor (flat, on the stitcher's device): the merged tensor in the base
    dtype, and its accumulators, sparse (:attr:`runs`) or dense (:attr:`base`, :attr:`count`, :attr:`acc`)."""

    __slots__ = ("acc", "base", "count", "covered", "dense_share", "device", "dtype", "merged", "numel",
                 "overlapping", "policy", "runs", "shape", "stale", "theta0", "totals")

    def __init__(self, base: torch.Tensor, policy: StitchPolicy, device: torch.device, dtype: torch.dtype,
                 dense_share: float = DENSE_SHARE, derived: bool = False) -> None:
        self.shape = tuple(base.shape)
        # Derived: θ₀ of covered entries is read from the tensor given (for the service a view of the memory-mapped
        # base: page cache, shared and reclaimable), which must not change while the state lives.
        self.theta0 = base.detach().reshape(-1) if derived else None
        # The one copy of the tensor the stitcher holds: θ₀ until a mask covers an entry.
        self.merged = base.detach().reshape(-1).to(device, copy=True)
        self.numel = self.merged.numel()
        self.policy, self.device, self.dtype, self.dense_share = policy, device, dtype, dense_share
        self.stale = False  # merged must be recomputed before it is read
        self.covered = 0  # entries with a count ≥ 1, and ≥ 2 (kept as masks come and go)
        self.overlapping = 0
        self.runs: list[Run] = []
        self.totals = {k: t for k, t in policy.accumulators(0, device, dtype).items() if k in policy.totals}
        self.base: torch.Tensor | None = None  # dense form only
        self.count: torch.Tensor | None = None
        self.acc: dict[str, torch.Tensor] = {}
        if dense_share <= 0:
            self.densify()

    @property
    def dense(self) -> bool:
        return self.count is not None

    @property
    def derived(self) -> bool:
        """Sparse accumulators derived from the masks (:mod:`skillhub.stitchderive`), never stored."""
        return self.theta0 is not None

    def theta0_at(self, pos: torch.Tensor) -> torch.Tensor:
        """θ₀ at the flat positions ``pos`` (int64, on the device), from the base tensor (derived layout)."""
        assert self.theta0 is not None
        src = self.theta0
        return src[pos if pos.device == src.device else pos.to(src.device)].to(self.device)

    def _fresh(self, n: int) -> dict[str, torch.Tensor]:
        return {k: t for k, t in self.policy.accumulators(n, self.device, self.dtype).items()
                if k not in self.totals}

    # --- where a mask lands ---------------------------------------------------------------------------------------

    def segments(self, idx: torch.Tensor, adding: bool) -> tuple[list[Segment], Run | None]:
        """The accumulators at the sorted unique flat positions ``idx`` (int64): one segment in the dense form;
        in the sparse form one per run holding some of them, plus, when ``adding``, a new run (returned apart, to
        be kept with :meth:`keep` once the change went through) for the positions no run holds yet."""
        import torch

        if self.dense:
            assert self.base is not None and self.count is not None
            return [Segment(None, idx, self.count, self.base, self.acc)], None
        query = idx.to(index_dtype(self.numel))
        found = torch.zeros(idx.numel(), dtype=torch.bool, device=idx.device)
        out: list[Segment] = []
        for run in self.runs:
            j = search(run.pos, query).clamp_(max=len(run) - 1)
            hit = run.pos[j] == query
            sel = hit.nonzero().squeeze(1)
            if sel.numel():
                found |= hit
                out.append(Segment(sel, j[sel], run.count, run.base, {**run.acc, **self.totals}, run))
        missing = (~found).nonzero().squeeze(1)
        if not missing.numel():
            return out, None
        if not adding:
            raise AssertionError("a mask being removed covers entries the stitcher does not hold")
        pos = query[missing]
        # Entries no mask covers hold θ₀ exactly in the merged tensor: θ₀ for the new run comes from there.
        new = Run(pos, torch.zeros(pos.numel(), dtype=count_dtype(), device=self.device),
                  self.merged[pos.long()], self._fresh(pos.numel()))
        for t in new.acc.values():
            t.zero_()
        slots = torch.arange(pos.numel(), device=self.device)
        out.append(Segment(missing, slots, new.count, new.base, {**new.acc, **self.totals}, new))
        return out, new

    def keep(self, run: Run) -> None:
        """Take a new run in, then merge the last two runs while the newer is at least half the older (the caller
        holds no other reference to the runs' arrays, so a merge frees them as it goes)."""
        self.runs.append(run)
        while len(self.runs) >= 2 and 2 * len(self.runs[-1]) >= len(self.runs[-2]):
            b, a = self.runs.pop(), self.runs.pop()
            self.runs.append(merge(a, b))

    def held(self) -> int:
        """Entries the accumulators hold (all of them when dense)."""
        return self.numel if self.dense else sum(len(r) for r in self.runs)

    def tidy(self) -> None:
        """After a change to a sparse tensor: go dense when the covered share reaches ``dense_share``, else compact
        the runs when idle entries outnumber live ones (and are worth it)."""
        if self.dense:
            return
        if self.covered >= self.dense_share * self.numel:
            self.densify()
            return
        if not self.covered:
            self.runs = []  # nothing covered any more: every entry is idle, nothing to keep
            return
        idle = self.held() - self.covered
        if idle > self.covered and idle >= min(COMPACT_MIN, self.numel // 4 or 1):
            self.compact()

    def wants_sparse(self) -> bool:
        """A dense tensor whose covered share fell below a quarter of ``dense_share`` (the hysteresis keeps a
        tensor near the threshold from converting back and forth)."""
        return self.dense and self.dense_share > 0 and self.covered < self.dense_share * self.numel / 4

    def compact(self) -> None:
        """Drop the idle entries (count 0: accumulators 0, merged θ₀) from every run."""
        runs = []
        for run in self.runs:
            keep = (run.count != 0).nonzero().squeeze(1)
            if keep.numel():
                runs.append(run.take(keep) if keep.numel() < len(run) else run)
        self.runs = []
        for run in sorted(runs, key=len, reverse=True):
            self.keep(run)

    # --- the two forms --------------------------------------------------------------------------------------------

    def densify(self, sources: Iterable[tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
        """Turn to the dense form: θ₀ from the merged tensor where no mask is, from the runs where masks are; in the
        derived layout θ₀ from the base and the accumulators from the masks' ``sources`` (sorted indices and
        values, in the order the skills were added), replayed once."""
        import torch

        if self.dense:
            return
        base = self.merged.clone() if self.theta0 is None else self.theta0.to(self.device, copy=True)
        count = torch.zeros(self.numel, dtype=count_dtype(), device=self.device)
        acc = self.policy.accumulators(self.numel, self.device, self.dtype)
        count.zero_()  # touch the fresh (lazily zero-mapped) pages now, not on the next add
        for name, t in acc.items():
            if name not in self.totals:
                t.zero_()
        for run in self.runs:
            p = run.pos.long()
            base[p] = run.base
            count[p] = run.count
            for name, t in run.acc.items():
                acc[name][p] = t
        for idx, values in sources:  # the same values in the same order as the derived recomputation
            p = idx.long()
            self.policy.update(acc, p, values.to(self.dtype), +1)
            count[p] += 1
        for name, t in self.totals.items():  # the tensor's running totals, not the replay's
            acc[name].copy_(t)
        self.base, self.count, self.acc, self.runs = base, count, acc, []
        self.totals = {k: acc[k] for k in self.totals}

    def sparsify(self) -> None:
        """Turn to the sparse form: one run of the covered entries. The merged tensor must be up to date first
        (entries a dense removal freed are θ₀ only once recomputed); the caller sees to that."""
        assert self.count is not None and self.base is not None and not self.stale
        if self.derived:  # nothing to keep but the totals: the masks hold the rest
            self.totals = {k: self.acc[k].clone() for k in self.totals}
            self.base, self.count, self.acc, self.runs = None, None, {}, []
            return
        pos = (self.count != 0).nonzero().squeeze(1)
        run = Run(pos.to(index_dtype(self.numel)), self.count[pos], self.base[pos],
                  {k: t[pos] for k, t in self.acc.items() if k not in self.totals})
        self.totals = {k: self.acc[k].clone() for k in self.totals}
        self.base, self.count, self.acc = None, None, {}
        self.runs = [run] if len(run) else []

    # --- reading --------------------------------------------------------------------------------------------------

    def accumulators(self) -> Iterator[torch.Tensor]:
        """Every per-entry accumulator tensor (dense, or each run's)."""
        if self.dense:
            yield from (t for k, t in self.acc.items() if k not in self.totals)
        for run in self.runs:
            yield from run.acc.values()

    def settle_view(self) -> dict[str, torch.Tensor]:
        """What :meth:`StitchPolicy.settle` sees of this tensor: every accumulator when dense, the totals when
        sparse."""
        return self.acc if self.dense else self.totals

    def counts(self) -> torch.Tensor:
        """Per-entry mask counts, flat (a copy)."""
        import torch

        if self.count is not None:
            return self.count.clone()
        out = torch.zeros(self.numel, dtype=count_dtype(), device=self.device)
        for run in self.runs:
            out[run.pos.long()] = run.count
        return out

    def max_count(self) -> int:
        if self.count is not None:
            return int(self.count.max()) if self.numel else 0
        return max((int(r.count.max()) for r in self.runs if len(r)), default=0)

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by kind: ``merged`` (the model itself), ``base`` (θ₀ copies), ``count``, ``accumulators``
        and ``positions`` (sparse runs)."""
        def size(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        out = {"merged": size(self.merged), "base": size(self.base), "count": size(self.count),
               "accumulators": sum(size(t) for t in self.acc.values()) if self.dense else
               sum(size(t) for t in self.totals.values()), "positions": 0}
        for run in self.runs:
            out["positions"] += size(run.pos)
            out["base"] += size(run.base)
            out["count"] += size(run.count)
            out["accumulators"] += sum(size(t) for t in run.acc.values())
        return out

"""Selecting the k largest |τ| of a task vector, exactly and in bounded memory: over the whole model (one global
threshold, :func:`global_topk`) or per tensor (:func:`per_tensor_topk`). The rules (exactly k, ties in canonical
order, τ = 0 never) are the :mod:`~skillhub.strategies.dataless` strategy's, whose docstring states them; the
``trained`` strategy's cap on its mask uses the same exact selection on its logits.

How: a sample of |τ| in lines of neighbours gives a threshold just below the k-th value; one streaming pass over the
tensors (compiled, :mod:`skillhub.kernels`, where it is loaded; numpy otherwise) keeps the candidates above it;
an exact selection among them finishes. Tensors are split over two worker threads.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from skillhub import kernels
from skillhub.delta import INT32_LIMIT
from skillhub.taskvector import TaskVector

if TYPE_CHECKING:
    import numpy as np
    import torch

    Entries = dict[str, tuple[torch.Tensor | None, torch.Tensor]]

T = TypeVar("T")

#: Entries in the threshold's sample (about: it is taken in whole lines of :data:`LINE`).
SAMPLE_SIZE = 1 << 17
#: Consecutive entries in one line of the sample: 64 bytes of float32, about one cache miss in each file.
LINE = 16
#: Scratch per worker thread is sized to at most this many entries (16 MiB of float32 τ): a larger tensor (a
#: 128k×4096 embedding) is read in pieces of this size, so selection needs no buffer the size of the largest tensor.
#: Large enough that the tensors of usual vision models are still taken whole (pieces of a few hundred kB were 1.6×
#: slower on two cores: thousands of small numpy calls contend for the GIL with the other thread). A multiple of
#: ``taskvector.SQUARES_DOT``, so that ‖τ‖² comes out the same float as from a whole tensor.
PIECE = 1 << 22


def per_tensor_topk(task: TaskVector, sparsity: float, *,
                    progress: Callable[[int, int], None] | None = None) -> Entries:
    """Per tensor, the k_i = ⌊sparsity × numel_i⌋ largest non-zero |τ| of that tensor alone (ties at the k_i-th
    value: earliest flat index first), as sorted indices and τ values. One O(numel) selection per tensor, tensors
    split over two threads as in :func:`_candidates`."""
    import numpy as np
    import torch

    tick = _ticker(progress, len(task.keys))

    def run(keys: list[str]) -> Entries:
        small = [k for k in keys if math.prod(task.shapes[k]) <= PIECE]
        biggest = max((math.prod(task.shapes[k]) for k in small), default=0)
        work = torch.empty(biggest, dtype=task.dtype)
        abs_work = np.empty(biggest, dtype=work.numpy().dtype)
        out: Entries = {}
        for key in keys:
            if key not in small:
                # Too large for one workspace: the global selection on this tensor alone, which streams it in
                # pieces and keeps the same rule (larger |τ| first, ties by earliest flat index, τ = 0 never).
                one = TaskVector(task.base, task.finetuned, [key], task.dtype, norms=task.norms)
                found_one = global_topk(one, math.floor(sparsity * math.prod(task.shapes[key])))
                task.squares.update(one.squares)
                if key in found_one:
                    out[key] = found_one[key]
                tick()
                continue
            flat = task.tensor(key, out=work).reshape(-1)
            n = flat.numel()
            k = math.floor(sparsity * n)
            if k > 0:
                a = np.abs(flat.numpy(), out=abs_work[:n])
                kth = np.partition(a, n - k)[n - k] if k < n else 0  # the k-th largest |τ|
                if kth > 0:
                    keep = a > kth
                    short = k - int(np.count_nonzero(keep))  # ≥ 1: the rest tie at the k-th value, earliest first
                    keep[np.flatnonzero(a == kth)[:short]] = True
                else:
                    keep = a > 0  # no more than k non-zero entries: all of them (τ = 0 never)
                idx = torch.from_numpy(np.flatnonzero(keep))
                if idx.numel():
                    out[key] = (idx, flat[idx])
            tick()
        return out

    return _in_workers(task, run)


def global_topk(task: TaskVector, k: int, *, seed: int = 0,
                progress: Callable[[int, int], None] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per tensor, sorted flat indices (int64, or int32 where the tensor allows it) and τ values of the k largest
    non-zero |τ| over the whole task vector."""
    import torch

    if k <= 0:
        return {}
    n = task.numel
    kernels.ready(n)  # load the compiled pass if it pays (a long pass, or the service, which loaded it at start)
    gen = torch.Generator().manual_seed(seed)
    margin = 1.0
    while True:
        threshold = _sample_threshold(task, k, n, gen, margin) if n > 4 * SAMPLE_SIZE else 0.0
        cands = _candidates(task, threshold, progress, expect=math.ceil(1.25 * k) if threshold > 0 else 0)
        total = sum(int(c[0].numel()) for c in cands.values())
        if total >= k or threshold == 0.0:
            break
        margin *= 8  # unlucky sample: lower the threshold and pass again
    return _select_exact(task, cands, k)


def _sample_threshold(task: TaskVector, k: int, n: int, gen: torch.Generator, margin: float) -> float:
    """A value of |τ| that at least k entries reach, with overwhelming probability: a low quantile of a sample of
    lines of :data:`LINE` consecutive entries, gathered in the two workers. The model's entries (in canonical order)
    are cut into :data:`SAMPLE_SIZE` / LINE equal strata, at a random offset, and a tensor gets the strata that
    start in it (so in proportion to its size, small tensors too) and one line in each."""
    import numpy as np
    import torch

    lines = max(1, SAMPLE_SIZE // LINE)
    step = n / lines
    shift = float(torch.rand((), generator=gen, dtype=torch.float64)) * step
    seed = int(torch.randint(0, 1 << 62, (1,), generator=gen))
    counts: dict[str, int] = {}
    pads = offset = 0
    for key in task.keys:
        numel = math.prod(task.shapes[key])
        if m := math.floor((offset + numel + shift) / step) - math.floor((offset + shift) / step):
            counts[key] = m
            pads += m * max(0, LINE - numel)  # a tensor shorter than a line: -1 in the rest
        offset += numel
    starts = dict(zip(counts, itertools.accumulate([0, *counts.values()])))
    sample = np.empty((sum(counts.values()), LINE), np.float64 if task.dtype == torch.float64 else np.float32)

    def run(keys: list[str]) -> dict[str, None]:
        for key in keys:
            if key not in counts:
                continue
            out = sample[starts[key]:starts[key] + counts[key]]
            key_seed = (seed + (starts[key] + 1) * 0xD1B54A32D192ED03) % (1 << 63)  # its own stream per tensor
            ft, bt = task.finetuned.tensor(key), task.base.tensor(key)
            if not kernels.sample_abs(ft, bt, key_seed, out, task.dtype):  # the numpy path: a generator per tensor
                out[:] = _lines_abs(ft, bt, out.shape[0], torch.Generator().manual_seed(key_seed), task.dtype).numpy()
        return {}

    _in_workers(task, run)
    flat = sample.reshape(-1)
    s = flat.size - pads
    expected = k / n * s
    if math.ceil(expected) >= s:
        return 0.0
    # The spread of the sample's count above the true k-th value: binomial for single entries; lines of neighbours
    # may move together, so it is estimated from the count in each line above the estimate (never below binomial).
    first = flat.size - max(1, math.ceil(expected))
    guess = np.partition(flat, first)[first]
    per_line = np.count_nonzero(sample >= guess, axis=1)
    sigma = max(math.sqrt(expected), math.sqrt(per_line.size * float(per_line.var())))
    rank = math.ceil(expected + margin * (6 * sigma + 0.002 * expected + 32))  # 6 sigma and a floor
    if rank >= s:
        return 0.0
    value = float(np.partition(flat, flat.size - rank)[flat.size - rank])  # the rank-th largest (NaN sorts above)
    return value if math.isfinite(value) else 0.0


def _lines_abs(ft: torch.Tensor, bt: torch.Tensor, m: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """:func:`skillhub.kernels.sample_abs` in torch (positions from ``gen``): |τ| on m lines of :data:`LINE`, one in
    each of m equal strata, -1 past the end."""
    import torch

    numel = ft.numel()
    u = torch.rand(m, generator=gen, dtype=torch.float64)
    start = ((torch.arange(m, dtype=torch.float64) + u) * (numel / m)).long().clamp(0, max(0, numel - LINE))
    pos = start[:, None] + torch.arange(LINE)
    inside = pos < numel
    pos = pos.clamp(max=numel - 1)
    tau = (ft.reshape(-1)[pos].to(dtype) - bt.reshape(-1)[pos].to(dtype)).abs()
    return tau.masked_fill(~inside, -1).to(torch.float64 if dtype == torch.float64 else torch.float32)


def _in_workers(task: TaskVector, run: Callable[[list[str]], dict[str, T]],
                size: Callable[[str], int] | None = None) -> dict[str, T]:
    """``run`` over the task's tensors split between two worker threads (the work is memory-bound compiled or numpy
    code that releases the GIL), its results in canonical order. Largest first (by ``size``, default the number of
    entries), dealt alternately: the two workers get about the same amount of work."""
    order = sorted(task.keys, key=lambda k: -(size(k) if size else math.prod(task.shapes[k])))
    workers = max(1, min(2, os.cpu_count() or 1, len(order)))
    if workers == 1:
        found = run(order)
    else:
        found = {}
        with ThreadPoolExecutor(workers) as pool:
            for part in pool.map(run, [order[i::workers] for i in range(workers)]):
                found.update(part)
    return {k: found[k] for k in task.keys if k in found}


def _ticker(progress: Callable[[int, int], None] | None, total: int) -> Callable[[], None]:
    """A tensor done, from either worker: ``progress(done, total)`` under a lock (nothing without ``progress``)."""
    lock, done = threading.Lock(), [0]

    def tick() -> None:
        if progress is not None:
            with lock:
                done[0] += 1
                progress(done[0], total)

    return tick


def _candidates(task: TaskVector, threshold: float, progress: Callable[[int, int], None] | None,
                expect: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
    """One streaming pass: per tensor, flat indices, τ and |τ| of the entries with |τ| ≥ threshold and τ ≠ 0.

    Tensors are split over two worker threads (:func:`_in_workers`), each with its own reused workspaces, so no
    full-size temporary is ever allocated per tensor.
    """
    import numpy as np
    import torch

    tick = _ticker(progress, len(task.keys))

    def run(keys: list[str]) -> dict[str, tuple[torch.Tensor, ...]]:
        # One reused workspace of at most PIECE entries: whole tensors up to that size, pieces beyond.
        size = min(PIECE, max((math.prod(task.shapes[k]) for k in keys), default=0))
        work = torch.empty(size, dtype=task.dtype)
        np_dtype = work.numpy().dtype
        abs_work = np.empty(size, dtype=np_dtype)
        keep_work = np.empty(size, dtype=bool)

        def select(flat: torch.Tensor, offset: int) -> tuple[torch.Tensor, ...]:
            m = flat.numel()
            a = np.abs(flat.numpy(), out=abs_work[:m])
            keep = np.greater_equal(a, threshold, out=keep_work[:m]) if threshold > 0 else \
                np.greater(a, 0, out=keep_work[:m])
            idx = torch.from_numpy(np.flatnonzero(keep))
            return idx + offset if offset else idx, flat[idx], torch.from_numpy(a[idx.numpy()])

        out: dict[str, tuple[torch.Tensor, ...]] = {}
        # The compiled pass's candidates stay in this arena, sized to the share of them expected (one fresh block:
        # numpy asks big ones for huge pages, a few page faults where growing from small ones took thousands).
        share = math.ceil(expect * sum(math.prod(task.shapes[k]) for k in keys) / task.numel) if expect else 0
        bufs = kernels.Buffers(max(min(kernels.OUT, size), share))
        for key in keys:
            fused = kernels.scan_pair(task.finetuned.tensor(key), task.base.tensor(key), threshold, bufs,
                                      task.dtype)
            if fused is not None:  # one compiled pass: no τ workspace, whole tensors of any size
                idx, val, ab, sq = fused
                task.record_squares(key, sq)
                out[key] = (idx, val, ab)
            elif math.prod(task.shapes[key]) <= size:
                out[key] = select(task.tensor(key, out=work).reshape(-1), 0)
            else:
                parts = [select(piece, start) for start, piece in task.pieces(key, work)]
                out[key] = tuple(torch.cat([p[i] for p in parts]) for i in range(3))
            tick()
        return out

    return _in_workers(task, run)


def _select_exact(task: TaskVector, cands: dict[str, tuple[torch.Tensor, ...]], k: int
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    import numpy as np
    import torch

    keys = list(cands)  # canonical order: the task vector's sorted keys
    total = sum(int(cands[key][0].numel()) for key in keys)
    if total <= k:
        return {key: (cands[key][0], cands[key][1]) for key in keys if cands[key][0].numel()}
    ab = {key: cands[key][2].numpy() for key in keys}
    values = np.concatenate(list(ab.values()))
    # The k-th largest value v (an O(n) selection): everything above v is in; ties at v go in canonical order.
    v = values.dtype.type(np.partition(values, total - k)[total - k])
    ties = k - int(np.count_nonzero(values > v))  # ≥ 1: v itself
    quota = dict.fromkeys(keys, ties)  # every tie at v is taken ...
    if int(np.count_nonzero(values == v)) > ties:  # ... unless there are more than places: the first ones
        left = ties
        for key in keys:
            quota[key] = min(left, int(np.count_nonzero(ab[key] == v)))
            left -= quota[key]
    # Each tensor's kept candidates copied once into the result (a view per tensor) by the two workers, each into
    # its own block: no concatenation of indices and values, whose fresh pages cost more than the copy (about 4000
    # page faults on the benchmark's model). The quotas make every tensor's share independent of the others'.
    dtype = cands[keys[0]][1].dtype

    def run(part: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        room = min(k, sum(int(cands[key][0].numel()) for key in part)) + 1
        # the indices in the dtype the mask stores them in (int32 for a tensor that allows it): no second copy
        wide = any(math.prod(task.shapes[key]) > INT32_LIMIT for key in part)
        out_idx = np.empty(room, np.int64 if wide else np.int32)
        out_val = np.empty(room, _raw(cands[keys[0]][1]).dtype)
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        at = 0
        for key in part:
            idx, val, a = cands[key][0].numpy(), _raw(cands[key][1]), ab[key]
            n = kernels.compact(a, idx, val, float(v), quota[key], out_idx, out_val, at)
            if n is None:  # numpy's boolean indexing
                keep = a > v
                if quota[key]:
                    keep[np.flatnonzero(a == v)[:quota[key]]] = True
                n = int(np.count_nonzero(keep))
                out_idx[at:at + n], out_val[at:at + n] = idx[keep], val[keep]
            if n:
                out[key] = (torch.from_numpy(out_idx[at:at + n]), _cooked(out_val[at:at + n], dtype))
                at += n
        return out

    return _in_workers(task, run, size=lambda key: int(cands[key][0].numel()))


def _raw(values: torch.Tensor) -> np.ndarray:
    """A numpy view of ``values`` (bfloat16 as its raw bits: numpy has no bfloat16)."""
    import torch

    return values.view(torch.int16).numpy() if values.dtype == torch.bfloat16 else values.numpy()


def _cooked(raw: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The tensor of ``dtype`` that :func:`_raw` made ``raw`` from."""
    import torch

    return torch.from_numpy(raw).view(torch.bfloat16) if dtype == torch.bfloat16 else torch.from_numpy(raw)

"""The compiled functions behind :mod:`skillhub.kernels` (numba; imported only by it, only when numba is).

They are module-level functions so that numba's disk cache (``cache=True``, in ``__pycache__``) finds them again in
the next process: a function built inside another one gets a new cache entry every time. See
:mod:`skillhub.kernels` for what each computes and why it is shaped so.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros

#: Entries per block and float64 accumulators of ‖τ‖² (:data:`skillhub.kernels.LANES`, which must be equal: a test
#: holds them so; that module does not import this one's numba to read it). At most 32: a block's hits are a uint32.
LANES = 32
lanes = LANES  # a global constant: numba compiles it into the loops (their trip count is known)

jit = numba.njit(nogil=True, cache=True, boundscheck=False)


@jit
def emit(blk: Any, pos: int, t: float, c: int, m: int, idx: Any, val: Any, ab: Any) -> int:
    for i in range(m):
        a = abs(blk[i])
        if a >= t and a > 0:
            idx[c] = pos + i
            val[c] = blk[i]
            ab[c] = a
            c += 1
    return c


# Blocks are walked by range loops from 0 over views that start at ``pos`` (a block boundary): numba then knows
# every index is non-negative, drops its wraparound checks and LLVM vectorizes the block (2× faster than a
# range from ``pos``). A block's hits are a bit mask built in the vectorized loop; only its set bits are visited
# (τ recomputed from L1). At 1% about a third of the blocks hold a candidate, at random, so what costs is the
# branches' mispredictions: ~11 ns a candidate when every block branched on its hits, ~1 ns with the first hit taken
# branch-free (the scan at 1% went from 1.6× to 1.1× the same scan finding nothing). A call stops before a block the
# output might not hold (a block adds at most LANES).
@jit
def scan_f32(f: Any, b: Any, pos: int, t: float, acc: Any, idx: Any, val: Any, ab: Any) -> tuple[int, int]:
    fv, bv = f[pos:], b[pos:]
    n, cap, c = fv.size, idx.size, 0
    sq = acc.copy()  # local: LLVM does not vectorize into an argument that might alias f or b
    tt = np.float32(t)
    done = n - n % lanes
    for j in range(n // lanes):
        s = j * lanes
        if c > cap - lanes:  # the output may not take another block: the caller flushes and calls again
            done = s
            break
        hits = np.uint32(0)
        for i in range(lanes):
            d = fv[s + i] - bv[s + i]
            sq[i] += np.float64(d) * np.float64(d)
            a = abs(d)
            hits |= np.uint32((a >= tt) & (a > 0)) << np.uint32(i)
        # The first hit without a branch (written even when there is none, and not counted): a block holds at most
        # one candidate nine times in ten, and a branch on "any hit" mispredicts on a third of the blocks.
        i = trailing_zeros(np.uint64(hits) | np.uint64(1 << 32)) & 31
        d = fv[s + i] - bv[s + i]
        idx[c] = pos + s + i
        val[c] = d
        ab[c] = abs(d)
        c += hits != 0
        hits &= hits - np.uint32(1)
        while hits:
            i = trailing_zeros(hits)
            d = fv[s + i] - bv[s + i]
            idx[c] = pos + s + i
            val[c] = d
            ab[c] = abs(d)
            c += 1
            hits &= hits - np.uint32(1)
    if done == n - n % lanes and c <= cap - lanes:  # the tail, shorter than a block
        blk = np.empty(lanes, np.float32)
        for i in range(n - done):
            d = fv[done + i] - bv[done + i]
            blk[i] = d
            sq[i] += np.float64(d) * np.float64(d)
        c = emit(blk, pos + done, tt, c, n - done, idx, val, ab)
        done = n
    acc[:] = sq
    return c, pos + done


@jit
def scan_bf16(f: Any, b: Any, pos: int, t: float, acc: Any, idx: Any, val: Any, ab: Any) -> tuple[int, int]:
    # bfloat16 is the top half of a float32: widen the raw bits by a shift and read them as float32.
    fv, bv = f[pos:], b[pos:]
    n, cap, c = fv.size, idx.size, 0
    blk = np.empty(lanes, np.float32)
    bits = np.empty(2 * lanes, np.uint32)
    wide = bits.view(np.float32)
    sq = acc.copy()
    tt = np.float32(t)
    done = n
    for j in range((n + lanes - 1) // lanes):  # the last block may be short
        s = j * lanes
        if c > cap - lanes:
            done = s
            break
        m = min(lanes, n - s)
        hits = np.uint32(0)
        for i in range(m):
            bits[i] = np.uint32(fv[s + i]) << np.uint32(16)
            bits[lanes + i] = np.uint32(bv[s + i]) << np.uint32(16)
        for i in range(m):
            d = wide[i] - wide[lanes + i]
            blk[i] = d
            sq[i] += np.float64(d) * np.float64(d)
            a = abs(d)
            hits |= np.uint32((a >= tt) & (a > 0)) << np.uint32(i)
        i = trailing_zeros(np.uint64(hits) | np.uint64(1 << 32)) & 31  # the first hit without a branch, as above
        idx[c] = pos + s + i
        val[c] = blk[i]
        ab[c] = abs(blk[i])
        c += hits != 0
        hits &= hits - np.uint32(1)
        while hits:
            i = trailing_zeros(hits)
            idx[c] = pos + s + i
            val[c] = blk[i]
            ab[c] = abs(blk[i])
            c += 1
            hits &= hits - np.uint32(1)
    acc[:] = sq
    return c, pos + done


@jit
def squares_f32(t: Any, acc: Any) -> None:
    # The same lanes as the scans (entry i into lane i mod LANES, in order), so a tensor's ‖τ‖² is the same float
    # whichever pass computed it.
    n = t.size
    sq = acc.copy()
    for pos in range(0, n - n % lanes, lanes):
        for i in range(lanes):
            sq[i] += np.float64(t[pos + i]) * np.float64(t[pos + i])
    for i in range(n - n % lanes, n):
        sq[i % lanes] += np.float64(t[i]) * np.float64(t[i])
    acc[:] = sq


# The threshold's sample: m lines of w consecutive entries of a tensor, one line in each of m equal strata (at a
# uniform offset in it, from a counter-based hash of the seed: splitmix64). A line costs one or two cache misses
# for w entries where w random entries cost w (the sample's cost was its misses, and the TLB's); the lines come in
# order and need no position array. A tensor shorter than a line fills the rest with -1 (below every |τ|).
@jit
def stratum(seed: int, j: int, step: float, n: int) -> int:
    z = np.uint64(seed) + np.uint64(j) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    u = np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)  # [0, 1), 53 bits
    return min(int((j + u) * step), n - 1)


@jit
def sample_f32(f: Any, b: Any, seed: int, out: Any) -> None:
    n = f.size
    m, w = out.shape
    step = n / m
    for j in range(m):
        p = max(0, min(stratum(seed, j, step, n), n - w))
        for i in range(w):
            out[j, i] = abs(f[p + i] - b[p + i]) if p + i < n else np.float32(-1)


@jit
def sample_bf16(f: Any, b: Any, seed: int, out: Any) -> None:
    n = f.size
    m, w = out.shape
    step = n / m
    bits = np.empty(2, np.uint32)
    wide = bits.view(np.float32)
    for j in range(m):
        p = max(0, min(stratum(seed, j, step, n), n - w))
        for i in range(w):
            if p + i < n:
                bits[0] = np.uint32(f[p + i]) << np.uint32(16)
                bits[1] = np.uint32(b[p + i]) << np.uint32(16)
                out[j, i] = abs(wide[0] - wide[1])
            else:
                out[j, i] = np.float32(-1)


@jit
def compact(ab: Any, idx: Any, val: Any, v: float, ties: int, out_idx: Any, out_val: Any, at: int) -> int:
    # One tensor's candidates: keep |τ| > v and the first ``ties`` of those = v, written from ``at`` on. Every
    # entry is written at c and c advances when it is kept: no branch to mispredict (about 9 in 10 candidates are
    # kept), so the outputs hold one more than they keep.
    vv = ab.dtype.type(v)
    c, t = at, 0
    for i in range(ab.size):
        a = ab[i]
        tie = (a == vv) & (t < ties)
        take = (a > vv) | tie
        t += tie
        out_idx[c] = idx[i]
        out_val[c] = val[i]
        c += take
    return c - at


@jit
def check_entries(idx: Any, val: Any, numel: int) -> int:
    # 0: fine; 1: an index out of [0, numel); 2: indices not strictly increasing; 3: a value NaN or ±Inf.
    # Flags are or-ed over the whole array rather than returned at the first bad entry: LLVM vectorizes that.
    n = idx.size
    if n and (idx[0] < 0 or idx[n - 1] >= numel):
        return 1
    unsorted = False
    for i in range(1, n):
        unsorted |= idx[i] <= idx[i - 1]
    if unsorted:
        return 2
    bad = False
    for i in range(val.size):
        bad |= (val[i] - val[i]) != 0  # NaN - NaN and Inf - Inf are NaN, which is != 0
    return 3 if bad else 0

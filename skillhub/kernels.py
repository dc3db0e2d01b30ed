"""Compiled passes over τ: one read of θ₀ and θₜ does what eager numpy needs five passes for.

Dataless localization's candidate pass (:func:`skillhub.strategies.dataless._candidates`) wants, per tensor, the
entries with |τ| ≥ t, their τ and |τ|, and ‖τ‖² for the distance check. In numpy that is a subtraction into a
workspace, ``abs``, a comparison, ``flatnonzero``, two gathers and a float64 sum of squares: each a pass through memory,
about 5× the floor of reading both tensors once (``bench/localize.py``). The kernel here does it in one pass, blocks of
:data:`LANES` entries at a time: τ into a small local block, each square into its lane's float64 accumulator, and the
block compacted only when some |τ| in it reaches t (at 1% sparsity most blocks of 32 have none above a candidate
threshold of about 1%).

**Exactly numpy's answer.** τ is the same float32 subtraction; a candidate is kept on the same rule (|τ| ≥ t and
τ ≠ 0, so t = 0 keeps the non-zeros); NaN is never a candidate and makes ‖τ‖² NaN, which the caller turns into the
FAULTS B8 error. ‖τ‖² is summed in a fixed order of its own (entry i into lane i mod :data:`LANES`, lanes added at the
end), so it is the same float whatever pieces a tensor is read in, but not bit for bit :func:`~skillhub.taskvector.
sum_of_squares`'s order: both are float64 sums of exact float32 squares.

**Optional at run time.** numba is a dependency; when it cannot be imported, or ``SKILLHUB_NO_JIT=1`` is set, or a
pair is not float32 or bfloat16 on the CPU, :func:`scan_pair` returns ``None`` and the caller takes its numpy path.
Compiled code is cached on disk (numba's ``cache=True``), so only the first run on a machine compiles (about 1 s).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

#: Entries per block, and float64 accumulators of ‖τ‖²: 32 float32 values are two AVX-512 (four AVX2) registers,
#: the width at which the compiled loop measured fastest (16 and 64 were slower) on the benchmark's 85M pair.
LANES = 32
#: Candidates a worker's output buffers hold before a flush (16 bytes each): 1 MiB per worker, so that they stay in
#: the CPU cache and a fresh worker does not fault in pages it barely uses.
OUT = 1 << 16

_kernels: Any = None  # the compiled functions of _build, on first use; False without numba (or with SKILLHUB_NO_JIT)


def _compile() -> Any:
    global _kernels
    if _kernels is None:
        if os.environ.get("SKILLHUB_NO_JIT", "") not in ("", "0"):
            _kernels = False
            return _kernels
        try:
            import numba  # noqa: F401
        except ImportError:  # pragma: no cover - numba is a dependency; a platform without its wheel falls back
            _kernels = False
        else:
            _kernels = _build()
    return _kernels


def _build() -> tuple[Any, ...]:
    import numba
    import numpy as np

    lanes = LANES
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
    # range from ``pos``). A call stops before a block the output might not hold (a block adds at most LANES).
    @jit
    def scan_f32(f: Any, b: Any, pos: int, t: float, acc: Any, idx: Any, val: Any, ab: Any) -> tuple[int, int]:
        fv, bv = f[pos:], b[pos:]
        n, cap, c = fv.size, idx.size, 0
        blk = np.empty(lanes, np.float32)
        sq = acc.copy()  # local: LLVM does not vectorize into an argument that might alias f or b
        tt = np.float32(t)
        done = n - n % lanes
        for j in range(n // lanes):
            s = j * lanes
            if c > cap - lanes:  # the output may not take another block: the caller flushes and calls again
                done = s
                break
            hit = False
            for i in range(lanes):
                d = fv[s + i] - bv[s + i]
                blk[i] = d
                sq[i] += np.float64(d) * np.float64(d)
                hit |= abs(d) >= tt
            if hit:
                c = emit(blk, pos + s, tt, c, lanes, idx, val, ab)
        if done == n - n % lanes and c <= cap - lanes:  # the tail, shorter than a block
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
            hit = False
            for i in range(m):
                bits[i] = np.uint32(fv[s + i]) << np.uint32(16)
                bits[lanes + i] = np.uint32(bv[s + i]) << np.uint32(16)
            for i in range(m):
                d = wide[i] - wide[lanes + i]
                blk[i] = d
                sq[i] += np.float64(d) * np.float64(d)
                hit |= abs(d) >= tt
            if hit:
                c = emit(blk, pos + s, tt, c, m, idx, val, ab)
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

    @jit
    def gather_f32(f: Any, b: Any, pos: Any, out: Any) -> None:
        for i in range(pos.size):
            out[i] = abs(f[pos[i]] - b[pos[i]])

    @jit
    def gather_bf16(f: Any, b: Any, pos: Any, out: Any) -> None:
        bits = np.empty(2, np.uint32)
        wide = bits.view(np.float32)
        for i in range(pos.size):
            bits[0] = np.uint32(f[pos[i]]) << np.uint32(16)
            bits[1] = np.uint32(b[pos[i]]) << np.uint32(16)
            out[i] = abs(wide[0] - wide[1])

    return scan_f32, scan_bf16, squares_f32, gather_f32, gather_bf16


def lanes() -> np.ndarray | None:
    """A fresh set of ‖τ‖² accumulators for :func:`add_squares`, or ``None`` when the compiled path is off."""
    import numpy as np

    return np.zeros(LANES, np.float64) if _compile() else None


def add_squares(t: torch.Tensor, acc: np.ndarray) -> bool:
    """Add the squares of float32 τ (a whole tensor, or its next piece: pieces a multiple of :data:`LANES` long but
    the last) into ``acc`` in the scans' order; ``False`` (nothing added) when ``t`` is not float32 on the CPU."""
    import torch

    kernels = _compile()
    if not kernels or t.dtype != torch.float32 or t.device.type != "cpu":
        return False
    kernels[2](t.detach().reshape(-1).numpy(), acc)
    return True


def total(acc: np.ndarray) -> float:
    """‖τ‖² from its lanes, added in lane order."""
    return float(sum(float(x) for x in acc))


class Buffers:
    """One worker's output buffers (reused across tensors): flat indices, τ and |τ| of up to :data:`OUT`
    candidates."""

    def __init__(self, size: int = OUT) -> None:
        import numpy as np

        size = max(size, LANES)
        self.idx = np.empty(size, np.int64)
        self.val = np.empty(size, np.float32)
        self.ab = np.empty(size, np.float32)


def _arrays(f: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> tuple[Any, Any, Any] | None:
    """The kernels and flat numpy views of a pair the compiled path takes (float32 or bfloat16 on the CPU, one
    dtype, τ wanted in float32), else ``None``."""
    import numpy as np
    import torch

    if dtype != torch.float32 or f.dtype != b.dtype or f.device.type != "cpu" or b.device.type != "cpu" \
            or f.dtype not in (torch.float32, torch.bfloat16):
        return None
    kernels = _compile()
    if not kernels:
        return None
    fa, ba = f.detach().reshape(-1), b.detach().reshape(-1)
    if f.dtype == torch.bfloat16:  # raw bits: numpy has no bfloat16
        return kernels, fa.view(torch.int16).numpy().view(np.uint16), ba.view(torch.int16).numpy().view(np.uint16)
    return kernels, fa.numpy(), ba.numpy()


def sample_abs(f: torch.Tensor, b: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """|τ| (float32) at the flat positions ``pos`` (int64), the sample of a sampled threshold, without torch's
    indexing machinery; ``None`` where :func:`scan_pair` would be."""
    import numpy as np
    import torch

    got = _arrays(f, b, dtype)
    if got is None:
        return None
    kernels, fa, ba = got
    out = np.empty(pos.numel(), np.float32)
    (kernels[4] if fa.dtype == np.uint16 else kernels[3])(fa, ba, pos.numpy(), out)
    return torch.from_numpy(out)


def scan_pair(f: torch.Tensor, b: torch.Tensor, threshold: float, bufs: Buffers, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None:
    """Flat indices (int64), τ and |τ| (float32) of the entries of τ = f − b with |τ| ≥ ``threshold`` and τ ≠ 0,
    and ‖τ‖² (float64; NaN or ±Inf when τ holds one), in one pass; ``None`` when the compiled path does not apply
    (no numba, ``SKILLHUB_NO_JIT``, τ not wanted in float32, or a pair that is not float32 or bfloat16 on the CPU
    of one dtype)."""
    import numpy as np
    import torch

    got = _arrays(f, b, dtype)
    if got is None:
        return None
    kernels, fa, ba = got
    kernel = kernels[1] if fa.dtype == np.uint16 else kernels[0]
    acc = np.zeros(LANES, np.float64)
    n, pos = fa.size, 0
    parts: list[tuple[np.ndarray, ...]] = []
    while True:
        c, pos = kernel(fa, ba, pos, threshold, acc, bufs.idx, bufs.val, bufs.ab)
        parts.append((bufs.idx[:c].copy(), bufs.val[:c].copy(), bufs.ab[:c].copy()))
        if pos >= n:
            break
    sq = total(acc)
    if len(parts) == 1:
        idx, val, ab = parts[0]
    else:
        idx, val, ab = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return torch.from_numpy(idx), torch.from_numpy(val), torch.from_numpy(ab), sq


def warm() -> bool:
    """Compile (or load from numba's cache) both kernels on a few entries, so the first real pass does not pay for
    it; ``False`` when the compiled path is off. The daemon calls it at start-up, beside its other work."""
    import torch

    if not _compile():
        return False
    bufs = Buffers(LANES)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.arange(2 * LANES + 3, dtype=torch.float32).to(dt)
        scan_pair(x, torch.zeros_like(x), 1.0, bufs, torch.float32)
    return True

"""Compiled passes over τ: one read of θ₀ and θₜ does what eager numpy needs five passes for.

Dataless localization's candidate pass (:func:`skillhub.strategies.dataless._candidates`) wants, per tensor, the
entries with |τ| ≥ t, their τ and |τ|, and ‖τ‖² for the distance check. In numpy that is a subtraction into a
workspace, ``abs``, a comparison, ``flatnonzero``, two gathers and a float64 sum of squares: each a pass through memory,
about 5× the floor of reading both tensors once (``bench/localize.py``). The kernel here does it in one pass, blocks of
:data:`LANES` entries at a time: τ, each square into its lane's float64 accumulator, and a bit mask of the entries
that reach t, whose set bits alone are written out (at 1% sparsity about a third of the blocks of 32 hold a
candidate, at random: the first is taken without a branch). The candidates stay in a per-worker arena
(:class:`Buffers`). The rest of the localization is compiled too: the threshold's sample (:func:`sample_abs`), the
exact selection's compaction (:func:`compact`) and the check of the result (:func:`check_entries`).

**Exactly numpy's answer.** τ is the same float32 subtraction; a candidate is kept on the same rule (|τ| ≥ t and
τ ≠ 0, so t = 0 keeps the non-zeros); NaN is never a candidate and makes ‖τ‖² NaN, which the caller turns into the
FAULTS B8 error. ‖τ‖² is summed in a fixed order of its own (entry i into lane i mod :data:`LANES`, lanes added at the
end), so it is the same float whatever pieces a tensor is read in, but not bit for bit :func:`~skillhub.taskvector.
sum_of_squares`'s order: both are float64 sums of exact float32 squares.

**When it runs.** numba is a dependency, but loading it costs about 0.4 s a process (:data:`JIT_FROM`): the
service loads it at start-up in the background (:func:`warm`), so every drop takes the compiled pass; a one-off
``skillhub localize`` takes it only for a model big enough to gain. Without numba, with ``SKILLHUB_NO_JIT=1``, or
for a pair that is not float32 or bfloat16 on the CPU, callers take their numpy path. Machine code is cached on disk
(numba's ``cache=True``): only the first run on a machine compiles (about 3 s).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

#: Entries per block, and float64 accumulators of ‖τ‖²: 32 float32 values are two AVX-512 (four AVX2) registers,
#: the width at which the compiled loop measured fastest (16 and 64 were slower) on the benchmark's 85M pair.
#: The same as :data:`skillhub.jitted.LANES` (written twice so that reading it needs no numba; a test holds them equal).
LANES = 32
#: The smallest first arena of a worker's :class:`Buffers` (16 bytes a candidate: 1 MiB), for a pass whose caller
#: expects few candidates or does not say; one that expects more sizes it to them.
OUT = 1 << 16
#: The largest arena :class:`Buffers` grows to (64 MiB): a bigger pass takes several.
ARENA_MAX = 1 << 22

#: A process that has not loaded the compiled code yet loads it for a pass over at least this many entries: loading
#: costs about 0.4 s (importing numba, its registries, the cached machine code) and saves about 0.8 ns an entry, so a
#: one-off `skillhub localize` of an 85M model is faster without it. The service loads it at start-up (:func:`warm`,
#: in the background), after which every pass takes it.
JIT_FROM = 1 << 30

_lock = threading.Lock()
_kernels: Any = None  # the module skillhub.jitted, on first use; False without numba (or with SKILLHUB_NO_JIT)


def ready(numel: int) -> bool:
    """Whether a pass over ``numel`` entries should take the compiled path: when it is loaded already, or when the
    pass is long enough to pay for loading it (:data:`JIT_FROM`; it is then loaded here)."""
    if _kernels is None and numel < JIT_FROM:
        return False
    return bool(_compile())


def _compile() -> Any:
    with _lock:  # the service's warm-up thread and a first localization may both ask
        return _load()


def _load() -> Any:
    global _kernels
    if _kernels is None:
        if os.environ.get("SKILLHUB_NO_JIT", "") not in ("", "0"):
            _kernels = False
            return _kernels
        try:
            from skillhub import jitted
        except ImportError:  # pragma: no cover - numba is a dependency; a platform without its wheel falls back
            _kernels = False
        else:
            _kernels = jitted
    return _kernels


def lanes(t: torch.Tensor) -> np.ndarray | None:
    """A fresh set of ‖τ‖² accumulators for :func:`add_squares` of τ like ``t`` (float32 on the CPU), or ``None``
    when the compiled path does not take it (off, or another dtype or device: the caller sums in its own order)."""
    import numpy as np
    import torch

    return np.zeros(LANES, np.float64) if _kernels and t.dtype == torch.float32 and t.device.type == "cpu" else None


def add_squares(t: torch.Tensor, acc: np.ndarray) -> None:
    """Add the squares of float32 τ (a whole tensor, or its next piece: pieces a multiple of :data:`LANES` long but
    the last) into ``acc``, lanes from :func:`lanes`, in the scans' order."""
    _kernels.squares_f32(t.detach().reshape(-1).numpy(), acc)


def total(acc: np.ndarray) -> float:
    """‖τ‖² from its lanes, added in lane order."""
    return float(sum(acc.tolist()))


class Buffers:
    """One worker's output (flat indices, τ and |τ| of candidates), an arena: each tensor's candidates are views of
    it, never copied out. A full arena is followed by one twice its size (up to :data:`ARENA_MAX`), so a pass that
    finds more candidates than its caller sized the first arena for takes a few more, not thousands."""

    def __init__(self, size: int = OUT) -> None:
        self.size = max(size, 2 * LANES) // 2
        self.grow()

    def grow(self) -> None:
        """Start a fresh arena (views of the last one stay valid)."""
        import numpy as np

        self.size = min(2 * self.size, max(ARENA_MAX, self.size))
        self.idx = np.empty(self.size, np.int64)
        self.val = np.empty(self.size, np.float32)
        self.ab = np.empty(self.size, np.float32)
        self.used = 0


def _arrays(f: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> tuple[Any, Any, Any] | None:
    """:mod:`skillhub.jitted` and flat numpy views of a pair the compiled path takes (float32 or bfloat16 on the CPU, one
    dtype, τ wanted in float32), else ``None``. Called per tensor and pass, so written for its ~2 µs (the attributes
    torch answers fastest; numpy's ravel, not torch's reshape)."""
    import numpy as np
    import torch

    jitted = _kernels  # loaded by ready() or warm(); never here, where loading would cost more than one pass saves
    kind = f.dtype
    if not jitted or dtype != torch.float32 or kind != b.dtype or not (f.is_cpu and b.is_cpu) \
            or (kind != torch.float32 and kind != torch.bfloat16):
        return None
    if f.requires_grad or b.requires_grad:
        f, b = f.detach(), b.detach()
    if kind == torch.bfloat16:  # raw bits: numpy has no bfloat16
        return jitted, f.view(torch.int16).numpy().view(np.uint16).ravel(), \
            b.view(torch.int16).numpy().view(np.uint16).ravel()
    return jitted, f.numpy().ravel(), b.numpy().ravel()


def sample_abs(f: torch.Tensor, b: torch.Tensor, seed: int, out: np.ndarray, dtype: torch.dtype) -> bool:
    """Fill ``out`` (float32, m × w) with |τ| of τ = f − b on m lines of w consecutive flat entries, one line drawn in
    each of m equal strata of the tensor (from ``seed``, 0 ≤ seed < 2⁶³; -1 past the end of a tensor shorter than a
    line): the sample of a sampled threshold. ``False`` (``out`` untouched) where :func:`scan_pair` would return
    ``None``."""
    import numpy as np

    got = _arrays(f, b, dtype)
    if got is None:
        return False
    jitted, fa, ba = got
    (jitted.sample_bf16 if fa.dtype == np.uint16 else jitted.sample_f32)(fa, ba, seed, out)
    return True


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
    jitted, fa, ba = got
    kernel = jitted.scan_bf16 if fa.dtype == np.uint16 else jitted.scan_f32
    acc = np.zeros(LANES, np.float64)
    n, pos = fa.size, 0
    parts: list[tuple[np.ndarray, ...]] = []
    while True:
        if bufs.size - bufs.used < 2 * LANES:
            bufs.grow()
        s0 = bufs.used
        c, pos = kernel(fa, ba, pos, threshold, acc, bufs.idx[s0:], bufs.val[s0:], bufs.ab[s0:])
        bufs.used += c
        parts.append((bufs.idx[s0:s0 + c], bufs.val[s0:s0 + c], bufs.ab[s0:s0 + c]))
        if pos >= n:
            break
        bufs.grow()  # full before the tensor's end
    sq = total(acc)
    if len(parts) == 1:
        idx, val, ab = parts[0]
    else:
        idx, val, ab = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return torch.from_numpy(idx), torch.from_numpy(val), torch.from_numpy(ab), sq


def compact(ab: np.ndarray, idx: np.ndarray, val: np.ndarray, v: float, ties: int, out_idx: np.ndarray,
            out_val: np.ndarray, at: int) -> int | None:
    """Copy one tensor's kept candidates (|τ| ``ab`` > v, and the first ``ties`` of those = v) to ``out_*[at:]``
    (indices int32 or int64) and return how many: the exact selection's compaction. The outputs must hold one entry
    more than all that is kept. ``None`` where the compiled path is off or the arrays are not float32 |τ| and τ with int64 indices (the
    caller compacts with numpy)."""
    import numpy as np

    jitted = _kernels
    if not jitted or ab.dtype != np.float32 or val.dtype != np.float32 or idx.dtype != np.int64 \
            or out_idx.dtype not in (np.int32, np.int64):
        return None
    return int(jitted.compact(ab, idx, val, v, ties, out_idx, out_val, at))


def check_entries(idx: np.ndarray, val: np.ndarray, numel: int) -> int | None:
    """A mask's entries for one tensor checked in one compiled pass: 0 when the flat indices are strictly increasing
    in [0, numel) and every value finite, else 1 (out of range), 2 (unsorted or repeated) or 3 (NaN or ±Inf).
    ``None`` where the compiled path is off or the arrays are not int32/int64 indices and float32 values."""
    import numpy as np

    jitted = _kernels
    if not jitted or val.dtype != np.float32 or idx.dtype not in (np.int32, np.int64):
        return None
    return int(jitted.check_entries(idx, val, numel))


def warm() -> bool:
    """Load both scans and the other compiled functions (from numba's disk cache, or compiling them the first time
    on a machine) by running each on a few entries, so that the first real pass does not pay for it; ``False`` when
    the compiled path is off or failed to load (it is then off for this process: callers take their numpy path)."""
    global _kernels
    import numpy as np
    import torch

    try:
        if not _compile():
            return False
        bufs = Buffers(LANES)
        for dt in (torch.float32, torch.bfloat16):
            x = torch.arange(2 * LANES + 3, dtype=torch.float32).to(dt)
            scan_pair(x, torch.zeros_like(x), 1.0, bufs, torch.float32)
            sample_abs(x, torch.zeros_like(x), 1, np.empty((2, 4), np.float32), torch.float32)
        one = torch.ones(LANES + 1)
        add_squares(one, lanes(one))
        ab = np.ones(4, np.float32)
        for out in (np.empty(5, np.int64), np.empty(5, np.int32)):  # indices as the mask stores them
            compact(ab, np.arange(4), ab, 1.0, 2, out, np.empty(5, np.float32), 0)
            check_entries(out[:2], ab, 4)
        return True
    except Exception as e:  # noqa: BLE001 - a broken numba install must not stop the service: numpy serves
        from skillhub.log import get_logger

        get_logger("skillhub.kernels").warning("kernels_unavailable", error=f"{type(e).__name__}: {e}")
        _kernels = False
        return False

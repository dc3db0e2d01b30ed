"""The process's heap: glibc malloc settings the service makes (no effect off glibc).

- **Two arenas** (:func:`limit_malloc_arenas`, as ``MALLOC_ARENA_MAX=2`` would): a long-running service whose
  request and rebuild threads free large tensors gets one arena per thread by default, and their freed-but-kept
  pages grow the RSS by megabytes a minute (``bench/soak.py`` measured 2-8 MiB/min, and 0.2 with two arenas).
- **A fixed mmap threshold for big models** (:func:`fix_mmap_threshold`, as ``MALLOC_MMAP_THRESHOLD_=131072``
  would): glibc raises its threshold each time a large block is freed, after which localization's freed scratch
  stays in the heap instead of going back to the kernel. On a 1B-parameter bf16 model with 8 skills that kept the
  peak at 2.1-2.6× one model copy instead of 1.55× (``bench/scale.py``). Fixing the threshold costs fresh page
  faults on every large allocation, so the service does it only from ``[stitch] sparse_from`` on, where memory is
  the constraint; smaller models keep glibc's dynamic threshold.

An environment variable that already sets either wins: these are defaults, not overrides.
"""

from __future__ import annotations

import os

M_ARENA_MAX = -8  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
#: The fixed threshold: allocations from 128 KiB on are mapped, and unmapped when freed.
MMAP_THRESHOLD = 128 * 1024


def _mallopt(param: int, value: int) -> bool:
    try:
        import ctypes

        return bool(ctypes.CDLL(None).mallopt(param, value))
    except (OSError, AttributeError):
        return False


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas, unless ``MALLOC_ARENA_MAX`` is set. Returns whether the cap was set."""
    return False if "MALLOC_ARENA_MAX" in os.environ else _mallopt(M_ARENA_MAX, arenas)


def fix_mmap_threshold(parameters: int, sparse_from: int) -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for a model of ``parameters`` included parameters at or
    above ``sparse_from``, unless ``MALLOC_MMAP_THRESHOLD_`` is set. Returns whether it was set."""
    if parameters < sparse_from or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)

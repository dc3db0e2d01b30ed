"""The service's glibc heap settings: set only where they apply, never over the environment's."""

from __future__ import annotations

import ctypes
import platform

import pytest

from skillhub import heap


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> bool:
        seen.append((param, value))
        return True

    monkeypatch.setattr(heap, "_mallopt", mallopt)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    return seen


def test_the_mmap_threshold_is_fixed_only_for_models_at_or_above_sparse_from(calls, monkeypatch) -> None:
    assert not heap.fix_mmap_threshold(499, 500) and calls == []
    assert heap.fix_mmap_threshold(500, 500) and calls == [(heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD)]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the environment's own choice wins
    assert not heap.fix_mmap_threshold(10**9, 500) and len(calls) == 1


def test_arenas_are_capped_unless_the_environment_says(calls, monkeypatch) -> None:
    assert heap.limit_malloc_arenas(2) and calls == [(heap.M_ARENA_MAX, 2)]
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not heap.limit_malloc_arenas(2) and len(calls) == 1


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_both_settings() -> None:
    libc = ctypes.CDLL(None)
    assert libc.mallopt(heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD) == 1 and libc.mallopt(heap.M_ARENA_MAX, 2) == 1

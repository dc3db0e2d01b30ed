"""Shared fixtures: tiny seeded synthetic models."""

from __future__ import annotations

import torch
import pytest


def random_model(seed: int, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a.weight": (12, 10), "a.bias": (12,), "b.weight": (3, 4, 5)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.fixture
def base_model() -> dict[str, torch.Tensor]:
    return random_model(0)


# Fingerprints stay in memory during tests (a test of the on-disk store names its own): the user's cache is left
# alone, and no test can pass only because an earlier run hashed its file.
import os  # noqa: E402

os.environ["SKILLHUB_CACHE_DIR"] = ""

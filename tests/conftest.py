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

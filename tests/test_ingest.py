"""Ingest: a checkpoint becomes a registered version; random strategies get a seed of the checkpoint's own."""

from __future__ import annotations

from pathlib import Path

import torch

from skillhub.checkpoint import write_safetensors
from skillhub.config import load_config
from skillhub.hub import Hub
from skillhub.ingest import skill_seed

REPO = Path(__file__).resolve().parent.parent


def test_skill_seed_is_the_checkpoints_hash() -> None:
    assert skill_seed("0000000a" + "f" * 56) == 10 and skill_seed("") == 0
    assert skill_seed("ab" * 32) != skill_seed("cd" * 32)


def test_dare_draws_different_positions_for_different_skills_and_the_same_for_the_same_checkpoint(
        tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=g)}
    tau = 0.01 * torch.randn(64, 64, generator=g)
    write_safetensors(tmp_path / "base.safetensors", base, {})
    (tmp_path / "config.toml").write_text(
        f'[base]\nweights = "{tmp_path / "base.safetensors"}"\n[state]\ndir = "{tmp_path / "state"}"\n'
        f'[plugins]\ndirs = ["{REPO / "plugins"}"]\n[localize]\nstrategy = "dare"\n'
        f'[localize.params]\ndrop_rate = 0.9\n')
    # two skills with the same τ: only their files differ (a metadata entry), so only their seeds can differ
    for name in ("a", "b"):
        write_safetensors(tmp_path / f"{name}.safetensors", {"w": base["w"] + tau}, {"note": name})
    with Hub(load_config(tmp_path / "config.toml", env={})) as hub:
        rows = {n: hub.ingest(tmp_path / f"{n}.safetensors", skill=n) for n in ("a", "b")}
        masks = {n: hub.registry.load_mask(r.mask_sha or "").mask("w") for n, r in rows.items()}
    assert not torch.equal(masks["a"], masks["b"])
    with Hub(load_config(tmp_path / "config.toml", env={})) as hub:  # localized again: the same positions
        hub.registry.remove_skill("a")
        again = hub.ingest(tmp_path / "a.safetensors", skill="a")
        assert torch.equal(hub.registry.load_mask(again.mask_sha or "").mask("w"), masks["a"])

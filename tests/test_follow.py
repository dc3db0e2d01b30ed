"""Serving replicas: a follower replays a manifest's mask adds/removes on its own stitcher and serves the primary's
weights bit for bit; it never writes the state folder; a version it cannot apply is not served."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from skillhub.checkpoint import write_safetensors
from skillhub.config import Config, load_config
from skillhub.delta import SparseDelta
from skillhub.errors import FollowerError
from skillhub.follow import Follower, apply_manifest, replay_plan
from skillhub.hub import Hub
from skillhub.metrics import Metrics
from skillhub.stitch import Stitcher, stitch
from test_stitch import PLUGINS, base_model, random_delta

DESCRIBE = {"base": "b" * 64, "family": "state_dict", "policy": "average", "policy_params": {}}


def test_replay_plan_removes_what_left_or_changed_and_adds_what_is_new() -> None:
    removes, adds = replay_plan({"a": "1", "b": "2", "c": "3"}, {"b": "2", "c": "4", "d": "5"})
    assert (removes, adds) == (["a", "c"], ["c", "d"])
    assert replay_plan({"a": "1"}, {"a": "1"}) == ([], [])


def test_replaying_manifests_equals_the_primary_bit_for_bit_whatever_versions_are_skipped() -> None:
    """A primary's random sequence of adds, removes and new masks for a skill; followers that see every version,
    every other one, or only the last end with the primary's weights, bit for bit, and with a stitch from scratch
    of the last version's masks."""
    rng = random.Random(7)
    policy = PLUGINS.make_policy("average", {})
    base = base_model()
    masks = {f"m{i}": random_delta(i, density=0.3) for i in range(12)}
    primary, active = Stitcher(base, policy, device="cpu"), {}
    manifests = []
    for _ in range(30):
        name = rng.choice("abcde")
        if name in active and rng.random() < 0.5:
            primary.remove(name)
            del active[name]
        else:
            if name in active:
                primary.remove(name)
            active[name] = rng.choice(sorted(masks))
            primary.add(name, masks[active[name]])
        manifests.append({"skills": {n: {"mask": sha} for n, sha in active.items()}})
    want = primary.snapshot()
    from_scratch = stitch(base, {n: masks[sha] for n, sha in active.items()}, policy)
    for every in (1, 2, 7, len(manifests)):
        follower, theirs = Stitcher(base, policy, device="cpu"), {}
        loaded: list[str] = []
        for manifest in manifests[every - 1::every] + [manifests[-1]]:
            apply_manifest(follower, theirs, manifest, lambda sha: loaded.append(sha) or masks[sha])
        got = follower.snapshot()
        assert theirs == active
        for k in base:
            assert torch.equal(got[k], want[k]), (every, k)
            assert torch.equal(got[k], from_scratch[k]), (every, k)
        if every == len(manifests):  # one jump: only the last version's masks are read
            assert sorted(loaded) == sorted(active.values())


def test_a_missing_mask_changes_nothing_and_the_next_call_completes() -> None:
    policy = PLUGINS.make_policy("average", {})
    base = base_model()
    masks = {"x": random_delta(1), "y": random_delta(2)}
    s, active = Stitcher(base, policy, device="cpu"), {}
    apply_manifest(s, active, {"skills": {"a": {"mask": "x"}}}, masks.__getitem__)
    before = s.snapshot()

    def missing(sha: str) -> SparseDelta:
        raise FileNotFoundError(sha)

    with pytest.raises(FileNotFoundError):
        apply_manifest(s, active, {"skills": {"b": {"mask": "y"}}}, missing)
    assert active == {"a": "x"} and s.active == ["a"]
    assert all(torch.equal(s.tensor(k).reshape(-1), before[k].reshape(-1)) for k in base)
    apply_manifest(s, active, {"skills": {"b": {"mask": "y"}}}, masks.__getitem__)
    assert active == {"b": "y"} and s.active == ["b"]


# --- the Follower over a hand-made models/ folder ------------------------------------------------------------------


def _folder(tmp_path: Path) -> tuple[Path, dict[str, SparseDelta]]:
    (tmp_path / "models").mkdir()
    (tmp_path / "masks").mkdir()
    shas = {}
    for i in (1, 2):
        delta = random_delta(i)
        sha = delta.save(tmp_path / "masks" / ".tmp")
        os.replace(tmp_path / "masks" / ".tmp", tmp_path / "masks" / f"{sha}.mask.safetensors")
        shas[sha] = delta
    return tmp_path, shas


def _publish(root: Path, number: int, skills: dict[str, str], **describe: object) -> None:
    manifest = {**DESCRIBE, **describe, "skills": {n: {"mask": sha, "version": 1} for n, sha in skills.items()},
                "held": {}, "version": number, "created": 0.0}
    (root / "models" / str(number)).mkdir()
    (root / "models" / str(number) / "manifest.json").write_text(json.dumps(manifest))
    (root / "models" / ".current.tmp").write_text(f"{number}\n")
    os.replace(root / "models" / ".current.tmp", root / "models" / "current")


def _follower(root: Path) -> Follower:
    return Follower(masks=lambda sha: SparseDelta.load(root / "masks" / f"{sha}.mask.safetensors"),
                    models_dir=root / "models", stitcher=Stitcher(base_model(), PLUGINS.make_policy("average", {}),
                                                                  device="cpu"),
                    passthrough={"extra": torch.ones(3)}, describe=DESCRIBE, metrics=Metrics())


def test_follower_serves_each_new_version_and_keeps_the_last_when_one_cannot_be_applied(tmp_path: Path) -> None:
    root, deltas = _folder(tmp_path)
    (x, dx), (y, dy) = deltas.items()
    f = _follower(root)
    assert f.poll() is None and f.current is None  # nothing published yet
    _publish(root, 1, {"a": x})
    v1 = f.poll()
    assert v1 is not None and v1.number == 1 and f.current is v1 and set(v1.tensors) == {*base_model(), "extra"}
    want = stitch(base_model(), {"a": dx}, PLUGINS.make_policy("average", {}))
    assert all(torch.equal(v1.tensors[k], want[k]) for k in want)
    assert f.poll() is None  # current did not move
    assert f.health() == {"ok": True, "version": 1, "primary_version": 1, "lag_seconds": round(f.lag, 4)}

    _publish(root, 2, {"a": x, "b": "f" * 64})  # a mask the follower cannot read (removed meanwhile)
    assert f.poll() is None and f.current is v1
    health = f.health()
    assert health["ok"] is False and health["primary_version"] == 2 and "mask" in health["last_error"]

    _publish(root, 3, {"b": y}, policy="sum")  # made with another stitch policy than this follower's
    assert f.poll() is None and f.current is v1
    assert "policy" in f.health()["last_error"]

    _publish(root, 4, {"b": y})
    v4 = f.poll()
    assert v4 is not None and v4.number == 4 and f.health()["ok"] is True and "last_error" not in f.health()
    want = stitch(base_model(), {"b": dy}, PLUGINS.make_policy("average", {}))
    assert all(torch.equal(v4.tensors[k], want[k]) for k in want)
    assert all(torch.equal(v1.tensors[k], stitch(base_model(), {"a": dx}, PLUGINS.make_policy("average", {}))[k])
               for k in want)  # the version a request holds never changes (copy on write)
    assert f.metrics.follow_version._value.get() == 4


# --- a follower hub beside a primary hub on one real state folder ----------------------------------------------------


def _tree(state: Path) -> dict[str, str]:
    return {str(p.relative_to(state)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(state.rglob("*")) if p.is_file()}


def test_a_follower_hub_serves_the_primarys_versions_writes_nothing_and_refuses_changes(tmp_path: Path) -> None:
    g, base, cfg = _small_service(tmp_path, seed=0)
    with _primary_and_follower(cfg) as (primary, follower):
        for i in range(3):
            primary.ingest(_finetune(tmp_path, f"s{i}", base, g), skill=f"s{i}")
        primary.reconcile()
        primary.reconciler.publisher.flush()
        before = _tree(tmp_path / "state")
        follower.start()
        assert follower.current is not None and follower.current.number == primary.current.number
        assert all(torch.equal(follower.current.tensors[k], primary.current.tensors[k]) for k in base)
        assert [s["name"] for s in follower.skills_view()] == ["s0", "s1", "s2"]
        _, skill_w = follower.skill_weights("s1")
        _, want_w = primary.skill_weights("s1")
        assert all(torch.equal(skill_w[k], want_w[k]) for k in base)
        for change in (lambda: follower.set_enabled("s0", False), lambda: follower.pin("s0", 1),
                       lambda: follower.remove("s0"), lambda: follower.ingest(tmp_path / "s0.safetensors")):
            with pytest.raises(FollowerError, match="read-only follower"):
                change()
        assert _tree(tmp_path / "state") == before  # same files, same bytes: nothing written, nothing created

        primary.set_enabled("s1", False)
        primary.remove("s2")
        primary.reconcile()
        follower.reconciler.poll()  # (its watch thread may have been first)
        assert follower.current.number == primary.current.number
        assert set(follower.current.manifest["skills"]) == {"s0"}
        assert all(torch.equal(follower.current.tensors[k], primary.current.tensors[k]) for k in base)


def test_a_follower_refuses_a_state_folder_nobody_published_in(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "base.safetensors", base_model(), {})
    (tmp_path / "config.toml").write_text('[base]\nweights = "base.safetensors"\n[state]\ndir = "state"\n')
    hub = Hub(load_config(tmp_path / "config.toml", env={}), follow=True)
    with pytest.raises(Exception, match="start the primary"):
        hub.start()
    assert not (tmp_path / "state").exists()


def test_a_follower_hub_answers_with_the_heads_the_manifest_names(tmp_path: Path) -> None:
    """The primary's gate re-centres heads per route and names them in the manifest (``quality``); a follower
    serves those, read from ``state/heads/``."""
    from skillhub.head import Head

    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(6, 5, generator=g)}
    write_safetensors(tmp_path / "base.safetensors", base, {})
    (tmp_path / "config.toml").write_text('[base]\nweights = "base.safetensors"\n[state]\ndir = "state"\n'
                                          '[localize]\nmax_relative_delta = 100.0\n[localize.params]\n'
                                          'sparsity = 0.5\n')
    cfg = load_config(tmp_path / "config.toml", env={})
    with _primary_and_follower(cfg) as (primary, follower):
        write_safetensors(tmp_path / "s.safetensors", {"w": base["w"] + torch.randn(6, 5, generator=g)}, {})
        primary.ingest(tmp_path / "s.safetensors", skill="s")
        primary.reconcile()
        heads = {route: primary.registry.store_head(*Head(torch.randn(3, 4, generator=g), None, ["x", "y", "z"],
                                                               scale).encode())
                 for route, scale in (("merged", 2.0), ("skill", 3.0))}
        models = tmp_path / "state" / "models"
        manifest = json.loads((models / str(primary.current.number) / "manifest.json").read_text())
        manifest.update(version=manifest["version"] + 1, quality={"s": {"heads": heads}})
        (models / str(manifest["version"])).mkdir()
        (models / str(manifest["version"]) / "manifest.json").write_text(json.dumps(manifest))
        (models / "current").write_text(f"{manifest['version']}\n")
        follower.start()
        assert follower.current.number == manifest["version"]
        assert follower.engine.head(follower.current, "s", "merged").scale == 2.0
        assert follower.engine.head(follower.current, "s", "skill").scale == 3.0


def test_a_follower_reads_the_primarys_token_and_never_makes_one(tmp_path: Path) -> None:
    from skillhub.daemon import resolve_token
    from skillhub.errors import ConfigError

    (tmp_path / "state").mkdir()
    cfg = load_config(None, env={"SKILLHUB_STATE__DIR": str(tmp_path / "state")})
    os.environ.pop(cfg.serve.token_env, None)
    with pytest.raises(ConfigError, match="start the primary first"):
        resolve_token(cfg, create=False)
    assert not (tmp_path / "state" / "token").exists()
    token = resolve_token(cfg)  # the primary makes it; the follower reads the same
    assert resolve_token(cfg, create=False) == token


def test_a_follower_hub_shows_the_primarys_history_and_kept_versions_analytics(tmp_path: Path) -> None:
    g, base, cfg = _small_service(tmp_path, seed=3)
    with _primary_and_follower(cfg) as (primary, follower):
        for i in range(2):
            primary.ingest(_finetune(tmp_path, f"s{i}", base, g), skill=f"s{i}")
            primary.reconcile()
        primary.reconciler.publisher.flush()
        follower.start()
        assert follower.current is not None and follower.current.number == primary.current.number
        assert [h["version"] for h in follower.history()] == [h["version"] for h in primary.history()]
        older = primary.history()[-1]["version"]
        assert older != follower.current.number
        assert follower.analytics(older) == primary.analytics(older)


def _small_service(tmp_path: Path, *, seed: int) -> tuple[torch.Generator, dict[str, torch.Tensor], Config]:
    """A two-tensor base and the config of a primary and its follower on one state folder (masks of 30%)."""
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}
    write_safetensors(tmp_path / "base.safetensors", base, {})
    (tmp_path / "config.toml").write_text('[base]\nweights = "base.safetensors"\n[state]\ndir = "state"\n'
                                          '[localize]\nmax_relative_delta = 100.0\n[localize.params]\nsparsity = 0.3\n')
    return g, base, load_config(tmp_path / "config.toml", env={})


def _finetune(tmp_path: Path, name: str, base: dict[str, torch.Tensor], g: torch.Generator) -> Path:
    """A finetune of ``base`` (unit noise on every entry) written as ``NAME.safetensors``."""
    path = tmp_path / f"{name}.safetensors"
    write_safetensors(path, {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}, {})
    return path


@contextmanager
def _primary_and_follower(cfg: Config) -> Iterator[tuple[Hub, Hub]]:
    """A started primary Hub and a follower Hub (not started) on the same config, both closed afterwards."""
    primary = Hub(cfg)
    primary.start()
    follower = Hub(cfg, follow=True)
    try:
        yield primary, follower
    finally:
        follower.close()
        primary.close()

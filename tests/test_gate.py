"""The quality gate scores each skill with examples on a candidate (base, own model, merged) and names the skills a
candidate makes worse: below the base model, or more than max_drop below the version served now."""

from __future__ import annotations

import hashlib

import torch
from test_open_clip import tiny  # noqa: F401  (a fixture)
from test_quality import MeanColour

from skillhub.delta import SparseDelta
from skillhub.families import Examples
from skillhub.gate import Gate
from skillhub.head import Head
from skillhub.publish import ModelVersion


def colours(seed: int = 1) -> Examples:
    """Reddish images (class 0) and bluish ones (class 1), 8 each."""
    g = torch.Generator().manual_seed(seed)
    red = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    red[:, 0] = torch.randint(150, 255, (8, 4, 4), generator=g, dtype=torch.uint8)
    blue = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    blue[:, 2] = torch.randint(150, 255, (8, 4, 4), generator=g, dtype=torch.uint8)
    return Examples(torch.cat([red, blue]), torch.tensor([0] * 8 + [1] * 8))


BASE = {"w": torch.eye(3)}
HEAD = Head(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), None, ["red", "blue"], 10.0)
# the skill's own mask: a small change of w that keeps the colours apart
MASK = SparseDelta({"w": torch.tensor([1, 4])}, {"w": torch.tensor([0.1, -0.2])}, {"w": (3, 3)},
                   {"w": torch.float32})
COLLAPSED = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])  # red and blue embed alike


def make_gate(stored: dict[str, Head], base: dict[str, torch.Tensor] = BASE) -> Gate:
    def store(head: Head) -> str:
        sha = hashlib.sha256(head.weight.numpy().tobytes()).hexdigest()
        stored[sha] = head
        return sha

    return Gate(runtime=MeanColour, base=lambda: base, heads={"h": HEAD}.get, examples={"e": colours()}.__getitem__,
                masks={"m": MASK}.__getitem__, store_head=store)


def candidate(number: int, w: torch.Tensor, quality: dict | None = None) -> ModelVersion:
    manifest = {"skills": {"colours": {"version": 1, "mask": "m", "head": "h", "examples": "e"},
                           "plain": {"version": 1, "mask": "m", "head": "h"}}}  # no examples: not scored
    if quality is not None:
        manifest["quality"] = quality
    return ModelVersion(number, {"w": w}, manifest)


def test_a_good_candidate_passes_and_records_accuracies_and_heads() -> None:
    stored: dict[str, Head] = {}
    gate = make_gate(stored)
    good = candidate(2, BASE["w"] + MASK.dense("w"))
    verdict = gate.evaluate(good, None, max_drop=0.05)
    assert verdict.failing == {} and set(verdict.quality) == {"colours"}
    q = verdict.quality["colours"]
    assert q["accuracy"] == {"base": 1.0, "skill": 1.0, "merged": 1.0}
    assert q["examples"] == {"fit": 12, "check": 4}
    assert set(q["heads"].values()) <= set(stored)  # the re-centred heads are stored, named by sha
    assert gate.candidate_runtime is not None and gate.candidate_runtime[0] is good


def test_a_candidate_below_the_base_model_fails_the_skill() -> None:
    verdict = make_gate({}).evaluate(candidate(3, COLLAPSED), None, max_drop=0.05)
    assert verdict.quality["colours"]["accuracy"]["merged"] == 0.5
    assert "below the base model's 1.000" in verdict.failing["colours"]


def test_a_drop_larger_than_max_drop_against_the_served_version_fails() -> None:
    served = candidate(2, BASE["w"], quality={"colours": {"accuracy": {"merged": 1.0}}})
    # a θ₀ that cannot tell the colours apart (base accuracy 0.5): only the drop against the served version can
    # fail a candidate that is no better
    gate = make_gate({}, base={"w": COLLAPSED})
    assert gate.evaluate(candidate(3, COLLAPSED), served, max_drop=0.6).failing == {}  # 1.0 -> 0.5: within 0.6
    verdict = gate.evaluate(candidate(4, COLLAPSED), served, max_drop=0.1)
    assert verdict.quality["colours"]["accuracy"]["base"] == 0.5
    assert "dropped more than 0.1 from 1.000" in verdict.failing["colours"]
    assert verdict.failing["colours"].endswith("on the check examples of skill 'colours'")


# --- the real service: two skills with examples, then a destructive one ------------------------------------------


def trained_skill(cfg, sd: dict[str, torch.Tensor], seed: int, *, steps: int = 60) -> dict[str, torch.Tensor]:
    """A skill that really learnt something: the tiny CLIP tower trained (Adam) to classify 48 random images into 3
    random classes through a frozen head; the drop carries the head and those images as its examples."""
    from skillhub.families.open_clip import ClipRuntime, create_clip

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (48, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.arange(48) % 3
    labels = labels[torch.randperm(48, generator=g)]
    head = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)
    model = create_clip(str(cfg))
    model.load_state_dict(sd)
    rt = ClipRuntime(model)
    x = rt.normalise(images)
    params = [p for n, p in model.named_parameters() if n.startswith("visual.")]
    opt = torch.optim.Adam(params, lr=3e-3)
    torch.manual_seed(seed)
    for _ in range(steps):
        feats = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        loss = torch.nn.functional.cross_entropy(20 * feats @ head.T, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out["skillhub.head.weight"] = head
    out["skillhub.examples.images"], out["skillhub.examples.labels"] = images, labels
    return out


def test_service_scores_skills_and_holds_a_destructive_one_while_the_old_version_serves(tiny, tmp_path) -> None:
    import json
    import os

    from test_open_clip import clip_daemon, png

    from skillhub.checkpoint import write_safetensors

    cfg, sd = tiny
    daemon = clip_daemon(tmp_path, cfg, "[localize.params]\nsparsity = 0.2\n[publish]\ngate = \"hold\"\nmax_drop = 0.1\n",
                         timeout=120)

    def drop(name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = tmp_path / "inbox" / f".{name}.part"
        write_safetensors(tmp, tensors, {"skillhub.classes": json.dumps(["a", "b", "c"]), "skillhub.head_scale": "20"})
        os.rename(tmp, tmp_path / "inbox" / f"{name}.safetensors")

    with daemon as (client, wait, _):
        wait(lambda: client.get("/readyz").status_code == 200, "ready")
        for name, seed in (("one", 1), ("two", 2)):
            drop(name, trained_skill(cfg, sd, seed))
            wait(lambda name=name: name in client.get("/v1/model").json()["skills"], f"{name} served")
        model = client.get("/v1/model").json()
        good_version = model["version"]
        for name in ("one", "two"):
            acc = model["skills"][name]["accuracy"]
            assert set(acc) == {"base", "skill", "merged"}, acc
            assert acc["skill"] >= acc["base"] and acc["merged"] >= acc["base"], acc  # the skill learnt something
        assert 'skillhub_skill_accuracy{route="merged",skill="one"}' in client.get("/metrics").text

        # a destructive skill: all the change a finetune may make (0.45 of the tower's norm; FAULTS B9 refuses 0.5)
        # as noise in the patch embedding alone; stitched in, it would wreck the others, so the gate holds it
        g = torch.Generator().manual_seed(7)
        bad = trained_skill(cfg, sd, 3, steps=1)
        tower = torch.cat([v.flatten() for k, v in sd.items() if k.startswith("visual.") and v.is_floating_point()])
        bad.update({k: v for k, v in sd.items() if k.startswith("visual.")})
        noise = torch.randn(sd["visual.conv1.weight"].shape, generator=g)
        bad["visual.conv1.weight"] = sd["visual.conv1.weight"] + 0.45 * tower.norm() / noise.norm() * noise
        drop("wrecker", bad)
        wait(lambda: "wrecker" in client.get("/healthz").json().get("held", {}), "wrecker held")
        model = client.get("/v1/model").json()
        assert model["version"] == good_version and set(model["skills"]) == {"one", "two"}  # the old one serves
        assert "wrecker" in model["held"] and "quality gate" in model["held"]["wrecker"]["reason"]
        view = {v["name"]: v for v in client.get("/v1/skills").json()}
        assert view["wrecker"]["held"] is not None and view["wrecker"]["active_version"] is None
        assert "held out of the merged model" in view["wrecker"]["quality"]
        files = [("images", ("a.png", png(1), "image/png"))]
        r = client.post("/v1/skills/wrecker/predict", files=files, data={"route": "merged"})
        assert r.status_code == 409 and "held out of the merged model" in r.json()["error"], r.text
        r = client.post("/v1/skills/wrecker/predict", files=files, data={"route": "skill"})
        assert r.status_code == 200 and r.json()["route"] == "skill" and r.json()["version"] == good_version
        r = client.post("/v1/skills/one/predict", files=files, data={"route": "merged"})
        assert r.status_code == 200 and r.json()["version"] == good_version


def test_the_probe_batch_fails_a_model_whose_outputs_are_not_finite() -> None:
    gate = make_gate({})
    assert gate.probe(candidate(5, BASE["w"])) is None
    huge = torch.full((3, 3), 3e38)  # finite weights, but the forward pass overflows
    assert "NaN/Inf outputs" in (gate.probe(candidate(6, huge)) or "")


def _rn_world(tmp_path, recalibrate: bool):
    """A tiny open_clip ResNet base (BatchNorm layers), two learnt skills with examples, and a Hub config."""
    import json

    from test_normstats import TINY_RN
    from test_open_clip import finetune

    from skillhub.checkpoint import write_safetensors
    from skillhub.families.open_clip import create_clip

    cfg = tmp_path / "tiny-rn.json"
    cfg.write_text(json.dumps(TINY_RN))
    torch.manual_seed(0)
    sd = {k: v.detach().clone() for k, v in create_clip(str(cfg)).state_dict().items()}
    write_safetensors(tmp_path / "base.safetensors", sd, {})
    for name, seed in (("one", 1), ("two", 2)):
        # a perturbed tower (no training: what is checked is which statistics are served, not how well)
        write_safetensors(tmp_path / f"{name}.safetensors", finetune(sd, seed, examples=True),
                          {"skillhub.classes": json.dumps(["a", "b", "c"]), "skillhub.head_scale": "20"})
    (tmp_path / "config.toml").write_text(f"""
[base]
family = "open_clip"
model = "{cfg}"
weights = "{tmp_path / 'base.safetensors'}"
[state]
dir = "{tmp_path / 'state'}"
[plugins]
dirs = []
[localize.params]
sparsity = 0.2
[publish]
gate = "warn"
recalibrate_statistics = {"true" if recalibrate else "false"}
""")
    return cfg, sd


def test_recalibrated_statistics_are_what_both_routes_serve(tmp_path) -> None:
    """With [publish] recalibrate_statistics, the served merged model and each skill's own route carry BatchNorm
    statistics re-estimated on the fit examples, exactly as an independent computation gets them; θ₀ is untouched."""
    from skillhub.checkpoint import read_tensors
    from skillhub.config import load_config
    from skillhub.families.normstats import batchnorm_statistics
    from skillhub.families.open_clip import ClipRuntime, create_clip
    from skillhub.hub import Hub
    from skillhub.quality import split
    from skillhub.routing import PatchedTensors, split_route_key

    cfg, sd = _rn_world(tmp_path, True)
    bn = {k for k in sd if k.startswith("visual.") and k.endswith(("running_mean", "running_var"))}
    x = torch.randint(0, 256, (6, 3, 32, 32), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)

    def runtime(tensors) -> ClipRuntime:
        model = create_clip(str(cfg))
        model.load_state_dict(dict(tensors))
        return ClipRuntime(model.eval())

    def recalibrated(rt: ClipRuntime, images: torch.Tensor) -> ClipRuntime:
        stats = batchnorm_statistics(rt.model, images, lambda b: rt.model.encode_image(rt.normalise(b)))
        return runtime({**rt.model.state_dict(), **stats})

    with Hub(load_config(tmp_path / "config.toml", env={})) as hub:
        for name in ("one", "two"):
            hub.ingest(tmp_path / f"{name}.safetensors", skill=name)
        hub.reconcile()
        v = hub.current
        assert v is not None and set(v.manifest["skills"]) == {"one", "two"}
        stats = hub.registry.load_statistics(v.manifest["statistics"]["merged"])
        assert set(stats) == bn
        assert all(torch.equal(v.tensors[k], stats[k]) for k in bn)  # the version's weights carry them
        assert any(not torch.allclose(stats[k], sd[k]) for k in bn)
        base_now, _ = read_tensors(tmp_path / "base.safetensors")
        assert all(torch.equal(base_now[k], sd[k]) for k in sd)  # θ₀'s stored weights never change

        # merged route: the stitched model, re-estimated on both skills' fit examples pooled (in skill-name order)
        fits = {n: split(hub.registry.load_examples(v.manifest["skills"][n]["examples"])).fit.images
                for n in ("one", "two")}
        merged = recalibrated(runtime({**sd, **hub.reconciler.stitcher.snapshot()}), torch.cat(list(fits.values())))
        assert all(torch.allclose(merged.tensors()[k], stats[k], rtol=1e-5, atol=1e-6) for k in bn)
        want = merged.embed(merged.normalise(x))
        got = hub.engine.embed(v, hub.engine.runtime(v).normalise(x))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

        # skill route: θ₀ + γ⊙τ of the skill's mask, re-estimated on that skill's own fit examples
        key = hub.engine.route_mask(v, "one", "skill")
        mask, own_stats = split_route_key(key)
        assert mask == v.manifest["skills"]["one"]["mask"]
        assert own_stats == v.manifest["quality"]["one"]["statistics"]["skill"]
        own = recalibrated(runtime(PatchedTensors(sd, hub.registry.load_mask(mask))), fits["one"])
        stored = hub.registry.load_statistics(own_stats)
        assert all(torch.allclose(own.tensors()[k], stored[k], rtol=1e-5, atol=1e-6) for k in bn)
        torch.testing.assert_close(hub.engine.embed(v, own.normalise(x), mask=key), own.embed(own.normalise(x)),
                                   rtol=1e-5, atol=1e-6)
        # the merged route after a skill batch is still the merged model (the patch does not leak)
        torch.testing.assert_close(hub.engine.embed(v, hub.engine.runtime(v).normalise(x)), want, rtol=1e-5,
                                   atol=1e-6)
        # GET /v1/model/weights?skill=one streams the same weights
        _, weights = hub.skill_weights("one", v)
        assert all(torch.allclose(weights[k], stored[k], atol=1e-6) for k in bn)
        # and an answer on route=skill is the recalibrated model's
        from PIL import Image

        img = Image.fromarray(x[0].permute(1, 2, 0).numpy())
        answer = hub.predict("one", [img], top_k=3, route="skill")
        head = hub.engine.head(v, "one", "skill")
        top = head.top_k(own.embed(own.preprocess([img])), 3)
        assert [p["label"] for p in answer["predictions"][0]] == [p["label"] for p in top[0]]


def test_without_recalibration_nothing_changes_the_statistics(tmp_path) -> None:
    from skillhub.config import load_config
    from skillhub.hub import Hub

    _, sd = _rn_world(tmp_path, False)
    with Hub(load_config(tmp_path / "config.toml", env={})) as hub:
        for name in ("one", "two"):
            hub.ingest(tmp_path / f"{name}.safetensors", skill=name)
        hub.reconcile()
        v = hub.current
        assert v is not None and "statistics" not in v.manifest
        assert "statistics" not in v.manifest["quality"]["one"]
        assert hub.engine.route_mask(v, "one", "skill") == v.manifest["skills"]["one"]["mask"]
        snap = hub.reconciler.stitcher.snapshot()
        assert all(torch.equal(v.tensors[k], snap[k]) for k in snap)


def test_the_gate_recalibrates_candidates_and_own_models_only_when_asked() -> None:
    """The statistics hook is asked for the candidate (every scored skill's fit examples pooled) and for each skill's
    own model (its own fit examples); the candidate's answer becomes its weights and its manifest names it, the own
    model's is stored and named in the skill's quality record; without ``statistics`` nothing is asked."""
    calls: list[tuple[int, torch.Tensor]] = []
    stored: dict[str, dict[str, torch.Tensor]] = {}

    def statistics(rt, images):
        calls.append((int(images.shape[0]), rt.tensors()["w"].clone()))
        return {"w": rt.tensors()["w"] * 2}  # a "statistic" that changes the model visibly

    def store_statistics(tensors):
        sha = hashlib.sha256(tensors["w"].numpy().tobytes()).hexdigest()
        stored[sha] = dict(tensors)
        return sha

    heads: dict[str, Head] = {}
    gate = make_gate(heads)
    gate._statistics, gate._store_statistics = statistics, store_statistics  # as Hub wires them
    fit = int(split_fit_size())
    off = candidate(2, BASE["w"] + MASK.dense("w"))
    gate.evaluate(off, None, max_drop=0.05)
    assert calls == [] and "statistics" not in off.manifest

    on = candidate(3, BASE["w"] + MASK.dense("w"))
    verdict = gate.evaluate(on, None, max_drop=0.05, statistics=True)
    # one call for the candidate, one for the skill's own model θ₀ + γ⊙τ, each on the fit examples
    assert [n for n, _ in calls] == [fit, fit]
    assert torch.equal(calls[0][1], BASE["w"] + MASK.dense("w"))
    torch.testing.assert_close(calls[1][1], BASE["w"] + MASK.dense("w"))
    assert torch.equal(on.tensors["w"], 2 * (BASE["w"] + MASK.dense("w")))  # the candidate's weights carry them
    assert stored[on.manifest["statistics"]["merged"]]["w"].equal(on.tensors["w"])
    assert on.manifest["statistics"]["examples"] == ["e"]
    own = verdict.quality["colours"]["statistics"]["skill"]
    torch.testing.assert_close(stored[own]["w"], 2 * (BASE["w"] + MASK.dense("w")))
    assert gate.candidate_runtime is not None and torch.equal(gate.candidate_runtime[1].tensors()["w"], on.tensors["w"])
    # a second candidate: the own model's score is cached, only the candidate is recalibrated again
    gate.evaluate(candidate(4, BASE["w"] + MASK.dense("w")), None, max_drop=0.05, statistics=True)
    assert len(calls) == 3


def split_fit_size() -> int:
    from skillhub.quality import split

    return int(split(colours()).fit.labels.numel())

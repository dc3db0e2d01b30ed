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

"""The open_clip family: included keys, tower-only checkpoints, heads, few-shot objective, inference; and the real
service classifying images over HTTP with two skills, one of them disabled, under concurrent load."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from skillhub.checkpoint import open_checkpoint, write_safetensors
from skillhub.client import Client
from skillhub.delta import Provenance
from skillhub.errors import CheckpointError, LocalizeError
from skillhub.families.open_clip import OpenClipFamily, create_clip
from skillhub.localize import LocalizeContext, run_localizer
from skillhub.ops import localize_checkpoint
from skillhub.plugins import load_plugins
from skillhub.taskvector import TaskVector

TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
TOKEN = "clip-token"


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    cfg = tmp_path / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY))
    torch.manual_seed(0)
    sd = {k: v.detach().clone() for k, v in create_clip(str(cfg)).state_dict().items()}
    write_safetensors(tmp_path / "base.safetensors", sd, {})
    return cfg, sd


def finetune(sd: dict[str, torch.Tensor], seed: int, *, tower_only: bool = False, classes: int = 3,
             examples: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if not k.startswith("visual."):
            if not tower_only:
                out[k] = v
            continue
        new = v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        out[k.removeprefix("visual.") if tower_only else k] = new
    out["skillhub.head.weight"] = torch.nn.functional.normalize(torch.randn(classes, TINY["embed_dim"], generator=g),
                                                                dim=-1)
    if examples:
        out["skillhub.examples.images"] = torch.randint(0, 256, (classes * 4, 3, 20, 20), generator=g,
                                                        dtype=torch.uint8)
        out["skillhub.examples.labels"] = torch.arange(classes * 4) % classes
    return out


def test_included_keys_are_the_image_tower(tiny, tmp_path: Path) -> None:
    cfg, sd = tiny
    fam = OpenClipFamily(model=str(cfg))
    keys = fam.included_keys(open_checkpoint(tmp_path / "base.safetensors"))
    assert keys and all(k.startswith("visual.") for k in keys)
    assert set(keys) == {k for k, v in sd.items() if k.startswith("visual.") and v.is_floating_point()}


@pytest.mark.parametrize("tower_only", [False, True])
def test_localize_whole_or_tower_only(tiny, tmp_path: Path, tower_only: bool) -> None:
    cfg, sd = tiny
    write_safetensors(tmp_path / "ft.safetensors", finetune(sd, 1, tower_only=tower_only),
                      {"skillhub.classes": json.dumps(["x", "y", "z"])})
    fam, base = OpenClipFamily(model=str(cfg)), open_checkpoint(tmp_path / "base.safetensors")
    ft = open_checkpoint(tmp_path / "ft.safetensors")
    res = localize_checkpoint(base, fam.prepare(base, ft), family=fam, localizer="dataless",
                              params={"sparsity": 0.05}, plugins=load_plugins([]), skill="s")
    assert set(res.delta.shapes) == set(fam.included_keys(base))
    head = fam.head(base, ft, None)
    assert head is not None and head.classes == ["x", "y", "z"] and head.weight.shape == (3, TINY["embed_dim"])


def test_wrong_tower_is_rejected(tiny, tmp_path: Path) -> None:
    cfg, sd = tiny
    bad = finetune(sd, 1)
    bad["visual.conv1.weight"] = torch.zeros(3, 3)
    write_safetensors(tmp_path / "bad.safetensors", bad, {})
    fam, base = OpenClipFamily(model=str(cfg)), open_checkpoint(tmp_path / "base.safetensors")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        fam.prepare(base, open_checkpoint(tmp_path / "bad.safetensors"))


def test_zero_shot_head_from_class_names(tiny, tmp_path: Path) -> None:
    cfg, sd = tiny
    fam, base = OpenClipFamily(model=str(cfg)), open_checkpoint(tmp_path / "base.safetensors")
    write_safetensors(tmp_path / "ft.safetensors", {k: v for k, v in sd.items()}, {})
    head = fam.head(base, open_checkpoint(tmp_path / "ft.safetensors"), {"classes": ["cat", "dog"]})
    assert head is not None and head.weight.shape == (2, TINY["embed_dim"]) and head.scale > 1
    torch.testing.assert_close(head.weight.norm(dim=-1), torch.ones(2))


def test_trained_strategy_runs_on_the_clip_objective(tiny, tmp_path: Path) -> None:
    cfg, sd = tiny
    write_safetensors(tmp_path / "ft.safetensors", finetune(sd, 2, examples=True), {})
    fam, base = OpenClipFamily(model=str(cfg)), open_checkpoint(tmp_path / "base.safetensors")
    prepared = fam.prepare(base, open_checkpoint(tmp_path / "ft.safetensors"), examples=True)
    assert prepared.examples is not None
    obj = fam.objective(base, prepared.head, prepared.examples)
    assert obj.size == 12
    tv = TaskVector(base, prepared.checkpoint, fam.included_keys(base))
    delta = run_localizer(load_plugins([]).localizer("trained"), tv, {"steps": 3}, LocalizeContext(examples=obj),
                          Provenance())
    assert delta.nnz > 0


def test_bad_examples_are_clear_errors(tiny, tmp_path: Path) -> None:
    cfg, sd = tiny
    ft = finetune(sd, 3, examples=True)
    ft["skillhub.examples.labels"] = torch.full((12,), 7)
    write_safetensors(tmp_path / "ft.safetensors", ft, {})
    fam, base = OpenClipFamily(model=str(cfg)), open_checkpoint(tmp_path / "base.safetensors")
    prepared = fam.prepare(base, open_checkpoint(tmp_path / "ft.safetensors"), examples=True)
    assert prepared.examples is not None
    with pytest.raises(LocalizeError, match="labels must lie in"):
        fam.objective(base, prepared.head, prepared.examples)
    del ft["skillhub.examples.labels"], ft["skillhub.examples.images"]
    write_safetensors(tmp_path / "ft2.safetensors", ft, {})
    with pytest.raises(LocalizeError, match="no few-shot examples"):
        fam.prepare(base, open_checkpoint(tmp_path / "ft2.safetensors"), examples=True)


def test_a_folder_drop_brings_examples_as_safetensors_or_one_image_folder_per_class(tiny, tmp_path: Path) -> None:
    cfg, sd = tiny
    fam, base = OpenClipFamily(model=str(cfg)), open_checkpoint(tmp_path / "base.safetensors")
    ft = finetune(sd, 4)
    drop = tmp_path / "drop"
    drop.mkdir()
    write_safetensors(drop / "model.safetensors", ft, {"skillhub.classes": json.dumps(["cat", "dog", "eel"])})
    g = torch.Generator().manual_seed(1)
    for name, count in (("dog", 2), ("eel", 3)):
        (drop / "examples" / name).mkdir(parents=True)
        for i in range(count):
            pixels = torch.randint(0, 256, (30 + i, 40, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(drop / "examples" / name / f"{i}.png")
    prepared = fam.prepare(base, open_checkpoint(drop), examples=True)
    assert prepared.examples is not None and prepared.head is not None
    assert prepared.examples.labels.tolist() == [1, 1, 2, 2, 2]  # numbered by the head's class names
    assert prepared.examples.images.shape == (5, 3, 256, 256) and prepared.examples.images.dtype == torch.uint8
    obj = fam.objective(base, prepared.head, prepared.examples)
    assert obj.size == 5 and obj.x.shape[-1] == TINY["vision_cfg"]["image_size"]
    # examples.safetensors wins over the folders when both are there
    write_safetensors(drop / "examples.safetensors", {"images": torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
                                                      "labels": torch.tensor([0, 1, 2, 0])}, {})
    assert fam.prepare(base, open_checkpoint(drop), examples=True).examples.labels.tolist() == [0, 1, 2, 0]
    (drop / "examples.safetensors").unlink()
    (drop / "examples" / "emu").mkdir()
    with pytest.raises(LocalizeError, match="'emu' is not a class"):
        fam.prepare(base, open_checkpoint(drop), examples=True)


# --- the real service --------------------------------------------------------------------------------------------


def png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(24, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def skill_weights(sd: dict[str, torch.Tensor], mask_file: Path) -> dict[str, torch.Tensor]:
    """θ₀ + γ⊙τ computed here from the mask file's tensors, independently of the service's code."""
    from safetensors.torch import load_file

    out = {k: v.clone() for k, v in sd.items()}
    mask = load_file(mask_file)
    for name, values in mask.items():
        key, kind = name.rsplit("::", 1)
        if kind != "values":
            continue
        flat = out[key].view(-1)
        if f"{key}::indices" in mask:
            flat[mask[f"{key}::indices"].long()] += values.reshape(-1)
        else:
            flat += values.reshape(-1)
    return out


def clip_logits(cfg: Path, weights: dict[str, torch.Tensor], image: bytes, head: torch.Tensor,
                scale: float) -> torch.Tensor:
    from skillhub.families.open_clip import ClipRuntime

    model = create_clip(str(cfg))
    model.load_state_dict(weights)
    rt = ClipRuntime(model.eval())
    return scale * rt.embed(rt.preprocess([Image.open(io.BytesIO(image))]))[0] @ head.T


def logits_of(answer: dict) -> torch.Tensor:
    """The first image's logits in class order, from a predict answer with every class."""
    return torch.tensor([p["logit"] for p in sorted(answer["predictions"][0], key=lambda p: p["index"])])


@contextlib.contextmanager
def clip_daemon(tmp_path: Path, cfg: Path, toml: str, *, timeout: float = 90) -> Iterator[tuple[httpx.Client, Any, int]]:
    """A real `skillhub run` subprocess on the tiny CLIP base in ``tmp_path`` (``toml``: config sections after
    [base], [watch] and [serve]) and an authorised HTTP client; yields ``(client, wait, port)``, where
    ``wait(cond, what)`` polls until ``cond()`` holds, failing with the daemon's log if it dies or times out."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "config.toml").write_text(f"""
[base]
family = "open_clip"
model = "{cfg.name}"
weights = "base.safetensors"
[watch]
dir = "inbox"
stable_seconds = 0.2
[serve]
port = {port}
{toml}""")
    (tmp_path / "inbox").mkdir()
    with open(tmp_path / "daemon.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "skillhub", "run", "--config", str(tmp_path / "config.toml")],
                                cwd=tmp_path, env=daemon_env(), stdout=subprocess.DEVNULL, stderr=log)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"},
                              timeout=60)

        def wait(cond: Any, what: str, timeout: float = timeout) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
                try:
                    if cond():
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            raise AssertionError(f"timed out: {what}\n" + (tmp_path / "daemon.log").read_text()[-3000:])

        try:
            yield client, wait, port
        finally:
            client.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def daemon_env() -> dict[str, str]:
    """The environment the daemon and the CLI run with: no SKILLHUB_* of the caller's, the test's token."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")} | {"SKILLHUB_TOKEN": TOKEN}


def test_service_predicts_with_two_skills_then_one(tiny, tmp_path: Path) -> None:
    cfg, sd = tiny
    env = daemon_env()
    with clip_daemon(tmp_path, cfg, "[localize.params]\nsparsity = 0.05\n") as (client, wait, port):
        wait(lambda: client.get("/readyz").status_code == 200, "ready")
        drops = {}
        for name, classes, seed in (("shapes", ["circle", "square", "star"], 11), ("colors", ["red", "blue"], 12)):
            tmp = tmp_path / "inbox" / f".{name}.part"
            drops[name] = finetune(sd, seed, classes=len(classes), tower_only=name == "colors")
            write_safetensors(tmp, drops[name], {"skillhub.classes": json.dumps(classes),
                                                 "skillhub.head_scale": "50"})
            os.rename(tmp, tmp_path / "inbox" / f"{name}.safetensors")
        wait(lambda: set(client.get("/v1/model").json()["skills"]) == {"shapes", "colors"}, "two skills")
        v2 = client.get("/v1/model").json()["version"]

        # route=skill answers with θ₀ + γ⊙τ of the skill's own mask; route=merged with the merged version; the
        # default ([serve] route) is skill. Both equal an independent computation of those weights.
        head = drops["shapes"]["skillhub.head.weight"]
        entry = client.get("/v1/model").json()["skills"]["shapes"]
        own = skill_weights(sd, tmp_path / "state" / "masks" / f"{entry['mask']}.mask.safetensors")
        with Client(f"http://127.0.0.1:{port}", token=TOKEN) as api:
            _, merged = api.weights()
            _, downloaded = api.weights(skill="shapes")
            answers = {route: api.predict("shapes", [png(1)], top_k=3, route=route) for route in ("skill", "merged")}
            default = api.predict("shapes", [png(1)], top_k=3)
            both = api.predict_all([png(1), png(2)], top_k=2)
        assert all(torch.allclose(downloaded[k], own[k], rtol=0, atol=1e-6) for k in sd)
        for route, weights in (("skill", own), ("merged", merged)):
            assert answers[route]["route"] == route and answers[route]["version"] == v2
            want = clip_logits(cfg, weights, png(1), head, 50.0)
            torch.testing.assert_close(logits_of(answers[route]), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits_of(answers["skill"]), logits_of(answers["merged"]), rtol=0, atol=1e-4)
        assert default["route"] == "skill" and logits_of(default).tolist() == logits_of(answers["skill"]).tolist()
        (tmp_path / "one.png").write_bytes(png(1))  # the CLI mirrors the route
        cli = subprocess.run([sys.executable, "-m", "skillhub", "predict", "--config", str(tmp_path / "config.toml"),
                              "--skill", "shapes", "--route", "merged", "--top-k", "3", str(tmp_path / "one.png")],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["route"] == "merged"
        assert logits_of(json.loads(cli.stdout)).tolist() == logits_of(answers["merged"]).tolist()
        assert both["route"] == "merged" and set(both["predictions"]) == {"shapes", "colors"}
        assert [len(p) for p in both["predictions"]["colors"]] == [2, 2]
        firsts = [[(p["index"], p["logit"]) for p in a[:2]] for a in (both["predictions"]["shapes"][0],
                                                                       answers["merged"]["predictions"][0])]
        assert [i for i, _ in firsts[0]] == [i for i, _ in firsts[1]]  # the same merged model, batched differently
        torch.testing.assert_close(torch.tensor(firsts[0]), torch.tensor(firsts[1]), rtol=1e-5, atol=1e-5)

        files = [("images", ("a.png", png(1), "image/png")), ("images", ("b.png", png(2), "image/png"))]
        r = client.post("/v1/skills/shapes/predict", files=files, data={"top_k": "2"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version"] == v2 and len(body["predictions"]) == 2
        assert {p["label"] for p in body["predictions"][0]} <= {"circle", "square", "star"}
        r = client.post("/v1/skills/colors/predict", json={"images": [base64.b64encode(png(3)).decode()]})
        assert r.status_code == 200 and r.json()["predictions"][0][0]["label"] in {"red", "blue"}
        r = client.post("/v1/embed", json={"images": [base64.b64encode(png(4)).decode()]})
        assert r.status_code == 200 and len(r.json()["embeddings"][0]) == TINY["embed_dim"]
        with Client(f"http://127.0.0.1:{port}", token=TOKEN) as api:  # the Python client mirrors the routes
            got = api.predict("shapes", [png(5), png(6)], top_k=2)
            assert got["version"] == v2 and [len(p) for p in got["predictions"]] == [2, 2]
            version, emb = api.embed([png(5)])
            assert version == v2 and emb.shape == (1, TINY["embed_dim"])
        assert client.post("/v1/skills/nope/predict", files=files).status_code == 404
        assert client.post("/v1/skills/shapes/predict", files=[("images", ("x.png", b"not a png", "image/png"))]
                           ).status_code == 400

        # Concurrent predictions keep succeeding while versions are published (C9).
        failures: list[str] = []
        versions_seen: set[int] = set()
        stop = threading.Event()

        def hammer() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                              headers={"Authorization": f"Bearer {TOKEN}"}) as c:
                while not stop.is_set():
                    resp = c.post("/v1/skills/shapes/predict", files=files)
                    if resp.status_code != 200:
                        failures.append(f"{resp.status_code} {resp.text}")
                    else:
                        versions_seen.add(resp.json()["version"])

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        for _ in range(2):  # publish versions under load: disable and re-enable colors
            assert client.post("/v1/skills/colors/disable").status_code == 200
            wait(lambda: set(client.get("/v1/model").json()["skills"]) == {"shapes"}, "colors disabled")
            assert client.post("/v1/skills/colors/enable").status_code == 200
            wait(lambda: set(client.get("/v1/model").json()["skills"]) == {"shapes", "colors"}, "colors back")
        assert client.post("/v1/skills/colors/disable").status_code == 200
        wait(lambda: set(client.get("/v1/model").json()["skills"]) == {"shapes"}, "colors disabled")
        stop.set()
        for t in threads:
            t.join(30)
        assert not failures, failures[:3]
        assert len(versions_seen) >= 2

        # After disabling colors: shapes still predicts, from the newest version; colors is gone.
        latest = client.get("/v1/model").json()["version"]
        r = client.post("/v1/skills/shapes/predict", files=files)
        assert r.status_code == 200 and r.json()["version"] == latest > v2
        assert client.post("/v1/skills/colors/predict", files=files).status_code == 404

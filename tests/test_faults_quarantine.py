"""FAULTS B7, B9, B12 against the real service: a finetune of another base, a zero or absurd task vector, unusable
few-shot data (with and without a configured fallback). Each is refused with its reason, nothing stored is lost,
and the served model stays as it was."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from harness import Service, assert_weights_equal, drop, free_port, make_world, model, reference, rows
from skillhub.checkpoint import write_safetensors
from test_open_clip import TINY, finetune  # noqa: F401  (the tiny CLIP config and its finetunes)


@pytest.fixture
def served(tmp_path: Path):
    """The harness service with skill ``a`` served."""
    root, base, fts, svc = make_world(tmp_path)
    svc.start()
    assert drop(root, "a", "plain").wait(30) == 0
    svc.wait(lambda: set(svc.model()["skills"]) == {"a"}, "a served")
    yield root, base, fts, svc
    if svc.proc is not None and svc.proc.poll() is None:
        svc.kill()


def rejected_reason(root: Path, svc: Service, name: str) -> str:
    reason = root / "inbox" / ".rejected" / f"{name}.reason.txt"
    svc.wait(reason.is_file, f"{name} rejected")
    return reason.read_text()


def assert_unchanged(root: Path, svc: Service, version: int, want: dict) -> None:
    assert svc.get("/readyz").status_code == 200
    got, weights = svc.weights()
    assert got == version
    assert_weights_equal(weights, want)
    assert [(s, st) for s, _, st, _ in rows(root / "state") if st == "READY"] == [("a", "READY")]


def test_b7_same_shapes_but_another_base_model(served) -> None:
    root, base, fts, svc = served
    version = svc.model()["version"]
    (root / "other.src").write_bytes(save_safetensors(model(123)))  # same shapes, unrelated weights
    assert drop(root, "other", "plain").wait(30) == 0
    reason = rejected_reason(root, svc, "other.safetensors")
    assert "another base model" in reason and "max_relative_delta" in reason
    # A finetune that declares another base fingerprint in its header is refused by the declaration alone.
    declared = root / "declared.src"
    write_safetensors(declared, fts["b"], {"skillhub.base": "f" * 64})
    assert drop(root, "declared", "plain").wait(30) == 0
    assert "declares base ffffffffffff" in rejected_reason(root, svc, "declared.safetensors")
    assert_unchanged(root, svc, version, reference(base, [fts["a"]]))
    assert svc.stop() == 0


def test_b9_zero_task_vector_and_absurd_delta_norm(served) -> None:
    root, base, fts, svc = served
    version = svc.model()["version"]
    (root / "itself.src").write_bytes(save_safetensors(base))  # the base dropped as a "finetune"
    (root / "absurd.src").write_bytes(save_safetensors({k: v * 1000 for k, v in base.items()}))
    for name in ("itself", "absurd"):
        assert drop(root, name, "plain").wait(30) == 0
    assert "the task vector is zero" in rejected_reason(root, svc, "itself.safetensors")
    assert "× the base's norm away" in rejected_reason(root, svc, "absurd.safetensors")
    assert_unchanged(root, svc, version, reference(base, [fts["a"]]))
    log = svc.log.read_text()
    assert "drop_rejected" in log or "rejected" in log
    assert svc.stop() == 0


# --- B12: few-shot data for the data-driven strategy -----------------------------------------------------------


def clip_service(root: Path, fallback: str | None) -> tuple[Service, dict[str, torch.Tensor]]:
    """A real service on a tiny open_clip model whose skills use the data-driven ``trained`` strategy."""
    from skillhub.families.open_clip import create_clip

    cfg = root / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY))
    torch.manual_seed(0)
    sd = {k: v.detach().clone() for k, v in create_clip(str(cfg)).state_dict().items()}
    write_safetensors(root / "base.safetensors", sd, {})
    port = free_port()
    (root / "config.toml").write_text(f"""
[base]
family = "open_clip"
model = "{cfg.name}"
weights = "base.safetensors"
[watch]
dir = "inbox"
stable_seconds = 0.2
[state]
dir = "state"
[localize]
strategy = "trained"
{f'fallback = "{fallback}"' if fallback else ""}
[localize.params]
steps = 3
[serve]
port = {port}
""")
    (root / "inbox").mkdir()
    return Service(root, port), sd


def drop_clip(root: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    tmp = root / "inbox" / f".{name}.part"
    write_safetensors(tmp, tensors, {"skillhub.classes": json.dumps(["x", "y", "z"])})
    tmp.rename(root / "inbox" / f"{name}.safetensors")


def bad_examples(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    wrong_labels = finetune(sd, 1, examples=True)
    wrong_labels["skillhub.examples.labels"] = torch.full_like(wrong_labels["skillhub.examples.labels"], 7)
    empty = finetune(sd, 2, examples=True)
    empty["skillhub.examples.images"] = empty["skillhub.examples.images"][:0]
    empty["skillhub.examples.labels"] = empty["skillhub.examples.labels"][:0]
    wrong_size = finetune(sd, 3, examples=True)
    wrong_size["skillhub.examples.images"] = torch.zeros((12, 3, 0, 20), dtype=torch.uint8)
    return {"labels": wrong_labels, "empty": empty, "size": wrong_size}


@pytest.mark.parametrize("fallback", [None, "dataless"])
def test_b12_invalid_few_shot_data(tmp_path: Path, fallback: str | None) -> None:
    svc, sd = clip_service(tmp_path, fallback)
    try:
        svc.start()
        drop_clip(tmp_path, "good", finetune(sd, 4, examples=True))
        svc.wait(lambda: "good" in svc.model()["skills"], "a skill with good examples served", timeout=120)
        version = svc.model()["version"]
        cases = bad_examples(sd)
        for name, tensors in cases.items():
            drop_clip(tmp_path, name, tensors)
        if fallback is None:  # each fails with its own reason; the served model stays
            expect = {"labels": "labels must lie in [0, 3)", "empty": "the examples are empty",
                      "size": "each side must be 1 to"}
            for name, text in expect.items():
                assert text in rejected_reason(tmp_path, svc, f"{name}.safetensors")
            time.sleep(0.5)
            assert svc.model()["version"] == version and set(svc.model()["skills"]) == {"good"}
            statuses = {s: st for s, _, st, _ in rows(tmp_path / "state")}
            assert statuses == {"good": "READY", "labels": "FAILED", "empty": "FAILED", "size": "FAILED"}
        else:  # the config says to fall back: dataless masks, served, and the reason kept
            svc.wait(lambda: set(svc.model()["skills"]) == {"good", *cases}, "fallen back skills served",
                     timeout=120)
            assert "localize_fallback" in svc.log.read_text()
            assert all(svc.model()["skills"][n]["nnz"] > 0 for n in cases)
        assert svc.stop() == 0
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.kill()

"""The device rules (:mod:`skillhub.placement`): each one tested on the CPU through the code path the service runs,
and again on CUDA where a CUDA device exists (those tests skip, saying so, without one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from skillhub.checkpoint import open_checkpoint, write_safetensors
from skillhub.config import load_config
from skillhub.errors import StitchError
from skillhub.families import Runtime
from skillhub.families.open_clip import ClipRuntime, create_clip
from skillhub.hub import Hub
from skillhub.placement import runtime_on, synchronize
from skillhub.plugins import load_plugins
from skillhub.stitch import Stitcher, resolve_device
from tests.test_hub import drop
from tests.test_open_clip import TINY

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device, and torch sees none here; the [cpu] case "
                                                 "runs the same code path")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


# --- device = "auto" -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("present", "want"), [(True, "cuda"), (False, "cpu")])
def test_auto_picks_cuda_when_present(monkeypatch: pytest.MonkeyPatch, present: bool, want: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: present)
    assert resolve_device("auto").type == want
    assert resolve_device("cpu").type == "cpu"


def test_cuda_asked_for_without_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(StitchError, match="CUDA is not available") as e:
        resolve_device("cuda")
    assert e.value.key == "device" and "auto" in (e.value.hint or "")


# --- inference runtimes live on the configured device -----------------------------------------------------------

@pytest.fixture
def clip(tmp_path: Path) -> dict[str, torch.Tensor]:
    cfg = tmp_path / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY))
    torch.manual_seed(0)
    return {"cfg": str(cfg), **{k: v.detach().clone() for k, v in create_clip(str(cfg)).state_dict().items()}}


def clip_factory(cfg: str):
    def make(tensors):
        model = create_clip(cfg)
        model.load_state_dict(dict(tensors))
        return ClipRuntime(model.eval())
    return make


def test_runtimes_are_moved_to_the_device_before_use_meta(clip: dict) -> None:
    """On the meta device (no data, any machine): every parameter and buffer of the built runtime is there, and so
    is the skill route's one packed buffer."""
    cfg = clip.pop("cfg")
    rt = runtime_on(clip_factory(cfg), "meta")(clip)
    assert rt is not None
    assert {t.device.type for t in rt.tensors().values()} == {"meta"}
    rt.pack()
    assert {t.device.type for t in rt.tensors().values()} == {"meta"}


@pytest.mark.parametrize("device", DEVICES)
def test_a_runtime_on_the_device_embeds_cpu_batches_into_cpu_embeddings(clip: dict, device: str) -> None:
    cfg = clip.pop("cfg")
    on_cpu = clip_factory(cfg)(clip)
    placed = runtime_on(clip_factory(cfg), device)(clip)
    assert placed is not None and {t.device.type for t in placed.tensors().values()} == {device}
    batch = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    got = placed.embed(batch)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, on_cpu.embed(batch), atol=1e-5, rtol=1e-4)


def test_a_runtime_without_devices_stays_where_it_is() -> None:
    class Plain(Runtime):
        pass

    built = []
    rt = runtime_on(lambda t: built.append(t) or Plain(), "meta")({"w": torch.zeros(1)})
    assert isinstance(rt, Plain) and len(built) == 1
    assert runtime_on(lambda t: None, "meta")({}) is None  # a family that serves no inference


# --- publishing copies nothing device -> CPU ------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_a_published_version_holds_the_stitcher_s_own_tensors(tmp_path: Path, device: str) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}
    write_safetensors(tmp_path / "base.safetensors", base, {})
    (tmp_path / "config.toml").write_text(f'device = "{device}"\n[base]\nweights = "base.safetensors"\n'
                                          '[state]\ndir = "state"\n[localize]\nmax_relative_delta = 100.0\n'
                                          '[localize.params]\nsparsity = 0.5\n')
    hub = Hub(load_config(tmp_path / "config.toml", env={}))
    hub.start()
    try:
        stitcher = hub.reconciler.stitcher
        asked: list[torch.device] = []
        snapshot = stitcher.snapshot
        # the rule itself: the version is taken on the stitcher's own device (on the CPU too, the same call)
        stitcher.snapshot = (  # type: ignore[method-assign]
            lambda dev="cpu": asked.append(torch.device(dev)) or snapshot(dev))
        hub.ingest(drop(tmp_path, "s", {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}),
                   skill="s")
        version = hub.reconcile()
        assert version is not None and "s" in version.manifest["skills"]
        assert asked == [stitcher.device] and stitcher.device.type == device
        for k in base:  # frozen, not copied: the very storage the stitcher merged into
            assert version.tensors[k].device.type == device
            assert version.tensors[k].data_ptr() == stitcher.tensor(k).data_ptr()
        assert hub.reconciler.publisher.flush()
    finally:
        hub.close()
    written = open_checkpoint(tmp_path / "state" / "models" / str(version.number) / "model.safetensors")
    for k in base:
        assert torch.equal(written.tensor(k), version.tensors[k].cpu())


# --- stitching on the device ----------------------------------------------------------------------------------------

@needs_cuda
def test_the_stitcher_on_cuda_gives_the_cpu_s_bytes() -> None:
    from tests.test_stitch import SHAPES, base_model, random_delta

    base = base_model(0)
    deltas = [random_delta(s, 0.3, dense=tuple(SHAPES)[:1] if s == 1 else ()) for s in range(3)]
    policy = load_plugins().make_policy("average", {})
    out = {}
    for dev in ("cpu", "cuda"):
        st = Stitcher(base, policy, device=dev)
        for i, d in enumerate(deltas):
            st.add(str(i), d)
        synchronize(dev)
        out[dev] = st.snapshot("cpu")
    for k in base:
        assert torch.equal(out["cpu"][k], out["cuda"][k]), k

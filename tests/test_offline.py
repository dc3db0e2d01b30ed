"""The offline stitch (:mod:`skillhub.offline`) streams: masks checked from their headers, then read one tensor at a
time; a bad value found in a later shard fails naming the mask file and key and leaves no output behind; and the
``skillhub stitch`` command imports only what it needs.

A tiny synthetic sharded base (three shards with an index and a config), written here; the bytes of the streamed
result against the service's stitcher are tested with a real ``transformers`` model in ``tests/test_modelfolder.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from skillhub.checkpoint import open_checkpoint, write_safetensors
from skillhub.delta import MaskFile, Provenance, SparseDelta
from skillhub.errors import CheckpointError, StitchError
from skillhub.fingerprints import fingerprint
from skillhub.modelfolder import PARTIAL
from skillhub.offline import stitch_masks
from skillhub.plugins import load_plugins
from skillhub.stitch import Stitcher

#: shard -> tensors; the last shard's "c.weight" is where the bad masks go bad
SHARDS = {"model-00001-of-00003.safetensors": {"a.weight": (6, 5), "a.bias": (6,)},
          "model-00002-of-00003.safetensors": {"b.weight": (4, 8)},
          "model-00003-of-00003.safetensors": {"c.weight": (7, 3), "c.bias": (7,)}}
SHAPES = {k: s for tensors in SHARDS.values() for k, s in tensors.items()}
LAST = "c.weight"
LAST_SHARD = list(SHARDS)[-1]


def write_base(folder: Path) -> Path:
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for name, tensors in SHARDS.items():
        write_safetensors(folder / name, {k: torch.randn(s, generator=g) for k, s in tensors.items()}, {"format": "pt"})
    weight_map = {k: name for name, tensors in SHARDS.items() for k in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "tiny"}')
    return folder


def write_mask(path: Path, base: Path, seed: int, *, bad: str | None = None) -> Path:
    """A 30% mask of every tensor; ``bad``: ``"order"`` (two indices of LAST swapped), ``"range"`` (its last index
    one past the end) or ``"nan"`` (a NaN value in it)."""
    g = torch.Generator().manual_seed(seed)
    indices, values = {}, {}
    for k, shape in SHAPES.items():
        n = torch.Size(shape).numel()
        idx = torch.randperm(n, generator=g)[: max(2, n * 3 // 10)].sort().values.to(torch.int32)
        val = torch.randn(idx.numel(), generator=g) * 0.1
        if k == LAST and bad == "order":
            idx[[0, 1]] = idx[[1, 0]]
        elif k == LAST and bad == "range":
            idx[-1] = n
        elif k == LAST and bad == "nan":
            val[1] = float("nan")
        indices[k], values[k] = idx, val
    prov = Provenance(skill=path.name.split(".")[0], base=fingerprint(open_checkpoint(base)), strategy="synthetic")
    SparseDelta(indices, values, dict(SHAPES), {k: torch.float32 for k in SHAPES}, prov).save(path)
    return path


@pytest.fixture
def world(tmp_path: Path) -> dict:
    base = write_base(tmp_path / "base")
    masks = [write_mask(tmp_path / f"s{i}.mask.safetensors", base, i) for i in range(3)]
    return {"dir": tmp_path, "base": base, "masks": masks, "policy": load_plugins().make_policy("average", {})}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_stream_gives_the_service_s_tensors(world: dict) -> None:
    out = world["dir"] / "out"
    stitch_masks(world["base"], world["masks"], out, policy=world["policy"], device="cpu")
    base = open_checkpoint(world["base"])
    st = Stitcher({k: base.tensor(k) for k in SHAPES}, world["policy"], device="cpu")
    for i, m in enumerate(world["masks"]):
        st.add(f"s{i}", SparseDelta.load(m))
    merged = open_checkpoint(out)
    for k in SHAPES:
        assert torch.equal(merged.tensor(k).view(torch.uint8), st.tensor(k).view(torch.uint8)), k
    assert sorted(p.name for p in out.iterdir()) == sorted([*SHARDS, "config.json", "model.safetensors.index.json"])


def test_a_tensor_local_policy_never_reads_a_whole_mask(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The masks are read a tensor at a time (MaskFile.delta of one key), never whole."""
    asked: list[list[str] | None] = []
    real = MaskFile.delta

    def spy(self: MaskFile, keys: object = None, **kw: object) -> SparseDelta:
        asked.append(None if keys is None else list(keys))  # type: ignore[call-overload]
        return real(self, keys, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(MaskFile, "delta", spy)
    monkeypatch.setattr(SparseDelta, "load", lambda *a, **k: pytest.fail("a whole mask was loaded"))
    stitch_masks(world["base"], world["masks"], world["dir"] / "out", policy=world["policy"], device="cpu")
    assert asked and all(keys is not None and len(keys) == 1 for keys in asked)
    assert sorted({keys[0] for keys in asked if keys}) == sorted(SHAPES)


def test_the_manifest_counts_the_masks_from_their_headers(world: dict) -> None:
    manifest = stitch_masks(world["base"], world["masks"], world["dir"] / "out", policy=world["policy"],
                            device="cpu")
    assert [s["nnz"] for s in manifest["skills"].values()] == [SparseDelta.load(m).nnz for m in world["masks"]]


@pytest.mark.parametrize(("bad", "error", "pattern"), [
    ("order", CheckpointError, "not strictly increasing"),
    ("range", CheckpointError, "not strictly increasing within"),
    ("nan", StitchError, "NaN or Inf"),
])
def test_a_mask_bad_in_the_last_shard_leaves_no_output(world: dict, bad: str, error: type, pattern: str) -> None:
    """Found only when the last shard is reached, after the first two are written: the error names the key (and the
    mask file, for its indices), and neither the output folder nor its hidden partial sibling is left."""
    masks = [*world["masks"], write_mask(world["dir"] / "bad.mask.safetensors", world["base"], 9, bad=bad)]
    out = world["dir"] / "out"
    with pytest.raises(error, match=pattern) as err:
        stitch_masks(world["base"], masks, out, policy=world["policy"], device="cpu")
    assert err.value.key == LAST
    if error is CheckpointError:
        assert err.value.path == masks[-1]
    assert not out.exists()
    assert sorted(p.name for p in world["dir"].iterdir()) == sorted(["base", *(m.name for m in masks)])


def test_a_failed_stitch_leaves_an_existing_output_as_it_was(world: dict) -> None:
    out = world["dir"] / "out"
    stitch_masks(world["base"], world["masks"][:1], out, policy=world["policy"], device="cpu")
    before = folder_bytes(out)
    bad = write_mask(world["dir"] / "bad.mask.safetensors", world["base"], 9, bad="order")
    with pytest.raises(CheckpointError, match="strictly increasing"):
        stitch_masks(world["base"], [*world["masks"], bad], out, policy=world["policy"], device="cpu")
    assert folder_bytes(out) == before
    # and a good stitch over it replaces every file
    stitch_masks(world["base"], world["masks"], out, policy=world["policy"], device="cpu")
    after = folder_bytes(out)
    assert after.keys() == before.keys() and after[LAST_SHARD] != before[LAST_SHARD]


def test_a_dead_run_s_partial_output_is_removed(world: dict) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = world["dir"] / PARTIAL.format(name="out", pid=int(done.stdout))
    dead.mkdir()
    (dead / LAST_SHARD).write_bytes(b"half")
    alive = world["dir"] / PARTIAL.format(name="out", pid=os.getppid())  # a live process's: not ours to touch
    alive.mkdir()
    stitch_masks(world["base"], world["masks"], world["dir"] / "out", policy=world["policy"], device="cpu")
    assert not dead.exists() and alive.is_dir()


def test_mask_files_are_checked_from_the_header_and_values_when_read(world: dict) -> None:
    path = write_mask(world["dir"] / "bad.mask.safetensors", world["base"], 9, bad="order")
    mf = MaskFile(path)  # the header is fine
    assert mf.delta(["a.weight"]).nnz_of("a.weight") == 9  # the other tensors read fine
    with pytest.raises(CheckpointError, match="strictly increasing") as err:
        mf.delta([LAST])
    assert err.value.path == path and err.value.key == LAST
    with pytest.raises(CheckpointError, match="strictly increasing"):
        SparseDelta.load(path)


def test_mask_file_nnz_counts_dense_tensors_by_their_values(tmp_path: Path) -> None:
    """A dense-form tensor's mask size is its non-zero values (the header does not say): MaskFile.nnz agrees with
    SparseDelta's for a file holding both forms."""
    dense = torch.zeros(20)
    dense[[1, 4, 5, 9, 10, 11, 12, 13, 14, 15, 16]] = 0.5
    d = SparseDelta({"s": torch.tensor([0, 3], dtype=torch.int32)}, {"s": torch.tensor([1.0, 2.0]), "d": dense},
                    {"s": (40,), "d": (4, 5)}, {"s": torch.float32, "d": torch.float32})
    d.save(tmp_path / "m.mask.safetensors")
    mf = MaskFile(tmp_path / "m.mask.safetensors")
    assert mf.sparse == {"s": True, "d": False}
    assert mf.nnz() == SparseDelta.load(tmp_path / "m.mask.safetensors").nnz == 13


def test_the_stitch_command_imports_only_what_it_needs(world: dict) -> None:
    """``skillhub stitch`` in a fresh interpreter, as the CLI runs: torch and the stitch, but no logging machinery
    (structlog), no registry (sqlite3) and none of the service's modules."""
    code = textwrap.dedent("""
        import sys
        from skillhub.cli import main
        code = main(sys.argv[1:])
        unwanted = ("structlog", "sqlite3", "skillhub.publish", "skillhub.registry", "skillhub.ops", "fastapi",
                    "open_clip", "torchvision", "transformers")
        print(sorted(m for m in unwanted if m in sys.modules))
        sys.exit(code)
    """)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SKILLHUB_")}
    proc = subprocess.run([sys.executable, "-c", code, "stitch", "--base", "base", "--out", "out", "--device", "cpu",
                           *[m.name for m in world["masks"]]], cwd=world["dir"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert (world["dir"] / "out" / "model.safetensors.index.json").is_file()

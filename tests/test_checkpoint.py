"""Checkpoints: our own safetensors header pre-check (FAULTS B1, B3, B4, B5, B10), sharded folders (A3), key
normalisation, architecture validation (B6), finiteness of task vectors (B8), the deterministic writer and the
fingerprint cache. Every file is tiny and written to ``tmp_path``."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

import skillhub.fingerprints as fp_mod
from skillhub.checkpoint import (
    open_checkpoint,
    read_tensors,
    validate_against,
    write_safetensors,
)
from skillhub.errors import CheckpointError
from skillhub.fingerprints import FingerprintCache
from skillhub.header import read_header
from skillhub.taskvector import StateDict, TaskVector

# --------------------------------------------------------------------------------------------------------------------
# helpers


def seeded(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def raw_file(path: Path, header: dict | bytes | str, data: bytes = b"", *, size: int | None = None) -> Path:
    """A safetensors-shaped file crafted byte by byte: 8-byte little-endian header size, header, data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    hb = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(hb) if size is None else size) + hb + data)
    return path


def f32_entry(begin: int, end: int, shape: list[int] | None = None, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape if shape is not None else [(end - begin) // 4],
            "data_offsets": [begin, end]}


@contextmanager
def raises_msg(pattern: str) -> Iterator[pytest.ExceptionInfo[CheckpointError]]:
    """Like ``pytest.raises(CheckpointError, match=...)``, but matched against the message and hint only: the path
    is named after the test and could satisfy the pattern by itself."""
    with pytest.raises(CheckpointError) as info:
        yield info
    text = f"{info.value.message} {info.value.hint or ''}"
    assert re.search(pattern, text), (pattern, str(info.value))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rejects(path: Path, *needles: str, **kw) -> CheckpointError:
    """read_header raises CheckpointError naming the file and every needle; the peak Python allocation stays small."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            read_header(path, **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = info.value.message  # not str(): the path (named after the test) must not satisfy a needle
    assert info.value.path == path
    assert str(path) in str(info.value)
    for needle in needles:
        assert needle.lower() in msg.lower(), (needle, msg)
    assert peak < 1 << 20, f"read_header allocated {peak} bytes for a {path.stat().st_size}-byte file"
    return info.value


# --------------------------------------------------------------------------------------------------------------------
# write_safetensors


def all_kinds() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (7,), generator=g),
        "bool": torch.rand(3, 3, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "scalar_i64": torch.tensor(-3),
        "empty": torch.empty(0, 4),
        "empty_f16": torch.empty(0, dtype=torch.float16),
        "transposed": torch.randn(4, 3, generator=g).t(),  # not contiguous
    }


def test_write_safetensors_is_readable_by_the_reference_loader(tmp_path: Path) -> None:
    tensors = all_kinds()
    path = tmp_path / "x.safetensors"
    digest = write_safetensors(path, tensors, {"who": "me", "n": "1"})
    assert digest == sha256(path)
    loaded = safetensors.torch.load_file(path)
    assert set(loaded) == set(tensors)
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype, k
        assert loaded[k].shape == t.shape, k
        assert torch.equal(loaded[k], t), k
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"who": "me", "n": "1"}
    # and by our own reader, which checks the header strictly
    ours, meta = read_tensors(path)
    assert meta == {"who": "me", "n": "1"}
    for k, t in tensors.items():
        assert ours[k].dtype == t.dtype and torch.equal(ours[k], t), k


def test_write_safetensors_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": torch.arange(3.0)}, {})
    assert torch.equal(safetensors.torch.load_file(path)["a"], torch.arange(3.0))
    assert read_header(path).metadata == {}


def test_write_safetensors_bytes_are_deterministic(tmp_path: Path) -> None:
    tensors = all_kinds()
    meta = {"skillhub.a": "1", "skillhub.b": "two", "z": "last", "a": "first"}
    d1 = write_safetensors(tmp_path / "1.safetensors", tensors, meta)
    d2 = write_safetensors(tmp_path / "2.safetensors", tensors, meta)
    # the same content given in another order: metadata and tensors alike
    d3 = write_safetensors(tmp_path / "3.safetensors", dict(reversed(list(tensors.items()))),
                           dict(reversed(list(meta.items()))))
    # equal values in fresh (differently allocated) tensors
    d4 = write_safetensors(tmp_path / "4.safetensors", {k: v.clone() for k, v in tensors.items()}, dict(meta))
    assert d1 == d2 == d3 == d4
    b = (tmp_path / "1.safetensors").read_bytes()
    for n in (2, 3, 4):
        assert (tmp_path / f"{n}.safetensors").read_bytes() == b
    assert d1 == hashlib.sha256(b).hexdigest()
    # a different value or metadata gives different bytes
    other = dict(tensors, f32=tensors["f32"] + 1)
    assert write_safetensors(tmp_path / "5.safetensors", other, meta) != d1
    assert write_safetensors(tmp_path / "6.safetensors", tensors, dict(meta, z="other")) != d1


def test_write_safetensors_leaves_no_temp_file_and_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": torch.zeros(2)}, {})
    write_safetensors(path, {"a": torch.ones(2)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
    assert torch.equal(safetensors.torch.load_file(path)["a"], torch.ones(2))


def test_write_safetensors_refuses_unknown_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with raises_msg("complex64"):
        write_safetensors(path, {"z": torch.zeros(2, dtype=torch.complex64)}, {})
    assert list(tmp_path.iterdir()) == []


def test_reference_files_pass_the_pre_check(tmp_path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in all_kinds().items()}
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    header = read_header(path)
    assert set(header.tensors) == set(tensors)
    assert header.metadata == {"format": "pt"}
    assert header.file_size == path.stat().st_size
    for k, t in tensors.items():
        info = header.tensors[k]
        assert info.dtype == t.dtype and info.shape == tuple(t.shape) and info.numel == t.numel()
    ours, _ = read_tensors(path)
    for k, t in tensors.items():
        assert torch.equal(ours[k], t), k


# --------------------------------------------------------------------------------------------------------------------
# read_header: not safetensors at all (FAULTS B1, B2)


def test_rejects_an_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"")
    rejects(p, "empty")


@pytest.mark.parametrize("content", [b"\x01", b"abcdefg"])
def test_rejects_a_file_too_short_for_a_header_size(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(content)
    rejects(p, "too short")


def test_rejects_a_git_lfs_pointer(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_text("version https://git-lfs.github.com/spec/v1\n"
                 "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")
    rejects(p, "git-lfs")


def test_rejects_a_pickle_without_unpickling_it(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(pickle.dumps({"weight": [1.0, 2.0, 3.0], "bias": 0.5}, protocol=4))
    rejects(p, "pickle", "skillhub convert")


class Payload:
    """Unpickling this creates a folder: the proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("name", ["x.safetensors", "x.pt", "x.bin"])
def test_a_malicious_pickle_never_runs(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / name
    p.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    with pytest.raises(CheckpointError):
        open_checkpoint(p)
    with pytest.raises(CheckpointError):
        read_header(p)
    assert not marker.exists()
    pickle.loads(p.read_bytes())  # the payload is real: loading it does run it
    assert marker.is_dir()


def test_rejects_a_torch_save_zip(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    torch.save({"weight": torch.zeros(3)}, p)
    rejects(p, "zip", "skillhub convert")


def test_rejects_an_html_page(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>nope</body></html>\n")
    rejects(p, "HTML")


@pytest.mark.parametrize("text", ['{"weight": [1, 2, 3], "bias": 0.5}', "  \n[1, 2, 3, 4, 5, 6]", "{}"])
def test_rejects_a_json_file(tmp_path: Path, text: str) -> None:
    p = tmp_path / "x.safetensors"
    p.write_text(text)
    rejects(p, "JSON")


# --------------------------------------------------------------------------------------------------------------------
# read_header: hostile or broken headers (FAULTS B3, B4, B5, B10)


def test_rejects_a_header_size_bomb(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 10**12) + b"junk junk junk")
    rejects(p, "1000000000000", "cap")


def test_rejects_a_header_size_beyond_the_file(tmp_path: Path) -> None:
    # under the 100 MiB cap, but the file is 40 bytes: must not try to read 50 MB
    p = raw_file(tmp_path / "x.safetensors", b'{"a":1}', b"", size=50_000_000)
    rejects(p, "50000000", "truncated")


def test_header_byte_cap_is_configurable(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"a": torch.zeros(3)}, {"k": "v" * 100})
    n = struct.unpack("<Q", p.read_bytes()[:8])[0]
    assert read_header(p, max_header_bytes=n).tensors["a"].shape == (3,)
    rejects(p, "cap", max_header_bytes=n - 1)
    with raises_msg("cap"):
        open_checkpoint(p, max_header_bytes=n - 1)


def test_tensor_count_cap(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"a": torch.zeros(1), "b": torch.zeros(1), "c": torch.zeros(1)}, {"m": "x"})
    assert len(read_header(p, max_tensors=3).tensors) == 3
    rejects(p, "more than 2 tensors", "over the cap", max_tensors=2)


def test_rejects_overlapping_offsets(tmp_path: Path) -> None:
    p = raw_file(tmp_path / "x.safetensors", {"a": f32_entry(0, 16), "b": f32_entry(8, 24)}, bytes(24))
    rejects(p, "overlaps", "'b'")


def test_rejects_two_tensors_sharing_bytes(tmp_path: Path) -> None:
    p = raw_file(tmp_path / "x.safetensors", {"a": f32_entry(0, 16), "b": f32_entry(0, 16)}, bytes(16))
    rejects(p, "overlaps")


def test_rejects_a_gap_between_tensors(tmp_path: Path) -> None:
    p = raw_file(tmp_path / "x.safetensors", {"a": f32_entry(0, 16), "b": f32_entry(20, 36)}, bytes(36))
    rejects(p, "gap of 4 bytes", "'b'")


def test_rejects_a_gap_before_the_first_tensor(tmp_path: Path) -> None:
    p = raw_file(tmp_path / "x.safetensors", {"a": f32_entry(8, 24)}, bytes(24))
    rejects(p, "gap of 8 bytes", "'a'")


@pytest.mark.parametrize("offsets", [(0, 16), (16, 32), (-4, 12)])
def test_rejects_offsets_outside_the_data(tmp_path: Path, offsets: tuple[int, int]) -> None:
    p = raw_file(tmp_path / "x.safetensors", {"a": f32_entry(*offsets, shape=[4])}, bytes(8))
    rejects(p, "outside", "'a'")


def test_rejects_absurd_offsets_without_allocating(tmp_path: Path) -> None:
    p = raw_file(tmp_path / "x.safetensors", {"a": f32_entry(0, 4 * 10**12, shape=[10**12])}, bytes(8))
    rejects(p, "outside", "'a'")


def test_rejects_trailing_bytes(tmp_path: Path) -> None:
    p = raw_file(tmp_path / "x.safetensors", {"a": f32_entry(0, 16)}, bytes(20))
    rejects(p, "4 trailing bytes")


def test_rejects_data_without_tensors(tmp_path: Path) -> None:
    p = raw_file(tmp_path / "x.safetensors", {"__metadata__": {"a": "b"}}, bytes(8))
    rejects(p, "8 trailing bytes")


@pytest.mark.parametrize(
    ("entry", "data"),
    [
        ({"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}, 16),  # shape needs more
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}, 8),  # shape needs more
        ({"dtype": "F16", "shape": [4], "data_offsets": [0, 16]}, 16),  # dtype needs less
        ({"dtype": "F32", "shape": [], "data_offsets": [0, 0]}, 0),  # a 0-d tensor needs 4 bytes
    ],
)
def test_rejects_shape_or_dtype_inconsistent_with_the_byte_span(tmp_path: Path, entry: dict, data: int) -> None:
    p = raw_file(tmp_path / "x.safetensors", {"w": entry}, bytes(data))
    rejects(p, "'w'", "needs", "spans")


@pytest.mark.parametrize("shape", [[-1], [2.0], ["3"], [True], 4, None])
def test_rejects_an_invalid_shape(tmp_path: Path, shape: object) -> None:
    p = raw_file(tmp_path / "x.safetensors", {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}, bytes(4))
    rejects(p, "'w'", "shape")


@pytest.mark.parametrize("offsets", [[0], [0, 4, 8], ["0", "4"], [0.0, 4.0], None])
def test_rejects_invalid_data_offsets(tmp_path: Path, offsets: object) -> None:
    p = raw_file(tmp_path / "x.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}, bytes(4))
    rejects(p, "'w'", "data_offsets")


def test_rejects_duplicate_tensor_names(tmp_path: Path) -> None:
    # The reference parser keeps the last of two equal names; json.dumps cannot write them, so craft the bytes.
    header = ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
              '"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}')
    p = raw_file(tmp_path / "x.safetensors", header, bytes(16))
    err = rejects(p, "duplicate tensor name 'w'")
    assert err.hint


def test_rejects_duplicate_metadata_keys(tmp_path: Path) -> None:
    header = '{"__metadata__":{"a":"1","a":"2"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    p = raw_file(tmp_path / "x.safetensors", header, bytes(4))
    rejects(p, "duplicate", "'a'")


@pytest.mark.parametrize("code", ["F8_E4M3", "F8_E5M2", "U32", "C64"])
def test_rejects_an_unsupported_dtype_naming_tensor_and_dtype(tmp_path: Path, code: str) -> None:
    p = raw_file(tmp_path / "x.safetensors",
                 {"ok": f32_entry(0, 4), "layer.q": {"dtype": code, "shape": [4], "data_offsets": [4, 8]}}, bytes(8))
    err = rejects(p, "'layer.q'", code, "unsupported")
    assert err.key == "layer.q"


def test_rejects_an_unknown_dtype(tmp_path: Path) -> None:
    p = raw_file(tmp_path / "x.safetensors", {"w": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 4]}}, bytes(4))
    rejects(p, "'w'", "Q4_K")


@pytest.mark.parametrize("header", ["[1, 2, 3]", '"a string"', "42", "null"])
def test_rejects_a_header_that_is_not_a_json_object(tmp_path: Path, header: str) -> None:
    p = raw_file(tmp_path / "x.safetensors", header)
    rejects(p, "not a JSON object")


@pytest.mark.parametrize("header", [b'{"w": {', b"\xff\xfe{}", b"{" * 20000 + b"}" * 20000])
def test_rejects_a_header_that_is_not_json(tmp_path: Path, header: bytes) -> None:
    p = raw_file(tmp_path / "x.safetensors", header)
    rejects(p, "not valid JSON")


@pytest.mark.parametrize("meta", [["a"], {"a": 1}, {"a": None}])
def test_rejects_metadata_that_is_not_strings(tmp_path: Path, meta: object) -> None:
    p = raw_file(tmp_path / "x.safetensors", {"__metadata__": meta, "w": f32_entry(0, 4)}, bytes(4))
    rejects(p, "__metadata__")


def test_rejects_a_header_entry_that_is_not_an_object(tmp_path: Path) -> None:
    p = raw_file(tmp_path / "x.safetensors", {"w": [1, 2]})
    rejects(p, "'w'", "not an object")


def test_open_checkpoint_refuses_pickle_suffixes_and_non_files(tmp_path: Path) -> None:
    for name in ("x.pt", "x.bin", "x.pth", "x.ckpt", "x.pkl"):
        p = tmp_path / name
        write_safetensors(p, {"a": torch.zeros(1)}, {})  # even valid bytes: the suffix says pickle
        with raises_msg("skillhub convert"):
            open_checkpoint(p)
    with raises_msg("no such file"):
        open_checkpoint(tmp_path / "absent.safetensors")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with raises_msg("not a regular file"):
        open_checkpoint(fifo)


# Regression: the sniffer used to read the 8 header-size bytes as file magic, so a truncated safetensors file was
# called a pickle (size 640 = bytes 80 02), an HTML page (15392 = 20 3c) or a JSON file (31520 = 20 7b).
@pytest.mark.parametrize("header_size", [640, 15392, 31520])
def test_a_truncated_safetensors_file_is_not_called_something_else(tmp_path: Path, header_size: int) -> None:
    full = tmp_path / "full.safetensors"
    header = json.dumps({"w": f32_entry(0, 4000)}).encode()
    header += b" " * (header_size - len(header))  # a legal, space-padded header (sizes are multiples of 8)
    raw_file(full, header, bytes(4000))
    assert read_header(full).tensors["w"].shape == (1000,)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:300])  # a download that stopped early
    rejects(cut, "truncated")


# --------------------------------------------------------------------------------------------------------------------
# sharded folders (FAULTS A3)


def make_sharded(folder: Path, weight_map: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    folder.mkdir()
    tensors = seeded(3, {"enc.w": (4, 3), "enc.b": (4,), "dec.w": (3, 4), "dec.b": (3,)})
    write_safetensors(folder / "model-00001-of-00002.safetensors", {k: tensors[k] for k in ("enc.w", "enc.b")}, {})
    write_safetensors(folder / "model-00002-of-00002.safetensors", {k: tensors[k] for k in ("dec.w", "dec.b")}, {})
    wm = weight_map or {"enc.w": "model-00001-of-00002.safetensors", "enc.b": "model-00001-of-00002.safetensors",
                        "dec.w": "model-00002-of-00002.safetensors", "dec.b": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                      "weight_map": wm}))
    return tensors


def test_sharded_folder_reads_every_tensor(tmp_path: Path) -> None:
    tensors = make_sharded(tmp_path / "m")
    ck = open_checkpoint(tmp_path / "m")
    assert sorted(ck) == sorted(tensors)
    assert len(ck.files) == 2
    for k, t in tensors.items():
        assert ck[k].shape == tuple(t.shape)
        assert torch.equal(ck.tensor(k), t), k
    assert ck.nbytes == sum(p.stat().st_size for p in (tmp_path / "m").glob("*.safetensors"))


def test_folder_with_a_single_file_and_no_index(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    write_safetensors(tmp_path / "m" / "model.safetensors", {"a": torch.arange(4.0)}, {})
    assert torch.equal(open_checkpoint(tmp_path / "m").tensor("a"), torch.arange(4.0))
    write_safetensors(tmp_path / "m" / "other.safetensors", {"a": torch.arange(4.0)}, {})
    with raises_msg("found 2"):
        open_checkpoint(tmp_path / "m")


@pytest.mark.parametrize("shard", ["../x.safetensors", "sub/../../x.safetensors", "ABSOLUTE"])
def test_shard_paths_leaving_the_folder_are_rejected(tmp_path: Path, shard: str) -> None:
    outside = tmp_path / "x.safetensors"
    write_safetensors(outside, {"dec.w": torch.zeros(3, 4), "dec.b": torch.zeros(3)}, {})  # exists: still refused
    if shard == "ABSOLUTE":
        shard = str(outside)
    wm = {"enc.w": "model-00001-of-00002.safetensors", "enc.b": "model-00001-of-00002.safetensors",
          "dec.w": shard, "dec.b": shard}
    make_sharded(tmp_path / "m", wm)
    with raises_msg("leaves the checkpoint folder") as info:
        open_checkpoint(tmp_path / "m")
    assert shard in str(info.value)


def test_a_missing_shard_is_named(tmp_path: Path) -> None:
    make_sharded(tmp_path / "m")
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with raises_msg("missing shards: model-00002-of-00002.safetensors") as info:
        open_checkpoint(tmp_path / "m")
    assert "model-00001" not in str(info.value)


def test_a_shard_lacking_a_listed_tensor_is_rejected(tmp_path: Path) -> None:
    wm = {"enc.w": "model-00001-of-00002.safetensors", "enc.b": "model-00001-of-00002.safetensors",
          "dec.w": "model-00002-of-00002.safetensors", "dec.b": "model-00002-of-00002.safetensors",
          "ghost": "model-00002-of-00002.safetensors"}
    make_sharded(tmp_path / "m", wm)
    with raises_msg("ghost"):
        open_checkpoint(tmp_path / "m")


def test_a_malformed_shard_is_rejected_through_the_pre_check(tmp_path: Path) -> None:
    make_sharded(tmp_path / "m")
    shard = tmp_path / "m" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes() + b"\0\0\0\0")
    with raises_msg("trailing bytes") as info:
        open_checkpoint(tmp_path / "m")
    assert info.value.path == shard


@pytest.mark.parametrize("text", ["not json", '{"no_weight_map": {}}', '{"weight_map": [1]}', "[]"])
def test_an_unreadable_index_is_rejected(tmp_path: Path, text: str) -> None:
    make_sharded(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(text)
    with raises_msg("shard index"):
        open_checkpoint(tmp_path / "m")


def test_several_index_files_are_rejected(tmp_path: Path) -> None:
    make_sharded(tmp_path / "m")
    (tmp_path / "m" / "other.index.json").write_text('{"weight_map": {}}')
    with raises_msg("several index files"):
        open_checkpoint(tmp_path / "m")


# --------------------------------------------------------------------------------------------------------------------
# key normalisation


def test_a_prefix_on_every_key_is_stripped(tmp_path: Path) -> None:
    tensors = seeded(4, {"enc.w": (2, 2), "enc.b": (2,), "head": (3,)})
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {f"module.{k}": v for k, v in tensors.items()}, {})
    ck = open_checkpoint(p)
    assert sorted(ck) == sorted(tensors)
    for k, t in tensors.items():
        assert torch.equal(ck.tensor(k), t)


def test_stacked_wrapper_prefixes_are_stripped(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"module.model.a": torch.zeros(1), "module.model.b": torch.ones(1)}, {})
    assert sorted(open_checkpoint(p)) == ["a", "b"]


def test_a_prefix_on_only_some_keys_is_left_alone(tmp_path: Path) -> None:
    keys = ["model.encoder.w", "model.encoder.b", "head.w"]
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {k: torch.full((2,), float(i)) for i, k in enumerate(keys)}, {})
    ck = open_checkpoint(p)
    assert sorted(ck) == sorted(keys)
    assert torch.equal(ck.tensor("head.w"), torch.full((2,), 2.0))


def test_a_key_that_is_only_the_prefix_keeps_it(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"module.a": torch.zeros(1), "module.": torch.ones(1)}, {})
    assert sorted(open_checkpoint(p)) == ["module.", "module.a"]


def test_prefix_stripping_spans_shards(tmp_path: Path) -> None:
    make_sharded(tmp_path / "m")
    folder = tmp_path / "n"
    folder.mkdir()
    tensors = {}
    for i, shard in enumerate(sorted((tmp_path / "m").glob("*.safetensors"))):
        part, _ = read_tensors(shard)
        write_safetensors(folder / shard.name, {f"module.{k}": v for k, v in part.items()}, {})
        tensors.update({f"module.{k}": shard.name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": tensors}))
    assert sorted(open_checkpoint(folder)) == sorted(open_checkpoint(tmp_path / "m"))


# --------------------------------------------------------------------------------------------------------------------
# validate_against (FAULTS B6, B5)

BASE_SHAPES = {"enc.w": (4, 3), "enc.b": (4,), "head.w": (2, 4)}


def write_model(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    write_safetensors(path, tensors, {})
    return path


@pytest.fixture
def base_ckpt(tmp_path: Path):
    t = seeded(0, BASE_SHAPES)
    t["steps"] = torch.tensor(5)
    return open_checkpoint(write_model(tmp_path / "base.safetensors", t))


def finetune(tmp_path: Path, **changes: torch.Tensor | None):
    t = seeded(1, BASE_SHAPES)
    t["steps"] = torch.tensor(9)
    for k, v in changes.items():
        k = k.replace("__", ".")
        if v is None:
            del t[k]
        else:
            t[k] = v
    return open_checkpoint(write_model(tmp_path / "ft.safetensors", t))


def test_validate_accepts_the_same_architecture(tmp_path: Path, base_ckpt) -> None:
    validate_against(base_ckpt, finetune(tmp_path))


def test_validate_accepts_half_precision_finetunes(tmp_path: Path, base_ckpt) -> None:
    ft = finetune(tmp_path, enc__w=torch.zeros(4, 3, dtype=torch.float16), head__w=torch.zeros(2, 4).bfloat16())
    validate_against(base_ckpt, ft)


def test_validate_names_missing_keys(tmp_path: Path, base_ckpt) -> None:
    with raises_msg(r"missing keys head\.w") as info:
        validate_against(base_ckpt, finetune(tmp_path, head__w=None))
    assert info.value.path == tmp_path / "ft.safetensors"


def test_validate_names_extra_keys(tmp_path: Path, base_ckpt) -> None:
    with raises_msg(r"unexpected keys lora\.a"):
        validate_against(base_ckpt, finetune(tmp_path, lora__a=torch.zeros(2)))


def test_validate_names_shape_mismatches(tmp_path: Path, base_ckpt) -> None:
    with raises_msg(r"shape mismatch: enc\.b \[5\] vs base \[4\]"):
        validate_against(base_ckpt, finetune(tmp_path, enc__b=torch.zeros(5)))


def test_validate_names_int_vs_float_dtype_mismatches(tmp_path: Path, base_ckpt) -> None:
    with raises_msg(r"dtype mismatch: enc\.b I64 vs base F32"):
        validate_against(base_ckpt, finetune(tmp_path, enc__b=torch.zeros(4, dtype=torch.int64)))
    with raises_msg(r"dtype mismatch: steps F32 vs base I64"):
        validate_against(base_ckpt, finetune(tmp_path, steps=torch.tensor(9.0)))


def test_validate_reports_every_kind_of_problem_at_once_and_caps_the_list(tmp_path: Path) -> None:
    base = open_checkpoint(write_model(tmp_path / "base.safetensors", {f"k{i:02d}": torch.zeros(1) for i in range(12)}))
    ft = open_checkpoint(write_model(tmp_path / "ft.safetensors", {f"x{i:02d}": torch.zeros(1) for i in range(3)}))
    with pytest.raises(CheckpointError) as info:
        validate_against(base, ft)
    msg = str(info.value)
    assert "missing keys k00, k01, k02, k03, k04 (+7 more)" in msg
    assert "unexpected keys x00, x01, x02" in msg
    assert "k05" not in msg


# --------------------------------------------------------------------------------------------------------------------
# TaskVector: finiteness (FAULTS B8) and float32 maths for half-precision storage


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("workspace", [False, True])
def test_task_vector_rejects_non_finite_finetunes(tmp_path: Path, bad: float, workspace: bool) -> None:
    base = seeded(0, BASE_SHAPES)
    ft = {k: v + 0.01 for k, v in base.items()}
    ft["enc.w"][2, 1] = bad
    bp, fp = write_model(tmp_path / "b.safetensors", base), write_model(tmp_path / "f.safetensors", ft)
    task = TaskVector(open_checkpoint(bp), open_checkpoint(fp), list(BASE_SHAPES))
    out = torch.empty(100) if workspace else None
    task.tensor("enc.b", out=out)  # a clean tensor is fine
    with raises_msg(r"'enc\.w'.*NaN or Inf") as info:
        task.tensor("enc.w", out=out)
    assert info.value.key == "enc.w"
    assert info.value.path == fp
    with raises_msg(r"enc\.w"):
        list(task)
    with raises_msg(r"enc\.w"):
        list(task.stream())


def test_task_vector_rejects_inf_minus_inf(tmp_path: Path) -> None:
    base = {"w": torch.tensor([1.0, float("inf")])}
    ft = {"w": torch.tensor([2.0, float("inf")])}
    task = TaskVector.from_state_dicts(base, ft)
    with raises_msg("'w'"):
        task.tensor("w")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_task_vector_is_float32_for_half_precision_storage(tmp_path: Path, dtype: torch.dtype) -> None:
    base = {k: v.to(dtype) for k, v in seeded(0, BASE_SHAPES).items()}
    ft = {k: (v.float() + 0.001 * torch.arange(v.numel()).reshape(v.shape)).to(dtype) for k, v in base.items()}
    bp, fp = write_model(tmp_path / "b.safetensors", base), write_model(tmp_path / "f.safetensors", ft)
    task = TaskVector(open_checkpoint(bp), open_checkpoint(fp), list(BASE_SHAPES))
    assert task.dtypes == dict.fromkeys(sorted(BASE_SHAPES), dtype)
    work = torch.empty(max(v.numel() for v in base.values()))
    for k in sorted(BASE_SHAPES):
        want = ft[k].float() - base[k].float()  # exact: the difference of two half floats fits in float32
        assert torch.equal(want.double(), ft[k].double() - base[k].double())
        got = task.tensor(k)
        assert got.dtype == torch.float32 and torch.equal(got, want), k
        got = task.tensor(k, out=work)
        assert got.dtype == torch.float32 and torch.equal(got, want), k
    streamed = {k: t.clone() for k, t in task.stream()}
    for k in BASE_SHAPES:
        assert torch.equal(streamed[k], ft[k].float() - base[k].float())


def test_task_vector_mixed_precision_finetune_against_float32_base(tmp_path: Path) -> None:
    base = seeded(0, BASE_SHAPES)
    ft = {k: (v + 0.25).half() for k, v in base.items()}
    task = TaskVector.from_state_dicts(base, ft)
    for k in BASE_SHAPES:
        assert torch.equal(task.tensor(k), ft[k].float() - base[k])
    assert task.numel == sum(v.numel() for v in base.values())


def test_task_vector_float64_when_asked() -> None:
    base = {"w": torch.tensor([1.0, 2.0])}
    ft = {"w": torch.tensor([1.5, 1.0])}
    t = TaskVector(StateDict(base), StateDict(ft), ["w"], dtype=torch.float64).tensor("w")
    assert t.dtype == torch.float64 and t.tolist() == [0.5, -1.0]


# --------------------------------------------------------------------------------------------------------------------
# FingerprintCache


def test_fingerprint_is_the_files_sha256_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = fp_mod.sha256_file

    def counting(path, *a, **kw):
        calls.append(Path(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(fp_mod, "sha256_file", counting)
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"a": torch.arange(5.0)}, {})
    cache = FingerprintCache()
    assert cache.file(p) == sha256(p)
    assert cache.file(p) == sha256(p)
    assert cache.checkpoint(open_checkpoint(p)) == sha256(p)
    assert len(calls) == 1

    # rewritten (new inode, new size): recomputed
    write_safetensors(p, {"a": torch.arange(6.0)}, {})
    assert cache.file(p) == sha256(p)
    assert len(calls) == 2
    assert cache.file(p) == sha256(p)
    assert len(calls) == 2

    # modified in place with the same size: the mtime change is enough
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    st = p.stat()
    with open(p, "r+b") as f:
        f.write(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert cache.file(p) == sha256(p)
    assert len(calls) == 3


def test_fingerprint_of_a_sharded_checkpoint(tmp_path: Path) -> None:
    make_sharded(tmp_path / "m")
    cache = FingerprintCache()
    fp = cache.checkpoint(open_checkpoint(tmp_path / "m"))
    assert len(fp) == 64 and fp == cache.checkpoint(open_checkpoint(tmp_path / "m"))
    shards = sorted((tmp_path / "m").glob("*.safetensors"))
    assert fp not in {sha256(s) for s in shards}
    write_safetensors(shards[1], {"dec.w": torch.zeros(3, 4), "dec.b": torch.zeros(3)}, {})
    assert cache.checkpoint(open_checkpoint(tmp_path / "m")) != fp


def test_fingerprints_outlive_the_process_in_a_store_and_a_rewrite_is_seen(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = fp_mod.sha256_file
    monkeypatch.setattr(fp_mod, "sha256_file", lambda path, *a, **kw: calls.append(Path(path)) or real(path))
    p, store = tmp_path / "base.safetensors", tmp_path / "cache" / "fingerprints.json"
    write_safetensors(p, {"a": torch.arange(5.0)}, {})
    assert FingerprintCache(store).file(p) == sha256(p) and len(calls) == 1
    assert FingerprintCache(store).file(p) == sha256(p) and len(calls) == 1  # a new process: read from the store
    # rewritten in place, same size, mtime set back: the ctime still changes, so the hash is computed again
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert FingerprintCache(store).file(p) == sha256(p) and len(calls) == 2
    store.write_text("{not json")  # a damaged store is ignored, never trusted
    assert FingerprintCache(store).file(p) == sha256(p) and len(calls) == 3
    assert FingerprintCache(store).file(p, persist=False) == sha256(p)

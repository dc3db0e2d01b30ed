"""Sparse deltas and the mask file format of DESIGN §8, checked independently with the reference safetensors reader."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
import safetensors
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skillhub.checkpoint import write_safetensors
from skillhub.delta import (
    FORMAT,
    INT32_LIMIT,
    Provenance,
    SparseDelta,
    index_dtype,
)
from skillhub.errors import CheckpointError
from skillhub.taskvector import TaskVector

SHAPES = {"a.w": (6, 5), "h.w": (4, 4), "z.b": (7,)}
DTYPES = {"a.w": torch.float32, "h.w": torch.float16, "z.b": torch.float32}
PROV = Provenance(skill="cats", base="b" * 64, source="f" * 64, strategy="dataless",
                  params={"sparsity": 0.2, "note": "x"})


def models(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).to(DTYPES[k]) for k, s in SHAPES.items()}
    ft = {k: (v.float() + torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    return base, ft


def make_delta(masks: dict[str, list[int]] | None = None) -> tuple[SparseDelta, TaskVector]:
    base, ft = models()
    task = TaskVector.from_state_dicts(base, ft)
    masks = masks if masks is not None else {"a.w": [0, 7, 29], "h.w": [3, 15], "z.b": []}
    delta = task.sparse({k: torch.tensor(v, dtype=torch.int64) for k, v in masks.items()}, PROV)
    return delta, task


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# the file format, read with the reference implementation


def test_mask_file_follows_design_section_8(tmp_path: Path) -> None:
    delta, task = make_delta()
    path = tmp_path / "cats.mask.safetensors"
    digest = delta.save(path)
    assert digest == sha256(path)
    with safetensors.safe_open(path, "pt") as f:
        names = set(f.keys())
        meta = f.metadata()
        tensors = {n: f.get_tensor(n) for n in names}
    # no tensors at all for the empty mask of z.b
    assert names == {"a.w::indices", "a.w::values", "h.w::indices", "h.w::values"}
    for key, want in (("a.w", [0, 7, 29]), ("h.w", [3, 15])):
        idx, val = tensors[f"{key}::indices"], tensors[f"{key}::values"]
        assert idx.dtype == torch.int32
        assert idx.tolist() == want
        assert bool((idx[1:] > idx[:-1]).all())
        assert val.dtype == DTYPES[key]  # the base dtype: float16 values for a float16 base
        assert torch.equal(val, task.tensor(key).reshape(-1)[idx.long()].to(DTYPES[key]))
    assert meta["skillhub.format"] == "sparse-delta/1" == FORMAT
    assert meta["skillhub.skill"] == "cats"
    assert meta["skillhub.base"] == "b" * 64
    assert meta["skillhub.source"] == "f" * 64
    assert meta["skillhub.strategy"] == "dataless"
    assert json.loads(meta["skillhub.params"]) == {"sparsity": 0.2, "note": "x"}
    assert json.loads(meta["skillhub.shapes"]) == {"a.w": [6, 5], "h.w": [4, 4], "z.b": [7]}
    assert all(isinstance(v, str) for v in meta.values())


def test_mask_file_indices_are_int32_even_when_given_int64(tmp_path: Path) -> None:
    delta = SparseDelta({"w": torch.tensor([1, 4], dtype=torch.int64)}, {"w": torch.tensor([0.5, -1.0])},
                        {"w": (2, 3)}, {"w": torch.float32}, PROV)
    path = tmp_path / "m.mask.safetensors"
    delta.save(path)
    with safetensors.safe_open(path, "pt") as f:
        assert f.get_tensor("w::indices").dtype == torch.int32


def test_index_dtype_switches_to_int64_past_int32() -> None:
    assert INT32_LIMIT == 2**31 - 1
    assert index_dtype(0) == torch.int32
    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64
    assert index_dtype(10**12) == torch.int64


def test_round_trip(tmp_path: Path) -> None:
    delta, _ = make_delta()
    path = tmp_path / "m.mask.safetensors"
    delta.save(path)
    back = SparseDelta.load(path)
    assert back.shapes == {k: tuple(v) for k, v in SHAPES.items()}
    assert back.dtypes == DTYPES
    assert back.provenance == PROV
    assert set(back.indices) == set(delta.indices) == {"a.w", "h.w"}
    for k in delta.indices:
        assert torch.equal(back.indices[k].long(), delta.indices[k].long())
        assert back.values[k].dtype == DTYPES[k]
        assert torch.equal(back.values[k], delta.values[k])
    for k in SHAPES:
        assert torch.equal(back.dense(k), delta.dense(k))
    assert back.nnz == delta.nnz and back.numel == delta.numel
    # saving what was loaded gives the same bytes: the content address is stable
    assert back.save(tmp_path / "again.mask.safetensors") == sha256(path)


def test_saving_is_deterministic(tmp_path: Path) -> None:
    d1, _ = make_delta()
    d2, _ = make_delta()
    assert d1.save(tmp_path / "1.mask.safetensors") == d2.save(tmp_path / "2.mask.safetensors")


def test_an_all_empty_delta_round_trips(tmp_path: Path) -> None:
    delta, _ = make_delta({"a.w": [], "h.w": [], "z.b": []})
    path = tmp_path / "m.mask.safetensors"
    delta.save(path)
    with safetensors.safe_open(path, "pt") as f:
        assert list(f.keys()) == []
        assert json.loads(f.metadata()["skillhub.shapes"]) == {"a.w": [6, 5], "h.w": [4, 4], "z.b": [7]}
    back = SparseDelta.load(path)
    assert back.nnz == 0 and back.numel == 30 + 16 + 7 and back.indices == {}
    assert back.dtypes == DTYPES


def test_dense_puts_values_at_their_flat_row_major_indices() -> None:
    delta, task = make_delta()
    d = delta.dense("a.w")
    assert d.shape == (6, 5)
    tau = task.tensor("a.w")
    assert d[0, 0] == tau[0, 0] and d[1, 2] == tau[1, 2] and d[5, 4] == tau[5, 4]
    assert int((d != 0).sum()) == 3
    assert torch.equal(delta.dense("z.b"), torch.zeros(7))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_round_trip_of_random_masks(data: st.DataObject) -> None:
    shapes = {"k0": (3, 4), "k1": (5,), "k2": (2, 1, 3), "k3": ()}
    indices, values = {}, {}
    for k, s in shapes.items():
        n = math.prod(s)
        chosen = sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=n), label=k))
        if chosen:
            indices[k] = torch.tensor(chosen, dtype=torch.int32)
            floats = st.floats(allow_nan=False, allow_infinity=False, width=32)
            drawn = data.draw(st.lists(floats, min_size=len(chosen), max_size=len(chosen)), label=f"{k} values")
            values[k] = torch.tensor(drawn, dtype=torch.float32)
    delta = SparseDelta(indices, values, shapes, dict.fromkeys(shapes, torch.float32), PROV)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.mask.safetensors"
        delta.save(path)
        back = SparseDelta.load(path)
        assert back.save(Path(tmp) / "again.mask.safetensors") == sha256(path)
    assert back.shapes == shapes
    assert set(back.values) == set(indices)
    for k, idx in indices.items():
        # Stored densely exactly when that is no larger and no masked value is 0; the content is the same either way.
        dense = 4 * math.prod(shapes[k]) <= 8 * len(idx) and bool(values[k].all())
        assert back.is_dense(k) == dense, k
        assert torch.equal(back.mask(k), delta.mask(k)) and torch.equal(back.dense(k), delta.dense(k))
        if not dense:
            assert torch.equal(back.indices[k], idx) and torch.equal(back.values[k], values[k])
    assert back.nnz == delta.nnz


# --------------------------------------------------------------------------------------------------------------------
# load rejects malformed mask files


def write_mask(path: Path, tensors: dict[str, torch.Tensor], **meta: str) -> Path:
    metadata = {"skillhub.format": FORMAT, "skillhub.shapes": json.dumps({"w": [10]})}
    metadata.update({k.replace("__", "."): v for k, v in meta.items()})
    write_safetensors(path, tensors, {k: v for k, v in metadata.items() if v is not None})
    return path


def good_tensors(idx: list[int] | None = None) -> dict[str, torch.Tensor]:
    idx = idx if idx is not None else [1, 3, 8]
    return {"w::indices": torch.tensor(idx, dtype=torch.int32), "w::values": torch.ones(len(idx))}


def load_rejects(path: Path, pattern: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        SparseDelta.load(path)
    assert pattern in info.value.message, info.value.message
    assert info.value.path == path
    return info.value


def test_the_helper_writes_a_loadable_mask(tmp_path: Path) -> None:
    d = SparseDelta.load(write_mask(tmp_path / "m", good_tensors()))
    assert d.indices["w"].tolist() == [1, 3, 8] and d.shapes == {"w": (10,)}


@pytest.mark.parametrize("tag", ["sparse-delta/2", "sparse-delta", "", None])
def test_load_rejects_a_wrong_format_tag(tmp_path: Path, tag: str | None) -> None:
    path = write_mask(tmp_path / "m", good_tensors(), skillhub__format=tag)
    load_rejects(path, "not a skillhub mask file")


def test_load_rejects_a_model_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": torch.zeros(10)}, {})
    load_rejects(path, "not a skillhub mask file")


@pytest.mark.parametrize("idx", [[3, 1, 8], [1, 1, 8], [1, 3, 3], [9, 8]])
def test_load_rejects_unsorted_or_duplicate_indices(tmp_path: Path, idx: list[int]) -> None:
    err = load_rejects(write_mask(tmp_path / "m", good_tensors(idx)), "strictly increasing")
    assert err.key == "w"


@pytest.mark.parametrize("idx", [[1, 10], [10], [-1, 2], [0, 2**31 - 1]])
def test_load_rejects_out_of_range_indices(tmp_path: Path, idx: list[int]) -> None:
    load_rejects(write_mask(tmp_path / "m", good_tensors(idx)), "within [0, 10)")


@pytest.mark.parametrize("name", ["w::weights", "other::indices", "w", "w::"])
def test_load_rejects_an_unexpected_tensor(tmp_path: Path, name: str) -> None:
    tensors = dict(good_tensors(), **{name: torch.zeros(2)})
    err = load_rejects(write_mask(tmp_path / "m", tensors), "unexpected tensor")
    assert err.key == name


def test_load_rejects_float_indices(tmp_path: Path) -> None:
    tensors = {"w::indices": torch.tensor([1.0, 2.0]), "w::values": torch.ones(2)}
    load_rejects(write_mask(tmp_path / "m", tensors), "bad indices/values")


def test_load_rejects_values_and_indices_of_different_lengths(tmp_path: Path) -> None:
    tensors = {"w::indices": torch.tensor([1, 2], dtype=torch.int32), "w::values": torch.ones(3)}
    load_rejects(write_mask(tmp_path / "m", tensors), "bad indices/values")


def test_load_rejects_indices_that_are_not_1d(tmp_path: Path) -> None:
    tensors = {"w::indices": torch.tensor([[1, 2]], dtype=torch.int32), "w::values": torch.ones(1, 2)}
    load_rejects(write_mask(tmp_path / "m", tensors), "bad indices/values")


@pytest.mark.parametrize("shapes", ["not json", "", None])
def test_load_rejects_missing_or_unparsable_shapes(tmp_path: Path, shapes: str | None) -> None:
    load_rejects(write_mask(tmp_path / "m", good_tensors(), skillhub__shapes=shapes), "malformed")


# Regression: these used to escape as KeyError/AttributeError instead of CheckpointError.
def test_load_rejects_indices_without_values(tmp_path: Path) -> None:
    tensors = {"w::indices": torch.tensor([1, 2], dtype=torch.int32)}
    err = load_rejects(write_mask(tmp_path / "m", tensors), "'w'")
    assert err.key == "w"


def test_load_rejects_values_without_indices(tmp_path: Path) -> None:
    load_rejects(write_mask(tmp_path / "m", {"w::values": torch.ones(2)}), "'w'")


@pytest.mark.parametrize("shapes", ["[10]", '{"w": 10}', '{"w": ["x"]}'])
def test_load_rejects_shapes_that_are_not_an_object_of_lists(tmp_path: Path, shapes: str) -> None:
    load_rejects(write_mask(tmp_path / "m", good_tensors(), skillhub__shapes=shapes), "malformed")


@pytest.mark.parametrize("meta", ["params", "dtypes"])
def test_load_rejects_params_or_dtypes_that_are_not_objects(tmp_path: Path, meta: str) -> None:
    path = write_mask(tmp_path / "m", good_tensors(), **{f"skillhub__{meta}": "[1]"})
    load_rejects(path, "malformed")


@pytest.mark.parametrize("shapes", ['{"w": [-10]}', '{"w": [10.5]}', '{"w": [true, 10]}'])
def test_load_rejects_impossible_shapes(tmp_path: Path, shapes: str) -> None:
    load_rejects(write_mask(tmp_path / "m", {}, skillhub__shapes=shapes), "malformed")


@pytest.mark.parametrize("name", ["no_such_dtype", "Tensor", "complex64"])
def test_load_rejects_unknown_dtype_names(tmp_path: Path, name: str) -> None:
    load_rejects(write_mask(tmp_path / "m", good_tensors(), skillhub__dtypes=json.dumps({"w": name})), "w")


def test_load_rejects_a_mask_file_with_a_bad_header(tmp_path: Path) -> None:
    path = write_mask(tmp_path / "m", good_tensors())
    path.write_bytes(path.read_bytes() + b"\0" * 4)
    load_rejects(path, "trailing bytes")


def test_constructor_checks_consistency() -> None:
    with pytest.raises(CheckpointError, match="no shape"):
        SparseDelta({"w": torch.tensor([0])}, {"w": torch.ones(1)}, {}, {})
    with pytest.raises(CheckpointError, match="differ in shape"):
        SparseDelta({"w": torch.tensor([0, 1])}, {"w": torch.ones(1)}, {"w": (3,)}, {"w": torch.float32})


# --------------------------------------------------------------------------------------------------------------------
# sizes


def test_sizes() -> None:
    delta, _ = make_delta()  # a.w: 3 float32 entries, h.w: 2 float16 entries, z.b: empty
    assert delta.nnz == 5
    assert delta.numel == 30 + 16 + 7
    assert delta.density == pytest.approx(5 / 53)
    assert delta.nbytes == 3 * (4 + 4) + 2 * (4 + 2)
    assert delta.fraction_of(360) == pytest.approx(36 / 360)
    assert delta.fraction_of(0) == 36  # no division by zero


def test_sizes_of_an_empty_delta() -> None:
    empty = SparseDelta({}, {}, {}, {})
    assert (empty.nnz, empty.numel, empty.density, empty.nbytes) == (0, 0, 0.0, 0)


def test_nbytes_is_the_mask_files_data_section(tmp_path: Path) -> None:
    delta, _ = make_delta()
    path = tmp_path / "m.mask.safetensors"
    delta.save(path)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert len(raw) - 8 - header_len == delta.nbytes
    assert SparseDelta.load(path).nbytes == delta.nbytes


def test_sparse_skips_empty_masks_and_casts_values_to_the_base_dtype() -> None:
    delta, task = make_delta()
    assert set(delta.indices) == {"a.w", "h.w"}
    assert delta.shapes == SHAPES
    assert delta.values["h.w"].dtype == torch.float16
    assert delta.indices["a.w"].dtype == torch.int32
    assert torch.equal(delta.values["a.w"], task.tensor("a.w").reshape(-1)[torch.tensor([0, 7, 29])])


# --------------------------------------------------------------------------------------------------------------------
# the dense form: a mask over most of a tensor is stored as values alone, in the tensor's shape


def dense_delta() -> tuple[SparseDelta, TaskVector]:
    """a.w in the dense form with every entry masked, h.w (float16) dense with two entries left out, z.b sparse."""
    base, ft = models()
    task = TaskVector.from_state_dicts(base, ft)
    h = task.tensor("h.w").reshape(-1).clone()
    h[[2, 9]] = 0
    delta = task.sparse({"a.w": (None, task.tensor("a.w")), "h.w": (None, h), "z.b": torch.tensor([1, 5])}, PROV)
    return delta, task


def test_dense_form_in_memory_has_no_indices() -> None:
    delta, task = dense_delta()
    assert delta.dense_keys == ["a.w", "h.w"] and set(delta.indices) == {"z.b"}
    assert delta.is_dense("a.w") and not delta.is_dense("z.b") and not delta.is_dense("nope")
    assert delta.nnz_of("a.w") == 30 and delta.nnz_of("h.w") == 14 and delta.nnz == 30 + 14 + 2
    assert delta.values["h.w"].dtype == torch.float16 and delta.values["a.w"].shape == (30,)
    assert torch.equal(delta.dense("a.w"), task.tensor("a.w"))
    mask = delta.mask("h.w").reshape(-1)
    assert mask.sum() == 14 and not mask[2] and not mask[9]
    assert delta.flat_indices("h.w").tolist() == [i for i in range(16) if i not in (2, 9)]


def test_dense_form_on_disk_is_values_alone_in_the_full_shape(tmp_path: Path) -> None:
    delta, task = dense_delta()
    path = tmp_path / "d.mask.safetensors"
    assert delta.save(path) == sha256(path)
    with safetensors.safe_open(path, "pt") as f:  # the reference reader
        names = set(f.keys())
        tensors = {n: f.get_tensor(n) for n in names}
    assert set(tensors) == {"a.w::values", "h.w::values", "z.b::indices", "z.b::values"}
    assert tensors["a.w::values"].shape == (6, 5) and tensors["h.w::values"].shape == (4, 4)
    assert tensors["h.w::values"].dtype == torch.float16
    assert torch.equal(tensors["a.w::values"], task.tensor("a.w"))
    assert int((tensors["h.w::values"] == 0).sum()) == 2
    back = SparseDelta.load(path)
    assert set(back.dense_keys) == {"a.w", "h.w"}
    assert back.indices["z.b"].tolist() == [1, 5]
    for k in SHAPES:
        assert torch.equal(back.dense(k), delta.dense(k)) and torch.equal(back.mask(k), delta.mask(k))
    assert back.nnz == delta.nnz == 46
    # the data section is what nbytes says: values only for the dense tensors
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert path.stat().st_size - 8 - header_len == delta.nbytes == 30 * 4 + 16 * 2 + 2 * (4 + 4)
    assert back.save(tmp_path / "again.mask.safetensors") == sha256(path)


def test_the_file_form_depends_on_the_mask_not_on_the_form_in_memory(tmp_path: Path) -> None:
    dense, task = dense_delta()
    sparse = task.sparse({k: dense.flat_indices(k) for k in SHAPES}, PROV)
    assert sparse.dense_keys == [] and sparse.nbytes == dense.nbytes
    assert sparse.save(tmp_path / "s.mask.safetensors") == dense.save(tmp_path / "d.mask.safetensors")


def test_the_writer_picks_the_dense_form_only_when_it_is_no_larger(tmp_path: Path) -> None:
    # float32 a.w (30 entries): 15 masked entries cost 15 × 8 = 120 bytes sparse = 30 × 4 dense: dense; 14: sparse.
    # float16 h.w (16 entries): dense from 6 entries (6 × 6 = 36 ≥ 32).
    for masks, dense in (({"a.w": list(range(0, 30, 2))}, {"a.w"}), ({"a.w": list(range(14))}, set()),
                         ({"h.w": [0, 3, 4, 7, 8, 15]}, {"h.w"}), ({"h.w": [0, 3, 4, 7, 8]}, set())):
        delta, _ = make_delta(masks)
        path = tmp_path / "m.mask.safetensors"
        delta.save(path)
        with safetensors.safe_open(path, "pt") as f:
            names = set(f.keys())
        assert {n.split("::")[0] for n in names if n.endswith("::indices")} == set(masks) - dense
        back = SparseDelta.load(path)
        assert set(back.dense_keys) == dense
        assert all(torch.equal(back.mask(k), delta.mask(k)) for k in SHAPES)


def test_a_masked_zero_value_keeps_the_sparse_form(tmp_path: Path) -> None:
    # In the dense form a 0 means "not in the mask", so a mask that holds a 0 value must stay sparse.
    delta = SparseDelta({"w": torch.arange(4, dtype=torch.int32)}, {"w": torch.tensor([1.0, 0.0, 2.0, 3.0])},
                        {"w": (4,)}, {"w": torch.float32}, PROV)
    assert delta.encoding("w") == "sparse"
    delta.save(tmp_path / "m.mask.safetensors")
    back = SparseDelta.load(tmp_path / "m.mask.safetensors")
    assert back.indices["w"].tolist() == [0, 1, 2, 3] and back.nnz == 4


def test_an_old_file_with_every_index_loads_dense_and_others_load_as_they_were(tmp_path: Path) -> None:
    # Files written before the dense form existed: full index arrays (what `--sparsity 1.0` used to write).
    full = write_mask(tmp_path / "full", {"w::indices": torch.arange(10, dtype=torch.int32),
                                          "w::values": torch.arange(1.0, 11.0)})
    back = SparseDelta.load(full)
    assert back.is_dense("w") and torch.equal(back.dense("w"), torch.arange(1.0, 11.0)) and back.nnz == 10
    part = SparseDelta.load(write_mask(tmp_path / "part", good_tensors()))
    assert not part.is_dense("w") and part.indices["w"].tolist() == [1, 3, 8]


@pytest.mark.parametrize(("values", "pattern"), [
    (torch.ones(2), "full shape [10]"),  # too short
    (torch.ones(2, 5), "full shape [10]"),  # the right count, the wrong shape
    (torch.ones(10, dtype=torch.int32), "must be floats"),
])
def test_load_rejects_dense_values_that_do_not_fill_the_tensor(tmp_path: Path, values: torch.Tensor,
                                                             pattern: str) -> None:
    err = load_rejects(write_mask(tmp_path / "m", {"w::values": values}), pattern)
    assert err.key == "w" and "KEY::indices" in (err.hint or "")


def test_constructor_checks_dense_values() -> None:
    with pytest.raises(CheckpointError, match="one value per entry"):
        SparseDelta({}, {"w": torch.ones(5)}, {"w": (2, 3)}, {"w": torch.float32})
    with pytest.raises(CheckpointError, match="no shape"):
        SparseDelta({}, {"w": torch.ones(6)}, {}, {})
    _, task = make_delta()
    with pytest.raises(CheckpointError, match="one value per entry"):
        task.sparse({"a.w": (None, torch.ones(3))})
    assert task.sparse({"a.w": (None, torch.zeros(30))}).values == {}  # an all-zero dense tensor is an empty mask

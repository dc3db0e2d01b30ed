"""The streaming header parse of :mod:`skillhub.header` (FAULTS B3): it reads exactly what the whole-header parse
through Python's ``json`` read, with the same verdict and the same message, and holds its caps.

The oracle is that old parse, kept here: the header decoded and built whole by ``json`` with the strict hooks (no
duplicate keys, no NaN or Infinity, no overflowing float, no ``-0`` integer, a budget of objects), then the same
checks in the same order (metadata, lone surrogates, the tensor cap, each entry, the tiling). Headers are drawn from a
grammar that mixes what writers produce (every order of the keys, spacing, escaped and non-ASCII names, empty tensors,
metadata) with what they never do (junk tokens, stray fields, wrong types, duplicates, bad bytes), small enough that
no cap of the new parse is reached: there the two must agree on every byte.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skillhub.errors import CheckpointError
from skillhub.header import (
    MAX_DEPTH,
    MAX_ENTRY_VALUES,
    MAX_GENERIC_VALUES,
    MAX_METADATA_VALUES,
    MAX_TENSORS,
    Header,
    check_layout,
    read_header,
)
from skillhub.headerscan import _tensor_info

EXAMPLES = int(os.environ.get("SKILLHUB_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MALFORMED = "the file is malformed; re-export it"
F32 = '"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'


def file(path: Path, header: str | bytes, data: bytes = b"") -> Path:
    raw = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def json_read_header(path: Path, max_tensors: int = MAX_TENSORS) -> Header | CheckpointError:
    """``read_header`` as it was before the streaming parse: the whole header through ``json``, then the checks."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    raw, data_start, data_len = data[8:8 + n], 8 + n, len(data) - 8 - n
    budget = [max_tensors + 2]

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        budget[0] -= 1
        if budget[0] < 0:
            raise CheckpointError(f"more than {max_tensors} tensors in the header, over the cap", path=path)
        out: dict[str, object] = {}
        for k, v in items:
            if k in out:
                raise CheckpointError(f"duplicate tensor name {k!r} in the header", path=path, hint=MALFORMED)
            out[k] = v
        return out

    def constant(name: str) -> object:
        raise ValueError(name)

    def real(text: str) -> float:
        if not math.isfinite(value := float(text)):
            raise ValueError(text)
        return value

    def integer(text: str) -> int:
        if text.startswith("-0"):
            raise CheckpointError("header writes an integer as -0: not written by any safetensors writer", path=path,
                                  hint=MALFORMED)
        return int(text)

    decoder = json.JSONDecoder(object_pairs_hook=pairs, parse_constant=constant, parse_float=real, parse_int=integer)
    try:
        obj = decoder.decode(raw.decode("utf-8"))
    except CheckpointError as e:
        return e
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        return CheckpointError(f"header is not valid JSON ({type(e).__name__}): not a safetensors file", path=path)
    if not isinstance(obj, dict):
        return CheckpointError("header is not a JSON object: not a safetensors file", path=path)
    meta = obj.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return CheckpointError("header __metadata__ must map strings to strings", path=path)
    try:
        "".join((*obj, *meta, *meta.values())).encode("utf-8")
    except UnicodeEncodeError:
        return CheckpointError("header holds a name or metadata text that is not valid UTF-8 (a lone surrogate)",
                               path=path, hint=MALFORMED)
    if len(obj) > max_tensors:
        return CheckpointError(f"more than {max_tensors} tensors in the header, over the cap", path=path)
    tensors = {}
    try:
        for name, entry in obj.items():
            if not isinstance(entry, dict):
                raise CheckpointError(f"header entry {name!r} is not an object", path=path, key=name)
            tensors[name] = _tensor_info(path, name, entry.get("dtype"), entry.get("shape"), entry.get("data_offsets"),
                                         data_start, data_len)
    except CheckpointError as e:
        return e
    try:  # the layout rule is the same code: what this reference checks is the JSON parse before it
        check_layout(tensors, data_start, len(data), path)
    except CheckpointError as e:
        return e
    return Header(path=path, tensors=tensors, metadata=meta, file_size=len(data))


def verdict(result: Header | CheckpointError) -> object:
    if isinstance(result, CheckpointError):
        return ("rejected", result.message, result.key, result.hint)
    return ("read", [(k, v.dtype, v.shape, v.start, v.end) for k, v in result.tensors.items()], result.metadata)


def streamed(path: Path, max_tensors: int = MAX_TENSORS) -> Header | CheckpointError:
    try:
        return read_header(path, max_tensors=max_tensors)
    except CheckpointError as e:
        return e


# --------------------------------------------------------------------------------------------------------------------
# the grammar

SIZES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "BOOL": 1, "I64": 8, "F64": 8, "F8_E4M3": 1, "Q4": 1, "f32": 4}
GOOD = ["0", "1", "-1", "7", "1.5", "4.0", "1e5", "1E+2", "true", "false", "null", '""', '"a"', '"\\u0041"',
        '"\\ud83d\\ude00"', '"é"', '"\\/"', '"F32"', '"U8"', '"\\u0046\\u0033\\u0032"', "123456789012345678901234",
        "9" * 4300]
BAD = ["-0", "01", "1.", "1e", "-", "1.5e400", "NaN", "Infinity", "-Infinity", "tru", '"\\x"', '"\\u12"', '"a\tb"',
       "9" * 4301, '"\\ud800"', "[1,]", "{,}", '{"a":1,"a":2}', "[" * 40 + "]" * 40]
WS = ["", "", "", "", " ", "\n  ", "\t", "\r\n"]


def values(depth: int = 0) -> st.SearchStrategy[str]:
    scalar = st.one_of(st.sampled_from(GOOD), st.sampled_from(GOOD), st.sampled_from(GOOD), st.sampled_from(BAD))
    if depth > 3:
        return scalar
    inner = st.deferred(lambda: values(depth + 1))
    return st.one_of(scalar, scalar, st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
                     st.lists(st.tuples(st.sampled_from(['"a"', '"b"', '"dtype"', '"\\u0061"']), inner), max_size=3)
                     .map(lambda ps: "{" + ",".join(f"{k}:{v}" for k, v in ps) + "}"))


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """``(header, data)``: a few entries, mostly plausible, laid out one after the other in the data."""
    ws = st.sampled_from(WS)
    pairs, pos = [], 0
    for i in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from([f"t{i}", f"layer.{i}.weight", f"é{i}", f"\U0001F600{i}", f'a"{i}', f"x\\{i}"]
                                    if draw(st.integers(0, 7)) != 7 else ["t0", "", "__metadata__", "\ud800"]))
        key = json.dumps(name, ensure_ascii=draw(st.booleans()) or "\ud800" in name)
        code = draw(st.sampled_from(list(SIZES)))
        shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5]), max_size=3))
        if draw(st.integers(0, 19)) == 19:
            shape = [0, 2**63]  # empty, yet torch cannot make it
        size = math.prod(shape) * SIZES[code]
        begin, end = pos + draw(st.sampled_from([0] * 12 + [-1, 1])), pos + size + draw(st.sampled_from([0] * 12 + [1]))
        pos += size
        fields = {"dtype": f'"{code}"', "shape": "[" + ("," + draw(ws)).join(map(str, shape)) + "]",
                  "data_offsets": f"[{begin},{draw(ws)}{end}]"}
        if draw(st.integers(0, 9)) == 9:
            fields[draw(st.sampled_from(["dtype", "shape", "data_offsets", "x"]))] = draw(values())
        order = draw(st.permutations(list(fields))) if draw(st.booleans()) else list(fields)
        body = ("," + draw(ws)).join(f'"{k}"{draw(ws)}:{draw(ws)}{fields[k]}' for k in order)
        pairs.append(f"{draw(ws)}{key}{draw(ws)}:{draw(ws)}{{{draw(ws)}{body}{draw(ws)}}}")
    if draw(st.integers(0, 3)) == 3:
        meta = draw(st.one_of(st.sampled_from(['{"format":"pt"}', "{}", "null", '{"a":"1","a":"2"}', '{"k":"\\u00e9"}',
                                               '{"k":"\\udc00"}', "[]", '{"k":1}']), values()))
        pairs.insert(draw(st.integers(0, len(pairs))), f'"__metadata__":{meta}')
    if draw(st.integers(0, 9)) == 9:
        odd_key = draw(st.sampled_from(['"j"', '"t0"', "j"]))
        pairs.insert(draw(st.integers(0, len(pairs))), f"{odd_key}:{draw(values())}")
    text = "{" + ",".join(pairs) + draw(ws) + "}" + draw(st.sampled_from(["", "", "", "", "", "  ", "x", "}", "\0"]))
    if draw(st.integers(0, 19)) == 19:
        text = draw(values())
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 9:  # one byte changed, inserted or dropped: JSON errors anywhere
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"", b",", b"}", b'"', b"\\", b"\xc3", b"0", b" "])) + raw[at + 1:]
    return raw, bytes(pos + draw(st.sampled_from([0] * 8 + [1, -1])) if pos else 0)


@FUZZ
@given(case=headers())
def test_the_streaming_parse_reads_every_header_as_json_did(tmp_path_factory: pytest.TempPathFactory,
                                                              case: tuple[bytes, bytes]) -> None:
    path = file(tmp_path_factory.mktemp("h") / "x.safetensors", *case)
    assert verdict(streamed(path)) == verdict(json_read_header(path))


@pytest.mark.parametrize("max_tensors", [0, 1, 2, 3])
def test_the_tensor_cap_reads_as_json_did(tmp_path: Path, max_tensors: int) -> None:
    header = '{"__metadata__":{"a":"b"},' + ",".join(
        f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(3)) + "}"
    path = file(tmp_path / "x.safetensors", header, bytes(3))
    assert verdict(streamed(path, max_tensors)) == verdict(json_read_header(path, max_tensors))


# --------------------------------------------------------------------------------------------------------------------
# every layout of a plain entry reads alike, by the fast path or the generic one

ENTRY = {"dtype": '"F16"', "shape": "[2, 3]", "data_offsets": "[0, 12]"}


@pytest.mark.parametrize("order", list(itertools.permutations(ENTRY)), ids="-".join)
@pytest.mark.parametrize("layout", ["compact", "spaced", "escaped name", "stray field", "empty sibling"])
def test_every_layout_of_an_entry_reads_alike(tmp_path: Path, order: tuple[str, ...], layout: str) -> None:
    fields = [f'"{k}":{ENTRY[k]}' for k in order] + (['"x":[1, {"y": null}]'] if layout == "stray field" else [])
    sep = ", " if layout == "spaced" else ","
    name = '"\\u0077\\u00e9"' if layout == "escaped name" else '"wé"'
    sibling = ',"e":{"dtype":"F32","shape":[0, 7],"data_offsets":[12, 12]}' if layout == "empty sibling" else ""
    path = file(tmp_path / "x.safetensors", "{" + name + ":{" + sep.join(fields) + "}" + sibling + "}", bytes(12))
    header = read_header(path)
    assert verdict(header) == verdict(json_read_header(path))
    assert header.tensors["wé"].shape == (2, 3) and header.tensors["wé"].end == path.stat().st_size


# --------------------------------------------------------------------------------------------------------------------
# the caps


def rejection(path: Path) -> str:
    with pytest.raises(CheckpointError) as caught:
        read_header(path)
    assert caught.value.path == path
    return caught.value.message


def test_metadata_is_capped(tmp_path: Path) -> None:
    def meta(count: int) -> str:
        return '{"__metadata__":{' + ",".join(f'"k{i}":"v"' for i in range(count)) + "}," + F32 + "}"
    assert len(read_header(file(tmp_path / "ok.safetensors", meta(MAX_METADATA_VALUES), bytes(4))).metadata) == 1024
    message = rejection(file(tmp_path / "x.safetensors", meta(MAX_METADATA_VALUES + 1), bytes(4)))
    assert message == f"header __metadata__ holds more than {MAX_METADATA_VALUES} values, over the cap"


def test_the_values_of_one_entry_are_capped(tmp_path: Path) -> None:
    def entry(stray: int) -> str:  # the entry, dtype, shape and its dimension, offsets and theirs, x: 8 values
        return '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":[' + ",".join(["0"] * stray) + "]}}"
    assert read_header(file(tmp_path / "ok.safetensors", entry(MAX_ENTRY_VALUES - 8), bytes(4))).tensors
    with pytest.raises(CheckpointError) as caught:
        read_header(file(tmp_path / "x.safetensors", entry(MAX_ENTRY_VALUES - 7), bytes(4)))
    assert caught.value.message == f"header entry 'w' holds more than {MAX_ENTRY_VALUES} JSON values, over the cap"
    assert caught.value.key == "w"


def test_values_outside_plain_entries_are_capped_in_all(tmp_path: Path) -> None:
    # each entry within its own cap, all of them over the header's: the time a hostile header takes is bounded
    count, stray = MAX_GENERIC_VALUES // 1000 + 1, ",".join(["0"] * 1000)
    header = "{" + ",".join(f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}],"x":[{stray}]}}'
                            for i in range(count)) + "}"
    message = rejection(file(tmp_path / "x.safetensors", header, bytes(count)))
    assert message == (f"header holds more than {MAX_GENERIC_VALUES} JSON values outside plain tensor entries, over "
                       "the cap")


@pytest.mark.parametrize(("depth", "message"), [(MAX_DEPTH, "header is not a JSON object: not a safetensors file"),
                                                (MAX_DEPTH + 1, f"header nests deeper than {MAX_DEPTH} levels")])
def test_nesting_is_capped_where_the_reference_caps_it(tmp_path: Path, depth: int, message: str) -> None:
    path = file(tmp_path / "x.safetensors", "[" * depth + "]" * depth)
    assert rejection(path).startswith(message)


def test_a_header_that_is_not_an_object_is_not_read_to_the_end(tmp_path: Path) -> None:
    # past the cap it cannot become an object any more: said at once, even with junk further on
    path = file(tmp_path / "x.safetensors", "[" + "0," * (2 * MAX_ENTRY_VALUES) + "junk")
    assert rejection(path) == "header is not a JSON object: not a safetensors file"


def test_a_lost_header_reports_its_first_bad_entry_without_holding_every_name(tmp_path: Path) -> None:
    # Documented difference from the whole-header parse: thousands of entries after a bad one, the bad one is reported
    # without reading on for a JSON error at the very end (json would have said "not valid JSON").
    header = '{"a":{},' + ",".join(f'"t{i}":0' for i in range(10_000)) + ",}"
    assert rejection(file(tmp_path / "x.safetensors", header)) == "tensor 'a' has unknown dtype None"
    # a few entries after it, the JSON error still reports first, as it did
    header = '{"a":{},' + ",".join(f'"t{i}":0' for i in range(100)) + ",}"
    assert rejection(file(tmp_path / "y.safetensors", header)).startswith("header is not valid JSON")


def test_a_header_of_empty_tensors_costs_a_small_multiple_of_its_size(tmp_path: Path) -> None:
    # the worst header that reads: every entry a tensor, none holding data; json cost 16x its size here
    header = "{" + ",".join(f'"{i:x}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}' for i in range(50_000)) + "}"
    path = file(tmp_path / "x.safetensors", header)
    tracemalloc.start()
    try:
        assert len(read_header(path).tensors) == 50_000
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * len(header), f"{peak / len(header):.1f}x the header"

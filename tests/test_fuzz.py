"""Property-based fuzzing of the safetensors header pre-check and the checkpoint validator (FAULTS B3, B4, B5).

The promise under test: whatever bytes arrive, :func:`skillhub.checkpoint.open_checkpoint` plus reading every tensor
ends in either a checkpoint whose tensors match their declared dtype, shape and bytes, or a
:class:`~skillhub.errors.CheckpointError` naming the file; never another exception, never a crash, never an
allocation beyond the file's size. Inputs come from two families of strategies:

* *structurally plausible headers*: valid JSON with ``dtype``/``shape``/``data_offsets`` entries, then mutated
  (wrong dtypes, negative/huge/overlapping/out-of-range offsets, shapes that disagree with their byte span, huge
  shape products, duplicate names written raw into the JSON text, non-ASCII and escaped names, ``__metadata__``
  variants, stray fields, trailing or missing data, header padding, a lying length prefix);
* *raw byte mutations* of a valid file written by skillhub's writer, the reference one, or laid out unaligned and
  out of order (bit flips, byte overwrites, digit changes that keep the JSON valid, truncations, insertions,
  deletions, a rewritten length prefix).

Besides the catch-all properties, focused ones spend their budget on one rule each with a sharper assertion:
byte spans (gaps, overlaps, trailing bytes), the frame (metadata, names, length prefix), numbers that keep their
value under another JSON type or sign (``4.0``, ``true``, two ``-1`` dimensions), duplicates (always rejected,
naming the name) and dtypes (read as declared, or the first bad tensor named with its dtype). Any exception other
than CheckpointError is re-raised with its traceback and fails the test; a crash of the process fails the run.

The reference ``safetensors`` library is the oracle, in both directions: a file we accept must load there with the
same names, dtypes, shapes, bytes and metadata; a file it accepts but we reject must be rejected by one of our
documented stricter rules (duplicate names or metadata keys, B4; dtypes we refuse, B5; the tensor-count cap and the
header parse's caps on values, B3/B10).

Allocation. ``tracemalloc`` traces the Python heap while the file is opened and every tensor read: the header bytes
read from disk, the JSON objects built from them, and the copies made of misaligned tensors. It does not see the
memory map (page cache that can never exceed the file) or torch's own C++ allocator, so each returned tensor's
storage is also checked to be no larger than the file. The bound is *file size + 1 MiB*. Fuzzed files are a few
KiB, so the slack absorbs the parser's constant-factor overhead and what the bound really catches is an allocation
driven by a *declared* number (length prefix, shape, offsets) rather than by bytes actually present; the targeted
examples with a 2**63 length prefix or a [2**40, 2**40] shape make that explicit. Header bombs, headers of many
tiny JSON values that Python's json would have built at ~25x their size, are pinned separately with files large
enough for the factor to show (:func:`test_b3_a_header_of_many_tiny_values_allocates_no_more_than_the_file`).

Known bugs that the fuzzer finds are each pinned by a ``strict`` xfail test that reproduces them with minimal bytes;
the fuzz properties recognise exactly those failures (:func:`known_crash`, :func:`reference_dialect`) and record
them as Hypothesis events instead of failing, so that they keep guarding everything else. Once a bug is fixed its
xfail test passes, strict turns that into a failure, and the marker and the matching excuse come out together.

Bounded time: a fixed number of examples per property (200), derandomised (the same inputs on every run, no example
database), about 10 s for the whole file on two cores. For a longer hunt (the same sequence, continued further)::

    SKILLHUB_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tracemalloc
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis
import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skillhub.checkpoint import (
    Checkpoint,
    check_tensor_dtypes,
    open_checkpoint,
    validate_against,
)
from skillhub.errors import CheckpointError
from skillhub.header import (
    DTYPES,
    FLOAT_DTYPES,
    MAX_HEADER_BYTES,
    UNSUPPORTED_DTYPES,
    read_header,
    safetensors_header,
)

EXAMPLES = int(os.environ.get("SKILLHUB_FUZZ_EXAMPLES", "200"))
#: allocation slack over the file's size (see the module docstring).
SLACK = 1 << 20

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # the first example pays for torch's lazy initialisation
    derandomize=True,  # the same inputs in CI every time: a red run is reproducible
    database=None,  # no .hypothesis folder in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: every dtype code the reference knows, with its size in bits (sub-byte types pack several elements per byte).
REFERENCE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "C64": 64,
}
#: messages of our rules that are deliberately stricter than the reference (FAULTS B4, B5, B10).
STRICTER_RULES = re.compile(r"duplicate tensor name|unsupported dtype|tensors in the header, over the cap|"
                            r"values, over the cap|an integer as -0")

# --------------------------------------------------------------------------------------------------------------------
# building files as JSON text, so that mutations can write what json.dumps never would


def json_string(text: str, *, escaped: bool = False, ensure_ascii: bool = False) -> str:
    """``text`` as a JSON string literal; ``escaped`` spells every UTF-16 unit as ``\\uXXXX`` (same name, other
    bytes: a duplicate must be caught after decoding, not by comparing raw bytes)."""
    if not escaped:
        return json.dumps(text, ensure_ascii=ensure_ascii)
    units = text.encode("utf-16-le")
    return '"' + "".join(f"\\u{int.from_bytes(units[i:i + 2], 'little'):04x}" for i in range(0, len(units), 2)) + '"'


@dataclass
class Entry:
    """One tensor entry of a header, every value kept as raw JSON text."""

    name: str
    fields: dict[str, str]
    escaped: bool = False
    raw_name: str | None = None  # a literal that is not a plain JSON string (a lone surrogate escape)

    def render(self, ensure_ascii: bool) -> str:
        key = self.raw_name or json_string(self.name, escaped=self.escaped, ensure_ascii=ensure_ascii)
        return key + ":{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in self.fields.items()) + "}"


@dataclass
class Draft:
    """A safetensors file under construction; :meth:`render` gives its bytes."""

    entries: list[Entry]
    data: bytes
    metadata: str | None = None  # raw JSON text of ``__metadata__``, absent when None
    metadata_first: bool = True
    ensure_ascii: bool = False
    padding: str = ""  # after the closing brace, inside the declared header length
    length_delta: int = 0  # a length prefix that lies by this much ...
    length: int | None = None  # ... or this absolute value

    def header(self) -> bytes:
        pairs = [e.render(self.ensure_ascii) for e in self.entries]
        if self.metadata is not None:
            meta = f'"__metadata__":{self.metadata}'
            pairs = [meta, *pairs] if self.metadata_first else [*pairs, meta]
        return ("{" + ",".join(pairs) + "}" + self.padding).encode("utf-8", "surrogatepass")

    def render(self) -> bytes:
        header = self.header()
        n = self.length if self.length is not None else max(0, len(header) + self.length_delta)
        return struct.pack("<Q", n % 2**64) + header + self.data


def nbytes(code: str, shape: list[int]) -> int:
    """Bytes a tensor of ``shape`` takes in the reference's format (junk dtype codes count as one byte)."""
    return math.prod(shape) * REFERENCE_BITS.get(code, 8) // 8


@st.composite
def drafts(draw: st.DrawFn, codes: st.SearchStrategy[str] = st.sampled_from(sorted(DTYPES)),
           min_tensors: int = 0, max_tensors: int = 4) -> Draft:
    """A valid file: tensors with tiny shapes, data laid out in another order than the header lists them."""
    names = st.one_of(st.sampled_from(["w", "enc.weight", "module.enc.bias", "model.", "model.a", ""]),
                      st.text(st.characters(codec="utf-8"), max_size=6))  # non-ASCII, quotes, controls
    specs = draw(st.lists(st.tuples(names, codes, st.lists(st.integers(0, 4), max_size=3)),
                          min_size=min_tensors, max_size=max_tensors, unique_by=lambda s: s[0]))
    # sub-byte dtypes need an element count that fills whole bytes
    specs = [(n, c, [*s, 4] if REFERENCE_BITS.get(c, 8) < 8 else s) for n, c, s in specs]
    order = draw(st.permutations(range(len(specs))))
    offsets: dict[int, tuple[int, int]] = {}
    pos = 0
    for i in order:
        size = nbytes(specs[i][1], specs[i][2])
        offsets[i] = (pos, pos + size)
        pos += size
    entries = [Entry(name, {"dtype": json.dumps(code), "shape": json.dumps(shape),
                            "data_offsets": json.dumps(list(offsets[i]))}, escaped=draw(st.booleans()))
               for i, (name, code, shape) in enumerate(specs)]
    metadata = draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.text(max_size=6), max_size=3)))
    return Draft(entries=entries, data=draw(st.binary(min_size=pos, max_size=pos)),
                 metadata=None if metadata is None else json.dumps(metadata), metadata_first=draw(st.booleans()),
                 ensure_ascii=draw(st.booleans()), padding=" " * draw(st.integers(0, 7)))


ABSURD_INTS = [-1, -(2**63), 2**31, 2**32 + 4, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30,
               MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1]
numbers = st.one_of(st.sampled_from(ABSURD_INTS), st.integers(-64, 4096), st.integers(-(2**80), 2**80))
#: JSON-ish values that are the wrong type, not standard JSON, or hostile to a parser.
RAW_JUNK = ["null", "true", "false", "0", "-0", "1.0", "4e0", "1E400", "-1", '"4"', '"F32"', "[]", "{}", '[0,"1"]',
            "[[1]]", "NaN", "Infinity", "-Infinity", '{"a":1,"a":2}', "9" * 4301, "[" * 200 + "]" * 200]
junk = st.one_of(st.sampled_from(RAW_JUNK), numbers.map(str), st.lists(numbers, max_size=3).map(json.dumps))
#: dtype fields: every reference code, near misses, and values that are not codes at all.
dtype_values = st.one_of(st.sampled_from(sorted(REFERENCE_BITS)).map(json.dumps),
                         st.sampled_from(["f32", "float32", "F32 ", "", "Q4_K", "F8", "I128"]).map(json.dumps),
                         junk)
metadata_values = st.sampled_from(['{}', '{"k":"v"}', 'null', '0', '[]', '""', 'false', '"x"', '{"k":1}',
                                   '{"k":null}', '{"k":{"a":"b"}}', '{"ü\\n":"ß"}', '{"a":"1","a":"2"}'])


def json_list(text: str) -> list[object]:
    """``text`` parsed when it is a JSON array (earlier mutations may have written anything), else ``[]``."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return value if isinstance(value, list) else []


MUTATIONS = ["dtype", "shape", "offsets", "overlap", "layout", "field", "duplicate", "name", "metadata", "data",
             "length", "padding"]
#: the mutations that only move bytes around: offsets, spans, shapes, trailing or missing data.
SPAN_MUTATIONS = ["shape", "offsets", "overlap", "layout", "data"]
#: the mutations of everything around the tensor entries: metadata, names, stray fields, length prefix, padding.
FRAME_MUTATIONS = ["metadata", "name", "field", "length", "padding"]


def retypes(value: object) -> list[type]:
    """Types that can spell ``value`` again as another JSON type: bool only for 0 and 1, where Python's
    ``True == 1`` could sneak it through an equality check."""
    return [float, str, bool] if value in (0, 1) else [float, str]


@st.composite
def mutated_drafts(draw: st.DrawFn, kinds: tuple[str, ...] = tuple(MUTATIONS)) -> Draft:
    """A valid draft with a few structural mutations of the given ``kinds`` (FAULTS B3, and B4/B5 mixed in)."""
    d = draw(drafts(min_tensors=1))  # an empty header leaves the per-tensor checks nothing to chew on
    # mostly a single mutation: a file with one thing wrong is the sharpest test of each rule (and of the oracle)
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3, 4]))):
        kind = draw(st.sampled_from(kinds))
        e = draw(st.sampled_from(d.entries))  # the entry a per-entry mutation hits
        if kind == "dtype":
            e.fields["dtype"] = draw(dtype_values)
        elif kind == "shape":
            shape = json_list(e.fields["shape"])
            how = draw(st.sampled_from(["dim", "append", "drop", "zero", "sign", "retype", "junk"]))
            if how == "dim" and shape:
                shape[draw(st.integers(0, len(shape) - 1))] = draw(numbers)
            elif how == "append":
                shape.append(draw(numbers))
            elif how == "drop" and shape:
                shape.pop()
            elif how == "zero":  # an empty tensor with absurd other dimensions needs no bytes at all
                shape = [0, *draw(st.lists(st.sampled_from(ABSURD_INTS[2:]), min_size=1, max_size=2))]
            elif how == "sign":  # two negative dimensions keep the product, so only the sign check can object
                ints = [d for d in shape if type(d) is int]  # earlier mutations may have left other types
                shape = [-d for d in ints[:2]] + ints[2:] if len(ints) >= 2 else [*shape, -1, -1]
            elif how == "retype":  # the same value as another JSON type (true is 1 to Python, 4.0 == 4)
                i = draw(st.integers(0, len(shape)))
                if i == len(shape) or type(shape[i]) is not int:
                    shape.append(True)
                else:
                    shape[i] = draw(st.sampled_from(retypes(shape[i])))(shape[i])
            e.fields["shape"] = draw(junk) if how == "junk" else json.dumps(shape)
        elif kind == "offsets":
            # earlier mutations may have written anything there: start from the integers, if any
            begin, end = [o if type(o) is int else 0 for o in (json_list(e.fields["data_offsets"]) + [0, 0])[:2]]
            how = draw(st.sampled_from(["begin", "end", "shift", "swap", "huge", "retype", "junk"]))
            if how == "begin":
                begin = draw(numbers)
            elif how == "end":
                end = draw(numbers)
            elif how == "shift":
                delta = draw(st.integers(-9, 9))
                begin, end = begin + delta, end + delta
            elif how == "swap":
                begin, end = end, begin
            elif how == "huge":
                begin, end = draw(numbers), draw(numbers)
            elif how == "retype":
                begin = draw(st.sampled_from(retypes(begin)))(begin)
                end = draw(st.sampled_from(retypes(end)))(end)
            e.fields["data_offsets"] = draw(junk) if how == "junk" else json.dumps([begin, end])
        elif kind == "overlap":  # another tensor's span, so two entries share bytes
            e.fields["data_offsets"] = draw(st.sampled_from(d.entries)).fields["data_offsets"]
        elif kind == "layout":
            # gaps and overlaps while every span still fits its shape and the data ends with the last tensor:
            # nothing but the tiling check can object
            spans = []
            for x in d.entries:
                offsets = json_list(x.fields["data_offsets"])
                if len(offsets) == 2 and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1] <= len(
                        d.data):  # spans an earlier mutation made absurd stay absurd
                    spans.append((offsets[0], offsets[1], x))
            if spans:
                # one defect: tensor j starts a few bytes early (overlap) or late (gap); the rest follow it
                j, delta = draw(st.integers(0, len(spans) - 1)), draw(st.sampled_from([-4, -1, 1, 4]))
                pos = 0
                for k, (begin, end, x) in enumerate(sorted(spans, key=lambda s: s[:2])):
                    new_begin = max(0, pos + (delta if k == j else 0))
                    x.fields["data_offsets"] = json.dumps([new_begin, new_begin + end - begin])
                    pos = new_begin + end - begin
                d.data = (d.data + bytes(pos))[:pos]
        elif kind == "field":
            e.fields[draw(st.sampled_from(["x", "dtype", "shape", "data_offsets", "é"]))] = draw(junk)
        elif kind == "duplicate":
            twin = Entry(e.name, dict(draw(st.sampled_from(d.entries)).fields), escaped=draw(st.booleans()))
            d.entries.insert(draw(st.integers(0, len(d.entries))), twin)
        elif kind == "name":
            how = draw(st.sampled_from(["text", "metadata", "surrogate"]))
            if how == "surrogate":
                e.raw_name = '"\\ud800x"'
            else:
                e.name = "__metadata__" if how == "metadata" else draw(st.text(st.characters(codec="utf-8"), max_size=8))
        elif kind == "metadata":
            d.metadata = draw(metadata_values)
        elif kind == "data":
            k = draw(st.integers(1, 9))
            d.data = d.data + draw(st.binary(min_size=k, max_size=k)) if draw(st.booleans()) else d.data[:-k]
        elif kind == "length":
            if draw(st.booleans()):
                d.length_delta = draw(st.integers(-16, 16))
            else:
                d.length = draw(st.one_of(st.sampled_from([0, 1, 2**63, 2**64 - 1] + ABSURD_INTS[-2:]),
                                          st.integers(0, 2**64 - 1)))
        elif kind == "padding":
            d.padding = draw(st.sampled_from([" " * 8, "\n\t\r ", "\0", "x", "}", ",", "{}", "\ufeff"]))
    return d


# --------------------------------------------------------------------------------------------------------------------
# the driver: open, read everything, measure, and compare with the reference


class Scratch:
    """A fresh file per example. A file is never rewritten in place: shrinking a file under a live private mapping
    (tensors from the previous example may still be views of it) turns the next page access into SIGBUS."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def write(self, data: bytes) -> Path:
        self.count += 1
        path = self.folder / f"fuzz-{self.count}.safetensors"
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Scratch:
    # module scope: Hypothesis refuses function-scoped fixtures in a @given test (they would not be reset between
    # examples); every example gets its own file name instead
    return Scratch(tmp_path_factory.mktemp("fuzz"))


def note(text: str) -> None:
    """A Hypothesis event (shown by ``--hypothesis-show-statistics``) when inside a property, else nothing."""
    if hypothesis.currently_in_test_context():
        hypothesis.event(text)


def known_crash(exc: BaseException) -> str | None:
    """The known skillhub bug behind a non-CheckpointError exception, if it is one (see the xfail tests).

    None is known now: the three the fuzzer found (a dtype that is an array or object, a number over 4300 digits,
    an empty tensor with an absurd dimension), and a fourth found by differential testing of the streaming parser (a
    byte count over 4300 digits), are fixed and their tests below pass. Pin the next one here."""
    return None


def reference_dialect(data: bytes) -> str | None:
    """Why the reference rejects a header our pre-check accepts, when it is one of the known differences.

    The pre-check reads JSON as Python's ``json`` does, which is laxer than the reference's serde_json (only its
    nesting limit is ours too); each difference is pinned by ``test_b3_headers_the_reference_rejects_are_rejected``.
    """
    (n,) = struct.unpack("<Q", data[:8])
    found: list[str] = []

    def constant(name: str) -> float:
        found.append(f"the JSON constant {name}")
        return float(name.replace("Infinity", "inf"))

    def integer(text: str) -> int:
        if text.startswith("-") and int(text) == 0:
            found.append("-0 as an integer")
        return int(text)

    def real(text: str) -> float:
        if math.isinf(float(text)):
            found.append(f"a number out of float range ({text})")
        return float(text)

    obj = json.loads(data[8:8 + n].decode("utf-8"), parse_constant=constant, parse_int=integer, parse_float=real)

    def walk(value: object) -> None:
        if isinstance(value, str) and re.search("[\ud800-\udfff]", value):
            found.append("a lone surrogate escape")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(obj)
    if isinstance(obj, dict):
        if "__metadata__" in obj and obj["__metadata__"] is not None and not isinstance(obj["__metadata__"], dict):
            found.append("__metadata__ that is not an object")
        for entry in obj.values():
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if isinstance(shape, list) and 0 in shape and math.prod(d for d in shape if d) >= 2**63:
                found.append("an empty tensor whose other dimensions overflow")
    return "known difference: " + found[0] if found else None


def reference_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The reference library's tensors and metadata for ``path``, or ``None`` when it refuses the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference is the oracle here, not the code under test
        try:
            tensors = safetensors.torch.load(path.read_bytes())
            with safetensors.safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
        except Exception:  # SafetensorError, and torch errors on shapes the reference passes through unchecked
            return None
        except BaseException as e:  # a Rust panic surfaces as pyo3's PanicException, a BaseException
            if type(e).__name__ == "PanicException":
                return None
            raise
    return tensors, metadata


@dataclass
class Peak:
    bytes: int = 0


@contextlib.contextmanager
def peak_allocation() -> Iterator[Peak]:
    """The peak traced Python allocation inside the block, above what was allocated before it. Works whether or not
    tracemalloc was already running (``-X tracemalloc``), and leaves it as it was."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    peak = Peak()
    try:
        yield peak
    finally:
        peak.bytes = tracemalloc.get_traced_memory()[1] - before
        if not was_tracing:
            tracemalloc.stop()


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@dataclass
class Verdict:
    """How a file ended: a checkpoint (``error`` is None) or a rejection; ``excused`` names a known bug it hit."""

    error: CheckpointError | None
    excused: str | None = None
    checkpoint: Checkpoint | None = field(default=None, repr=False)


def check_bytes(scratch: Scratch, data: bytes, *, base: Checkpoint | None = None, excuse_known: bool = True
                ) -> Verdict:
    """Open ``data`` through the public entry points, read every tensor, and assert every promise on the way.

    ``base``: also validate the result against this checkpoint (FAULTS B6) when it opens. ``excuse_known=False``
    lets a known bug fail the caller (the xfail tests).
    """
    path = scratch.write(data)
    try:
        return _check(path, data, base, excuse_known)
    finally:
        path.unlink()  # live mappings keep the inode; the folder stays small over thousands of examples


def _check(path: Path, data: bytes, base: Checkpoint | None, excuse_known: bool) -> Verdict:
    size = len(data)
    ck: Checkpoint | None = None
    tensors: dict[str, torch.Tensor] = {}
    by_key: dict[str, torch.Tensor] = {}
    error: CheckpointError | None = None
    crash: Exception | None = None
    with peak_allocation() as peak:
        try:
            ck = open_checkpoint(path)
            tensors = {name: ck.raw_tensor(name) for name in ck.raw_keys()}
            by_key = {key: ck.tensor(key) for key in ck}
        except CheckpointError as e:
            error = e
        except Exception as e:  # anything else is a bug; decided below, after the allocation check
            crash = e
    assert peak.bytes <= size + SLACK, f"opening a {size}-byte file allocated {peak.bytes} bytes"
    if crash is not None:
        known = known_crash(crash) if excuse_known else None
        if known is None:
            raise crash
        note(known)
        return Verdict(None, excused=known)

    reference = reference_load(path)
    if error is not None:
        assert error.path == path, "the error must name the file"
        assert "\n" not in str(error), "the CLI prints an error as one line"
        if reference is not None:
            assert STRICTER_RULES.search(error.message), f"the reference loads this file but we reject it: {error}"
        return Verdict(error)

    assert ck is not None and len(ck.files) == 1
    header = ck.files[0].header
    assert header.file_size == size and list(tensors) == list(header.tensors)
    for name, t in tensors.items():
        info = header.tensors[name]
        assert (t.dtype, tuple(t.shape)) == (info.dtype, info.shape), name
        assert t.untyped_storage().nbytes() <= size, f"tensor {name!r} owns more bytes than the file has"
        assert as_bytes(t) == data[info.start:info.end], name
    assert len(by_key) == len(tensors)
    for key, t in by_key.items():
        assert (t.dtype, tuple(t.shape)) == (ck[key].dtype, ck[key].shape), key

    # the validators: a checkpoint matches itself; the dtype check names the first non-float tensor
    validate_against(ck, ck)
    non_float = [k for k in ck if ck[k].dtype not in FLOAT_DTYPES]
    if non_float:
        with pytest.raises(CheckpointError) as caught:
            check_tensor_dtypes(ck, list(ck))
        assert caught.value.key == non_float[0]
    else:
        check_tensor_dtypes(ck, list(ck))
    if base is not None:
        try:
            validate_against(base, ck)
        except CheckpointError as e:
            assert e.path == path
        else:
            assert set(ck) == set(base) and all(ck[k].shape == base[k].shape for k in ck)

    if reference is None:
        known = reference_dialect(data) if excuse_known else None
        assert known is not None, "we accepted a file the reference safetensors library rejects"
        note(known)
        return Verdict(None, excused=known, checkpoint=ck)
    ref_tensors, ref_metadata = reference
    assert set(ref_tensors) == set(tensors)
    for name, t in tensors.items():
        r = ref_tensors[name]
        assert (r.dtype, r.shape) == (t.dtype, t.shape) and as_bytes(r) == as_bytes(t), name
    assert ref_metadata == header.metadata
    return Verdict(None, checkpoint=ck)


# --------------------------------------------------------------------------------------------------------------------
# B3: header-size bombs, bad offsets, trailing bytes, shapes and dtypes that disagree with the bytes


@FUZZ
@given(draft=mutated_drafts())
def test_b3_fuzzed_headers_end_in_a_checkpoint_or_a_checkpoint_error(scratch: Scratch, draft: Draft) -> None:
    verdict = check_bytes(scratch, draft.render())
    note("accepted" if verdict.error is None else "rejected")


@FUZZ
@given(draft=mutated_drafts(kinds=tuple(SPAN_MUTATIONS)))
def test_b3_fuzzed_offsets_shapes_and_trailing_bytes_end_in_a_checkpoint_or_a_checkpoint_error(
        scratch: Scratch, draft: Draft) -> None:
    # the same property, the budget spent on the byte-span rules alone: overlaps, gaps, out-of-range offsets,
    # trailing or missing bytes, and shapes whose product disagrees with the span (or agrees only by a trick)
    verdict = check_bytes(scratch, draft.render())
    note("accepted" if verdict.error is None else "rejected")


@FUZZ
@given(draft=mutated_drafts(kinds=tuple(FRAME_MUTATIONS)))
def test_b3_fuzzed_metadata_names_and_length_prefixes_end_in_a_checkpoint_or_a_checkpoint_error(
        scratch: Scratch, draft: Draft) -> None:
    # and on the frame: __metadata__ variants, non-ASCII and escaped names, stray fields, length-prefix lies, padding
    verdict = check_bytes(scratch, draft.render())
    note("accepted" if verdict.error is None else "rejected")


@st.composite
def retyped_drafts(draw: st.DrawFn) -> tuple[Draft, str, str]:
    """``(draft, name, field)``: a valid draft where one number of one entry's shape or data_offsets is spelled as
    another JSON type with the same value (``4.0``, ``"4"``, ``true`` for 1), or the shape gains two dimensions of
    -1: the byte count still matches, so only the type and sign checks stand between it and torch (where
    ``True == 1``, ``4.0 == 4`` and a -1 dimension is "infer this one")."""
    d = draw(drafts(min_tensors=1))
    e = draw(st.sampled_from(d.entries))
    name = draw(st.sampled_from(["shape", "data_offsets", "negative shape"]))
    if name == "negative shape":  # two dimensions of -1 leave the product alone: only the sign check objects
        e.fields["shape"] = json.dumps([*json.loads(e.fields["shape"]), -1, -1])
        return d, e.name, "shape"
    values = json.loads(e.fields[name])
    i = draw(st.integers(0, len(values)))
    if i == len(values):
        if name == "data_offsets":
            i = 0
        else:
            values.append(1)  # a trailing dimension of 1 leaves the product alone
    values[i] = draw(st.sampled_from(retypes(values[i])))(values[i])
    e.fields[name] = json.dumps(values)
    return d, e.name, name


@FUZZ
@given(case=retyped_drafts())
def test_b3_fuzzed_numbers_of_another_type_or_sign_are_rejected_by_name(
        scratch: Scratch, case: tuple[Draft, str, str]) -> None:
    draft, name, field_name = case
    verdict = check_bytes(scratch, draft.render())
    assert verdict.error is not None, "a shape or offset that is not a non-negative integer must not open"
    assert verdict.error.key == name and field_name in verdict.error.message, verdict.error


@st.composite
def valid_files(draw: st.DrawFn) -> bytes:
    """A valid file from skillhub's writer (aligned, space-padded), the reference writer, or a draft as it is
    (data in another order than the header, unaligned, names escaped)."""
    d = draw(drafts())
    tensors = {}
    for e in d.entries:
        begin, end = json.loads(e.fields["data_offsets"])
        dtype = DTYPES[json.loads(e.fields["dtype"])]
        shape = json.loads(e.fields["shape"])
        chunk = bytearray(d.data[begin:end])
        tensors[e.name] = (torch.frombuffer(chunk, dtype=dtype).reshape(shape) if chunk
                           else torch.empty(shape, dtype=dtype))
    metadata = json.loads(d.metadata or "null")
    writer = draw(st.sampled_from(["skillhub", "reference", "draft"]))
    if writer == "skillhub":
        prefix, order, _ = safetensors_header(tensors, metadata or {})
        return prefix + b"".join(as_bytes(tensors[k]) for k in order)
    if writer == "reference":
        # `or None`: safetensors 0.8.0 writes the invalid header `{},"__metadata__":{}}` for no tensors and {}
        return safetensors.torch.save(tensors, metadata=metadata or None)
    return d.render()


@st.composite
def byte_mutations(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """``(valid, mutated)``: a valid file and the same bytes after a few raw edits."""
    valid = draw(valid_files())
    data = bytearray(valid)
    (n,) = struct.unpack("<Q", valid[:8])
    digits = [i for i in range(8, 8 + n) if 0x30 <= valid[i] <= 0x39]
    for _ in range(draw(st.integers(1, 3))):
        # most edits land in the header, where the parser lives; data edits only change values
        pos = draw(st.one_of(st.integers(0, 7), st.integers(8, 8 + n), st.integers(8 + n, len(valid))))
        pos = min(pos, len(data))
        kind = draw(st.sampled_from(["flip", "set", "digit", "truncate", "insert", "delete", "length"]))
        if kind == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and pos < len(data):
            data[pos] = draw(st.sampled_from([0, 0x22, 0x2C, 0x30, 0x5B, 0x5D, 0x7B, 0x7D, 0x80, 0xFF]))
        elif kind == "digit" and digits:  # keeps the JSON valid: a shape or offset changes, which only we can judge
            at = draw(st.sampled_from(digits))
            if at < len(data):
                data[at] = draw(st.sampled_from(b"0123456789"))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.one_of(st.binary(min_size=1, max_size=16),
                                           st.sampled_from([b'"', b",", b"-", b"0", b"9" * 20, b"]", b"}", b"\\",
                                                            b"\xc3"])))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif kind == "length" and len(data) >= 8:
            new = draw(st.one_of(st.integers(-16, 16).map(lambda d: max(0, n + d)),
                                 st.sampled_from([0, len(data) - 8, 2**63, 2**64 - 1, MAX_HEADER_BYTES + 1])))
            data[:8] = struct.pack("<Q", new)
    return valid, bytes(data)


@FUZZ
@given(files=byte_mutations())
def test_b3_mutated_bytes_of_a_valid_file_end_in_a_checkpoint_or_a_checkpoint_error(
        scratch: Scratch, files: tuple[bytes, bytes]) -> None:
    valid, mutated = files
    seed = check_bytes(scratch, valid)
    assert seed.error is None and seed.checkpoint is not None, "the unmutated file must open"
    verdict = check_bytes(scratch, mutated, base=seed.checkpoint)
    note("accepted" if verdict.error is None else "rejected")


def _file(header: str | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _f32(shape: list[int], begin: int, end: int) -> str:
    return json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}})


ABSURD_FILES = {
    # (bytes, a word the rejection must use, or None when the file is legitimately accepted)
    "length prefix 2**63": (_file(_f32([1], 0, 4), bytes(4), length=2**63), "cap"),
    "length prefix 2**64-1": (_file(_f32([1], 0, 4), bytes(4), length=2**64 - 1), "cap"),
    "length prefix one byte over the cap": (_file(_f32([1], 0, 4), bytes(4), length=MAX_HEADER_BYTES + 1), "cap"),
    "length prefix at the cap, tiny file": (_file(_f32([1], 0, 4), bytes(4), length=MAX_HEADER_BYTES), "truncated"),
    "shape [2**40, 2**40] over 4 bytes": (_file(_f32([2**40, 2**40], 0, 4), bytes(4)), "needs"),
    "shape [2**40, 2**40] claiming all its bytes": (_file(_f32([2**40, 2**40], 0, 2**82), bytes(4)), "outside"),
    "offsets [0, 2**63]": (_file(_f32([2**61], 0, 2**63), bytes(4)), "outside"),
    "offsets wrapping past 2**64": (_file(_f32([1], 2**64 - 2, 2**64 + 2), bytes(4)), "outside"),
    "shape product 2**128 of 1-byte elements": (_file(json.dumps(
        {"w": {"dtype": "U8", "shape": [2**64, 2**64], "data_offsets": [0, 1]}}), bytes(1)), "needs"),
    # legal: an empty tensor needs no bytes however large its other dimension; reading it must not allocate either
    "empty tensor [0, 2**40]": (_file(_f32([0, 2**40], 0, 0)), None),
}


@pytest.mark.parametrize("case", list(ABSURD_FILES))
def test_b3_absurd_declarations_allocate_nothing(scratch: Scratch, case: str) -> None:
    data, word = ABSURD_FILES[case]
    verdict = check_bytes(scratch, data, excuse_known=False)  # asserts the allocation bound on the way
    if word is None:
        assert verdict.error is None
    else:
        assert verdict.error is not None and word in verdict.error.message, verdict


# --------------------------------------------------------------------------------------------------------------------
# B4: duplicate names, written raw (json.dumps cannot), including the same name spelled with escapes


@st.composite
def drafts_with_duplicates(draw: st.DrawFn) -> tuple[Draft, set[str]]:
    d = draw(drafts(min_tensors=1, max_tensors=3))
    names: set[str] = set()
    for _ in range(draw(st.integers(1, 3))):
        original = draw(st.sampled_from(d.entries))
        # the twin is either an exact copy (the reference silently keeps one) or another tensor's entry
        twin = Entry(original.name, dict(draw(st.sampled_from(d.entries)).fields), escaped=draw(st.booleans()))
        d.entries.insert(draw(st.integers(0, len(d.entries))), twin)
        names.add(original.name)
    return d, names


@FUZZ
@given(case=drafts_with_duplicates())
def test_b4_fuzzed_duplicate_names_are_always_rejected(scratch: Scratch, case: tuple[Draft, set[str]]) -> None:
    draft, names = case
    verdict = check_bytes(scratch, draft.render())
    assert verdict.error is not None, "a duplicate name must never open"
    assert verdict.error.message.startswith("duplicate tensor name ")
    assert any(repr(n) in verdict.error.message for n in names), (names, verdict.error.message)


# --------------------------------------------------------------------------------------------------------------------
# B5: dtypes, every code the reference knows plus near misses and non-strings


#: dtype fields that are not codes at all (no duplicate keys here: those are B4's, and would be reported first).
not_codes = st.one_of(st.sampled_from(["null", "true", "0", "-0", "1.0", "NaN", "[]", "{}", '["F32"]', '{"F32":4}']),
                      numbers.map(str))


def declared_code(value: str) -> str | None:
    """The dtype code a raw ``dtype`` field declares, or ``None`` when it is not a string."""
    parsed = json.loads(value)
    return parsed if isinstance(parsed, str) else None


@FUZZ
@given(draft=drafts(codes=st.sampled_from([*sorted(REFERENCE_BITS), "f32", "float32", "F32 ", "", "Q4_K", "I128"])),
       odd=st.lists(st.tuples(st.integers(0, 3), not_codes), max_size=2))
def test_b5_fuzzed_dtypes_are_read_as_declared_or_rejected_by_name(
        scratch: Scratch, draft: Draft, odd: list[tuple[int, str]]) -> None:
    for i, value in odd:
        if draft.entries:
            draft.entries[i % len(draft.entries)].fields["dtype"] = value
    verdict = check_bytes(scratch, draft.render())  # accepted tensors are checked against the reference in there
    # NaN and -0 are not JSON to serde_json, so not to the pre-check either: the whole header is refused.
    if any(e.fields["dtype"] in ("NaN", "-0") for e in draft.entries):
        assert verdict.error is not None and re.search("not valid JSON|as -0", verdict.error.message), verdict
        return
    bad = [(e.name, code) for e in draft.entries if (code := declared_code(e.fields["dtype"])) not in DTYPES]
    if not bad:
        assert verdict.error is None, verdict
        note("accepted")
        return
    # entries are checked in header order: the first bad one is named, with its dtype
    name, code = bad[0]
    assert verdict.error is not None and verdict.error.key == name, (bad, verdict)
    if code in UNSUPPORTED_DTYPES:
        assert f"unsupported dtype {code}" in verdict.error.message and verdict.error.hint
    else:
        assert "unknown dtype" in verdict.error.message
    note(f"rejected: {'unsupported' if code in UNSUPPORTED_DTYPES else 'unknown'} dtype")


# --------------------------------------------------------------------------------------------------------------------
# known bugs, each reproduced by minimal bytes; strict: a fix turns these red until the marker is removed


def test_b3_a_json_number_over_4300_digits_is_a_checkpoint_error(scratch: Scratch) -> None:
    verdict = check_bytes(scratch, _file(b"1" * 4301), excuse_known=False)
    assert verdict.error is not None


@pytest.mark.parametrize("dtype", ["[]", "{}"])
def test_b5_a_dtype_that_is_an_array_or_object_is_a_checkpoint_error(scratch: Scratch, dtype: str) -> None:
    header = '{"w":{"dtype":%s,"shape":[],"data_offsets":[0,0]}}' % dtype
    verdict = check_bytes(scratch, _file(header), excuse_known=False)
    assert verdict.error is not None and verdict.error.key == "w"


@pytest.mark.parametrize("shape", [[0, 2**63], [2**41, 2**41, 0]])
def test_b3_an_empty_tensor_with_an_absurd_dimension_is_rejected_or_read(scratch: Scratch, shape: list[int]) -> None:
    check_bytes(scratch, _file(_f32(shape, 0, 0)), excuse_known=False)


def test_b3_a_byte_count_over_4300_digits_is_a_checkpoint_error(scratch: Scratch) -> None:
    # the shape's product needs more digits than str() will write: the message itself used to raise ValueError
    big = "9" * 4300
    header = f'{{"w":{{"dtype":"U8","shape":[{big},{big}],"data_offsets":[0,1]}}}}'
    verdict = check_bytes(scratch, _file(header, bytes(1)), excuse_known=False)
    assert verdict.error is not None and verdict.error.key == "w" and "needs" in verdict.error.message


F32_ENTRY = '"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]'


def _nested(depth: int) -> str:
    """A header whose deepest container sits at ``depth``, the header object being depth 1 (as serde_json counts)."""
    return "{" + F32_ENTRY + ',"x":' + "[" * (depth - 2) + "]" * (depth - 2) + "}}"


@pytest.mark.parametrize("header", [
    pytest.param('{"__metadata__":0,' + F32_ENTRY + "}}", id="metadata 0"),
    pytest.param('{"__metadata__":[],' + F32_ENTRY + "}}", id="metadata []"),
    pytest.param('{"__metadata__":"",' + F32_ENTRY + "}}", id="metadata empty string"),
    # a name that cannot even be encoded as UTF-8 again (logs, the registry, a rewritten header)
    pytest.param('{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', id="lone surrogate name"),
    pytest.param("{" + F32_ENTRY + ',"x":NaN}}', id="NaN in a stray field"),
    pytest.param("{" + F32_ENTRY + ',"x":1E400}}', id="1E400 in a stray field"),
    pytest.param('{"w":{"dtype":"F32","shape":[-0,1],"data_offsets":[0,0]}}', id="-0 as a dimension"),
    pytest.param(_nested(128), id="nesting 128 deep"),
    pytest.param(_nested(200), id="nesting 200 deep"),
    pytest.param('{"__metadata__":{"a":' + "[" * 200 + "]" * 200 + "}," + F32_ENTRY + "}}", id="nested metadata"),
])
def test_b3_headers_the_reference_rejects_are_rejected(scratch: Scratch, header: str) -> None:
    data = _file(header, bytes(4) if '"data_offsets":[0,4]' in header else b"")
    path = scratch.write(data)
    loaded = reference_load(path)
    path.unlink()
    if loaded is not None:  # not an AssertionError: that would count as the expected failure
        pytest.fail("the premise is wrong: the reference loads this header")
    verdict = check_bytes(scratch, data, excuse_known=False)
    assert verdict.error is not None


def test_b3_nesting_is_accepted_up_to_the_reference_limit(scratch: Scratch) -> None:
    # serde_json refuses the 128th level; everything shallower reads, in a field nobody looks at (a stray field)
    verdict = check_bytes(scratch, _file(_nested(127), bytes(4)), excuse_known=False)
    assert verdict.error is None and verdict.excused is None


def _tiny_entries(count: int) -> bytes:
    return _file("{" + ",".join(f'"{i:x}":{{}}' for i in range(count)) + "}")


#: header bombs: many tiny JSON values, one shape each; Python's json built any of them whole (~10-25x its size) before
#: a check, so each file is large enough (~0.3-1 MiB) for the factor to beat the slack. (bytes, keywords, the rejection)
TINY_VALUES: dict[str, tuple[bytes, dict[str, int], str]] = {
    "tensor entries over the tensor cap": (_tiny_entries(30_000), {"max_tensors": 1000}, "more than 1000 tensors"),
    "tensor entries under the tensor cap": (_tiny_entries(100_000), {}, "unknown dtype None"),
    "entries that are not objects": (_file("{" + ",".join(f'"{i:x}":0' for i in range(100_000)) + "}"), {},
                                     "is not an object"),
    "metadata keys": (_file('{"__metadata__":{' + ",".join(f'"{i:x}":""' for i in range(30_000)) + "}}"), {},
                      "__metadata__ holds more than"),
    "values in a stray field": (_file("{" + F32_ENTRY + ',"x":[' + ",".join(["[]"] * 100_000) + "]}}", bytes(4)), {},
                                "'w' holds more than"),
    "dimensions of a shape": (_file('{"w":{"dtype":"F32","shape":[' + ",".join(["1"] * 200_000) + '],"data_offsets":'
                                    "[0,4]}}", bytes(4)), {}, "'w' holds more than"),
    "a header that is one array": (_file("[" + ",".join(["{}"] * 100_000) + "]"), {}, "not a JSON object"),
}


@pytest.mark.parametrize("case", list(TINY_VALUES))
def test_b3_a_header_of_many_tiny_values_allocates_no_more_than_the_file(tmp_path: Path, case: str) -> None:
    data, kw, rejection = TINY_VALUES[case]
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    error: CheckpointError | None = None
    with peak_allocation() as peak:
        try:
            read_header(path, **kw)
        except CheckpointError as e:
            error = e
    assert peak.bytes <= len(data) + SLACK, f"read_header allocated {peak.bytes} bytes for a {len(data)}-byte file"
    assert error is not None and rejection in error.message, error

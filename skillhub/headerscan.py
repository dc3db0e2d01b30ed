"""The bounded streaming JSON scanner of a safetensors header (FAULTS B3).

Python's ``json`` built the whole header before any check, ~25x its size in Python objects for a header of many tiny
values (100 MiB of tiny metadata keys: ~2.5 GB), and nested ~1000 levels deep where the reference (serde_json) stops
at 127. So this scanner reads the header's bytes one top-level pair at a time: a tensor entry becomes its
:class:`TensorInfo` at once and nothing else of it is kept, and an entry as writers lay it out is read by one regular
expression, at C speed. Caps that no real checkpoint reaches refuse a header bomb the moment it crosses them:

* ``max_tensors`` (:data:`skillhub.header.MAX_TENSORS`, 200 000) tensor entries, and as many JSON objects in all;
* :data:`MAX_METADATA_VALUES` (1 024) values in ``__metadata__``: transformers, diffusers and mergekit write a
  handful, kohya's sd-scripts about a hundred;
* :data:`MAX_ENTRY_VALUES` (1 024) JSON values in one tensor entry, nested ones included: a real one holds ~10;
* :data:`MAX_GENERIC_VALUES` (65 536) JSON values outside plain tensor entries in all (metadata, stray fields,
  unusual spellings), read at Python speed: this bounds the time a hostile header takes;
* :data:`MAX_DEPTH` (127) levels of nesting: the reference refuses the 128th, so this one is no stricter.

The Python heap a header costs: its bytes once; each name and metadata string once more (4x at most, for astral
characters); ~300 bytes per tensor (an entry takes 49 bytes of header at least: ~8x a header of empty tensors, the
worst case); one entry's values in flight. Any other header reads exactly as it did through ``json`` with the strict
rules (:class:`_Scanner`) and fails with the same message, but for two headers that fail either way: over the tensor
cap it is always "more than N tensors", said as the cap is crossed; and thousands of entries past a bad one, the bad
one is reported without reading on for a JSON error further down.

torch is imported the first time a dtype is needed (:func:`skillhub.dtypecodes.dtypes`), not with this module: the
config check and the CLI's help never load it. The file itself is opened and checked by
:func:`skillhub.header.read_header`.
"""

from __future__ import annotations

import codecs
import functools
import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from json.decoder import scanstring
from pathlib import Path
from typing import TYPE_CHECKING

from skillhub.dtypecodes import UNSUPPORTED_DTYPES, dtypes
from skillhub.errors import CheckpointError

if TYPE_CHECKING:
    import torch


@functools.cache
def _by_code() -> dict[bytes, tuple[torch.dtype, int]]:
    return {code.encode(): (dtype, dtype.itemsize) for code, dtype in dtypes().items()}


#: caps of the header parse (see the module docstring).
MAX_METADATA_VALUES = 1024
MAX_ENTRY_VALUES = 1024
MAX_GENERIC_VALUES = 65_536
MAX_DEPTH = 127
#: once an entry is known to be bad the header is lost; the rest is still read for an error that reports first (bad
#: JSON, a duplicate name), holding the names of at most this many more entries; then the bad entry is reported.
_NAMES_AFTER_AN_ERROR = 4096


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives inside a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)



# Possessive quantifiers (*+, ++, {m,n}+) throughout: no backtracking, so no regex stack however long the input.
_WS = rb"[ \t\n\r]*+"  # json's whitespace
_SKIP_WS = re.compile(_WS)
_STR = rb'"(?:[^"\\\x00-\x1f]++|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*+"'  # exactly the strings json's strict mode reads
_STRING = re.compile(_STR)
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*+)(\.[0-9]++)?([eE][-+]?[0-9]++)?")  # json.scanner.NUMBER_RE
_LITERALS = ((b"null", None), (b"true", True), (b"false", False))
_INT = rb"(?:0|[1-9][0-9]{0,18})"  # a plain integer short enough that no json rule applies to it
_SEP, _COLON = _WS + b"," + _WS, _WS + b":" + _WS
_FIELDS = {
    "dtype": rb'"dtype"' + _COLON + rb'"(?P<code>[A-Z0-9_]{1,16})"',
    "shape": rb'"shape"' + _COLON + rb"\[" + _WS + rb"(?P<dims>(?:" + _INT + _SEP + rb"){0,63}+" + _INT + rb")?" + _WS
             + rb"\]",
    "data_offsets": rb'"data_offsets"' + _COLON + rb"\[" + _WS + b"(?P<begin>" + _INT + b")" + _SEP
                    + b"(?P<stop>" + _INT + b")" + _WS + rb"\]",
}
#: the orders of the keys, as tried: the safetensors writers' first, MLX's (sorted keys) second, then the rest
_ORDERS: list[tuple[str, ...]] = [("dtype", "shape", "data_offsets"), ("data_offsets", "dtype", "shape")]
_ORDERS += [order for order in itertools.permutations(_FIELDS) if order not in _ORDERS]
#: a top-level pair as writers lay out a tensor (plain values) and the separator after it, for each order of the keys
_ENTRIES = [re.compile(_WS + b"(?P<key>" + _STR + b")" + _COLON + rb"\{" + _WS + _SEP.join(_FIELDS[k] for k in order)
                       + _WS + rb"\}" + _WS + b"(?P<end>[,}])") for order in _ORDERS]
#: what cannot be written as UTF-8 again: escapes decode surrogate pairs, so any surrogate left is a lone one
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_MALFORMED = "the file is malformed; re-export it"


class _OverCap(CheckpointError):
    """More JSON values than a cap allows."""


class _Scanner:
    """A header read from its bytes exactly as ``json`` read the decoded text with the reference's strict rules
    hooked in (no duplicate keys, no NaN or Infinity, no float that overflows, no ``-0`` integer, at most
    ``max_tensors`` objects besides the header and its metadata): the same error at the same point, raised as the
    same CheckpointError or json exception; and within the caps of the module docstring."""

    def __init__(self, raw: bytes, path: Path, max_tensors: int) -> None:
        self.raw, self.path, self.max_tensors = raw, path, max_tensors
        self.objects = max_tensors + 2  # the JSON objects still allowed: the entries, the metadata, the header
        self.generic = MAX_GENERIC_VALUES  # the values still allowed outside plain tensor entries
        self.left = 0  # the values still allowed in the top-level value being read ...
        self.over, self.over_key = "", ""  # ... and what to say when there are more

    def ws(self, pos: int) -> int:
        return _SKIP_WS.match(self.raw, pos).end()  # type: ignore[union-attr]  # it matches the empty string

    def expect(self, pos: int, char: bytes) -> int:
        """The position after ``char``, which must be at ``pos``, and the whitespace that follows it."""
        if self.raw[pos:pos + 1] != char:
            raise json.JSONDecodeError(f"expecting {char.decode()}", "", pos)
        return self.ws(pos + 1)

    def string(self, pos: int) -> tuple[str, int]:
        m = _STRING.match(self.raw, pos)
        if m is None:
            raise json.JSONDecodeError("expecting a valid string", "", pos)
        return _text(self.raw, pos, m.end())[0], m.end()

    def value(self, pos: int, depth: int) -> tuple[object, int]:
        """The value at ``pos`` (no whitespace before it), a container at nesting ``depth`` if it is one."""
        self.left -= 1
        if self.left < 0:
            raise _OverCap(self.over, path=self.path, key=self.over_key or None)
        raw = self.raw
        c = raw[pos:pos + 1]
        if c == b'"':
            return self.string(pos)
        if c == b"{" or c == b"[":
            if depth > MAX_DEPTH:
                raise CheckpointError(f"header nests deeper than {MAX_DEPTH} levels, which the reference parser "
                                      "refuses: not a safetensors file", path=self.path)
            return self.object(pos, depth) if c == b"{" else self.array(pos, depth)
        if raw.startswith((b"NaN", b"Infinity", b"-Infinity"), pos):
            raise ValueError("not JSON")
        for word, constant in _LITERALS:
            if raw.startswith(word, pos):
                return constant, pos + len(word)
        m = _NUMBER.match(raw, pos)
        if m is None:
            raise json.JSONDecodeError("expecting a value", "", pos)
        if m[1] or m[2]:
            number = float(m[0])
            if not math.isfinite(number):
                raise ValueError("overflows a float")
            return number, m.end()
        if m[0].startswith(b"-0"):
            # Stricter than the reference, which refuses -0 only where it reads a size: no writer emits it anywhere.
            raise CheckpointError("header writes an integer as -0: not written by any safetensors writer",
                                  path=self.path, hint=_MALFORMED)
        return int(m[0]), m.end()  # over 4300 digits: ValueError, as in json

    def object(self, pos: int, depth: int) -> tuple[dict[str, object], int]:
        out: dict[str, object] = {}
        repeated: list[str] = []  # the first repeated key, reported when the object closes (json's object hook)
        pos = self.ws(pos + 1)
        if self.raw[pos:pos + 1] != b"}":
            while True:
                key, pos = self.string(pos)
                value, pos = self.value(self.expect(self.ws(pos), b":"), depth + 1)
                if key in out and not repeated:
                    repeated.append(key)
                out[key] = value
                pos = self.ws(pos)
                if self.raw[pos:pos + 1] != b",":
                    break
                pos = self.ws(pos + 1)
        pos = self.expect(pos, b"}")
        self.close_object(repeated)
        return out, pos

    def array(self, pos: int, depth: int) -> tuple[list[object], int]:
        out: list[object] = []
        pos = self.ws(pos + 1)
        if self.raw[pos:pos + 1] != b"]":
            while True:
                value, pos = self.value(pos, depth + 1)
                out.append(value)
                pos = self.ws(pos)
                if self.raw[pos:pos + 1] != b",":
                    break
                pos = self.ws(pos + 1)
        return out, self.expect(pos, b"]")

    def close_object(self, repeated: Sequence[str] = ()) -> None:
        self.objects -= 1
        if self.objects < 0:
            raise self.too_many()
        if repeated:
            raise CheckpointError(f"duplicate tensor name {repeated[0]!r} in the header", path=self.path,
                                  hint=_MALFORMED)

    def too_many(self) -> CheckpointError:
        return CheckpointError(f"more than {self.max_tensors} tensors in the header, over the cap", path=self.path)

    def top_value(self, pos: int, name: str, depth: int = 2) -> tuple[object, int]:
        """The value of the top-level pair ``name`` (of the header itself at ``depth`` 1), within the caps."""
        cap = MAX_METADATA_VALUES + 1 if name == "__metadata__" else MAX_ENTRY_VALUES
        self.left = start = min(cap, self.generic)
        self.over = (f"header holds more than {MAX_GENERIC_VALUES} JSON values outside plain tensor entries, over "
                     "the cap" if start < cap else
                     f"header __metadata__ holds more than {MAX_METADATA_VALUES} values, over the cap" if
                     name == "__metadata__" else
                     f"header entry {name!r} holds more than {MAX_ENTRY_VALUES} JSON values, over the cap")
        self.over_key = name if start == cap and name != "__metadata__" else ""
        value, pos = self.value(pos, depth)
        self.generic -= start - self.left
        return value, pos

    def header(self, data_start: int, data_len: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        """The tensors and metadata; errors in the order the whole-header parse found them: the JSON's (syntax,
        duplicates, caps) in text order, then ``__metadata__``, lone surrogates, the first bad entry."""
        raw, path = self.raw, self.path
        if not raw.isascii():  # bad UTF-8 anywhere reports first, as when the whole header was decoded up front
            decoder = codecs.getincrementaldecoder("utf-8")()
            for i in range(0, len(raw), 1 << 16):  # in slices: never a decoded copy of the whole header
                decoder.decode(raw[i:i + (1 << 16)])
            decoder.decode(b"", final=True)
        pos = self.ws(0)
        if raw[pos:pos + 1] != b"{":
            try:
                _, pos = self.top_value(pos, "", depth=1)
            except _OverCap:  # not an object, whatever follows
                pos = len(raw)
            if self.ws(pos) != len(raw):
                raise json.JSONDecodeError("extra data", "", pos)
            raise CheckpointError("header is not a JSON object: not a safetensors file", path=path)
        tensors: dict[str, TensorInfo] = {}
        lost: set[str] = set()  # the names after a bad entry: a duplicate among them still reports first
        metadata: object = None
        has_metadata = lone_surrogate = False
        repeated: list[str] = []
        bad: CheckpointError | None = None  # the first bad entry, reported when nothing that reports first is left

        def deferred() -> CheckpointError | None:
            meta = {} if metadata is None else metadata
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                return CheckpointError("header __metadata__ must map strings to strings", path=path)
            if lone_surrogate or any(map(_LONE_SURROGATE.search, (*meta, *meta.values()))):
                return CheckpointError("header holds a name or metadata text that is not valid UTF-8 (a lone "
                                       "surrogate)", path=path, hint=_MALFORMED)
            return bad

        pos = self.ws(pos + 1)
        end = b"}" if raw[pos:pos + 1] == b"}" else b","
        by_code = _by_code()
        pos += end == b"}"
        while end == b",":
            plain = _plain_entry(raw, pos)
            if plain is not None:  # one match, no JSON value built
                name, code, shape, offsets, end, pos = plain
                self.close_object()
                dtype, size = by_code.get(code, (None, 0))
                begin, stop = offsets
                if (bad is None and size and name not in tensors and len(tensors) < self.max_tensors
                        and begin <= stop <= data_len and stop - begin == math.prod(shape) * size
                        and (0 not in shape or math.prod(d for d in shape if d) < 2**63)):
                    # the common case, kept tight: it accepts only what _tensor_info would accept
                    tensors[name] = TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + stop)
                    continue
                fields: tuple[object, object, object] | None = (code.decode(), shape, offsets)
                typed = True
            else:
                name, pos = self.string(self.ws(pos))
                lone_surrogate = lone_surrogate or _LONE_SURROGATE.search(name) is not None
                entry, pos = self.top_value(self.expect(self.ws(pos), b":"), name)
                pos = self.ws(pos)
                end, pos, typed = raw[pos:pos + 1], pos + 1, False
                if end != b"," and end != b"}":
                    raise json.JSONDecodeError("expecting , or }", "", pos - 1)
                fields = ((entry.get("dtype"), entry.get("shape"), entry.get("data_offsets"))
                          if isinstance(entry, dict) else None)
            if name == "__metadata__":
                if has_metadata and not repeated:
                    repeated.append(name)
                has_metadata, metadata = True, entry
            elif name in tensors or name in lost:
                if not repeated:
                    repeated.append(name)
            elif len(tensors) + len(lost) >= self.max_tensors:
                raise self.too_many()  # now, not at the end: names are all there is left to hold
            elif bad is None:
                try:
                    if fields is None:
                        raise CheckpointError(f"header entry {name!r} is not an object", path=path, key=name)
                    tensors[name] = _tensor_info(path, name, *fields, data_start, data_len, typed=typed)
                except CheckpointError as e:
                    bad = e
                    lost.add(name)
            else:
                lost.add(name)
                if len(lost) > _NAMES_AFTER_AN_ERROR:
                    raise deferred() or bad  # the header is lost: hold no name per tiny entry to say exactly why
        self.close_object(repeated)
        if self.ws(pos) != len(raw):
            raise json.JSONDecodeError("extra data", "", pos)
        error = deferred()
        if error is not None:
            raise error
        return tensors, {} if metadata is None else metadata  # type: ignore[return-value]  # deferred() checked it


def _plain_entry(raw: bytes, pos: int) -> tuple[str, bytes, list[int], list[int], bytes, int] | None:
    """The name, dtype code, shape, data_offsets, separator and end of a plain tensor entry at ``pos`` (one match of
    one of ``_ENTRIES``), or ``None`` when the generic path must read the pair, for the exact verdict: the metadata,
    a lone surrogate, anything unusual."""
    for entry in _ENTRIES:
        m = entry.match(raw, pos)
        if m is not None:
            break
    else:
        return None
    code, dims, begin, stop, end = m.group("code", "dims", "begin", "stop", "end")
    name, escaped = _text(raw, *m.span("key"))
    if name == "__metadata__" or escaped and _LONE_SURROGATE.search(name):
        return None
    return name, code, [*map(int, dims.split(b","))] if dims else [], [int(begin), int(stop)], end, m.end()


def _text(raw: bytes, start: int, end: int) -> tuple[str, bool]:
    """The text of the JSON string token ``raw[start:end]`` (quotes included), and whether it had escapes. Decoded
    from a view, so a long string costs its text once, not copies of its bytes too. Escapes go through json's own
    decoder: surrogate pairs join, a lone surrogate stays (and is refused later)."""
    if raw.find(b"\\", start, end) < 0:
        return str(memoryview(raw)[start + 1:end - 1], "utf-8"), False
    return scanstring(str(memoryview(raw)[start:end], "utf-8"), 1)[0], True


def _tensor_info(path: Path, name: str, code: object, shape: object, offsets: object, data_start: int,
                 data_len: int, *, typed: bool = False) -> TensorInfo:
    """The checked entry ``name``; ``typed``: the fast path already knows that shape and offsets are integers."""
    if not isinstance(code, str):
        raise CheckpointError(f"tensor {name!r} has unknown dtype {code!r}", path=path, key=name)
    if code in UNSUPPORTED_DTYPES:
        raise CheckpointError(f"tensor {name!r} has unsupported dtype {code}", path=path, key=name,
                              hint="convert the checkpoint to float32, float16 or bfloat16")
    known = dtypes()
    if code not in known:
        raise CheckpointError(f"tensor {name!r} has unknown dtype {code!r}", path=path, key=name)
    if not (typed or isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                     for d in shape)):
        raise CheckpointError(f"tensor {name!r} has an invalid shape {shape!r}", path=path, key=name)
    assert isinstance(shape, list)
    if 0 in shape and math.prod(d for d in shape if d) >= 2**63:  # empty, yet torch cannot make this shape
        raise CheckpointError(f"tensor {name!r} has an impossible shape {shape!r}", path=path, key=name)
    if not (typed or isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise CheckpointError(f"tensor {name!r} has invalid data_offsets {offsets!r}", path=path, key=name)
    assert isinstance(offsets, list)
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(f"tensor {name!r} has offsets {offsets} outside the {data_len}-byte data section",
                              path=path, key=name)
    want = math.prod(shape) * known[code].itemsize
    if end - begin != want:
        try:
            needs = str(want)
        except ValueError:  # over 4300 digits, which str() refuses (the old parser crashed here)
            needs = "an absurd number of"
        raise CheckpointError(f"tensor {name!r}: shape {shape} of {code} needs {needs} bytes but spans {end - begin}",
                              path=path, key=name)
    return TensorInfo(name, known[code], tuple(shape), data_start + begin, data_start + end)  # positional: 2x faster

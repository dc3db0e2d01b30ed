"""The safetensors format, read and written by our own code: a header is parsed and fully checked *before* anything
is mapped, because the reference parser silently keeps the last of two duplicate names and trusts offsets more than
we want to for files dropped by strangers (FAULTS B1, B3, B4, B10); and the header we write is deterministic, so the
same tensors always give the same bytes (a mask file's sha256 is its content address).

Nothing here reads tensor data: :mod:`skillhub.checkpoint` maps it once the header has passed.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from skillhub.errors import CheckpointError

#: safetensors dtype codes we can read, and their torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
#: codes that exist in the format but that skillhub refuses (FAULTS B5).
UNSUPPORTED_DTYPES = {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "U16", "U32", "U64", "C64"}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16}

#: about the safetensors reference implementation's own header cap (100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSORS = 200_000


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Header:
    """A checked safetensors header."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int


def sniff_not_safetensors(head: bytes) -> str | None:
    """Say what a file is when its first bytes show it is not safetensors at all (FAULTS B1), else ``None``."""
    if not head:
        return "the file is empty (0 bytes): the copy or download did not finish; drop it again"
    if head.startswith(b"version https://git-lfs"):
        return "this is a git-lfs pointer, not the weights: run `git lfs pull` (or fetch the real file) and drop that"
    if head.startswith(b"PK\x03\x04"):
        return ("this is a zip archive (a torch.save .pt/.bin checkpoint?): convert it with `skillhub convert`; "
                "pickles are never opened on the watched path")
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return ("this is a Python pickle (a torch .pt/.bin checkpoint?): convert it with `skillhub convert`; "
                "pickles are never opened on the watched path")
    stripped = head.lstrip()
    if stripped[:1] == b"<":
        return "this is an HTML/XML document (an error page saved by a download?), not a safetensors file"
    if stripped[:1] in (b"{", b"["):
        return "this is a JSON/text file, not a safetensors file"
    if head.startswith(b"\x1f\x8b"):
        return "this is a gzip file: decompress it first"
    return None


def read_header(
    path: str | Path, *, max_header_bytes: int = MAX_HEADER_BYTES, max_tensors: int = MAX_TENSORS
) -> Header:
    """Read and fully check a safetensors header without mapping or allocating the data.

    Checks: the file is safetensors at all; the header size is within the cap and the file; the header is JSON with
    no duplicate names; dtypes are known; every tensor's byte span matches its shape and dtype, lies inside the data,
    and the spans tile the data exactly (no overlap, no gap, no trailing bytes).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            head = f.read(64)
            if len(head) < 8:
                raise CheckpointError(sniff_not_safetensors(head) or
                                      f"the file is too short ({len(head)} bytes) to be safetensors", path=path)
            (n,) = struct.unpack("<Q", head[:8])
            if n > max_header_bytes or 8 + n > st.st_size:
                # Every common impostor (pickle, zip, git-lfs pointer, HTML, JSON) reads as an absurd header size.
                # A real safetensors header starts with '{' right after the size: then it is ours, just broken.
                looks_ours = head[8:9] == b"{"
                raise CheckpointError(
                    (None if looks_ours else sniff_not_safetensors(head))
                    or (f"header claims {n} bytes, over the {max_header_bytes}-byte cap (not safetensors, or a header bomb)"
                        if n > max_header_bytes else
                        f"header claims {n} bytes but the file has only {st.st_size}: truncated or not safetensors"),
                    path=path,
                )
            f.seek(8)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", path=path) from e
    try:
        obj = _StrictJSON(max_tensors).decode(raw.decode("utf-8"))
    except _DuplicateKey as e:
        raise CheckpointError(f"duplicate tensor name {e.args[0]!r} in the header", path=path,
                              hint="the file is malformed; re-export it") from None
    except _NegativeZero:
        # Stricter than the reference, which refuses -0 only where it reads a size: no writer emits it anywhere.
        raise CheckpointError("header writes an integer as -0: not written by any safetensors writer", path=path,
                              hint="the file is malformed; re-export it") from None
    except _TooManyObjects:
        raise CheckpointError(f"more than {max_tensors} tensors in the header, over the cap", path=path) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        # ValueError: a number json will not read (over 4300 digits; NaN, Infinity or an overflowing float, which
        # the reference parser refuses as well).
        raise CheckpointError(f"header is not valid JSON ({type(e).__name__}): not a safetensors file",
                              path=path) from None
    if not isinstance(obj, dict):
        raise CheckpointError("header is not a JSON object: not a safetensors file", path=path)
    meta_raw = obj.pop("__metadata__", None)
    meta_raw = {} if meta_raw is None else meta_raw
    if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
        raise CheckpointError("header __metadata__ must map strings to strings", path=path)
    if not all(_utf8(s) for s in (*obj, *meta_raw, *meta_raw.values())):
        raise CheckpointError("header holds a name or metadata text that is not valid UTF-8 (a lone surrogate)",
                              path=path, hint="the file is malformed; re-export it")
    if len(obj) > max_tensors:
        raise CheckpointError(f"{len(obj)} tensors, over the cap of {max_tensors}", path=path)
    data_start = 8 + n
    data_len = st.st_size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in obj.items():
        info = _tensor_info(path, name, entry, data_start, data_len)
        tensors[name] = info
        spans.append((info.start, info.end, name))
    spans.sort()
    cursor = data_start
    for start, end, name in spans:
        if start < cursor:
            raise CheckpointError(f"tensor {name!r} overlaps the previous tensor's bytes", path=path, key=name)
        if start > cursor:
            raise CheckpointError(f"gap of {start - cursor} bytes before tensor {name!r}", path=path, key=name)
        cursor = end
    if cursor != st.st_size:
        raise CheckpointError(f"{st.st_size - cursor} trailing bytes after the last tensor", path=path)
    return Header(path=path, tensors=tensors, metadata=dict(meta_raw), file_size=st.st_size)


class _DuplicateKey(Exception):
    pass


class _TooManyObjects(Exception):
    pass


class _NegativeZero(Exception):
    pass


class _StrictJSON(json.JSONDecoder):
    """JSON as the reference parser (serde_json) reads a header: no duplicate keys, no NaN/Infinity, no float that
    overflows, no ``-0`` integer; and parsing stops as soon as there are more objects than tensors allowed, so that
    a header of many tiny entries cannot make the parser build ~25× its size in Python objects first."""

    def __init__(self, max_tensors: int) -> None:
        super().__init__(object_pairs_hook=self._pairs, parse_constant=self._constant, parse_float=self._float,
                         parse_int=self._int)
        self._budget = max_tensors + 2  # the entries, the metadata object and the header itself

    def _pairs(self, pairs: list[tuple[str, object]]) -> dict[str, object]:
        self._budget -= 1
        if self._budget < 0:
            raise _TooManyObjects()
        out: dict[str, object] = {}
        for k, v in pairs:
            if k in out:
                raise _DuplicateKey(k)
            out[k] = v
        return out

    @staticmethod
    def _constant(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    @staticmethod
    def _float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{text} overflows a float")
        return value

    @staticmethod
    def _int(text: str) -> int:
        if text.startswith("-0"):
            raise _NegativeZero()
        return int(text)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(f"header entry {name!r} is not an object", path=path, key=name)
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str):
        raise CheckpointError(f"tensor {name!r} has unknown dtype {code!r}", path=path, key=name)
    if code in UNSUPPORTED_DTYPES:
        raise CheckpointError(f"tensor {name!r} has unsupported dtype {code}", path=path, key=name,
                              hint="convert the checkpoint to float32, float16 or bfloat16")
    if code not in DTYPES:
        raise CheckpointError(f"tensor {name!r} has unknown dtype {code!r}", path=path, key=name)
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CheckpointError(f"tensor {name!r} has an invalid shape {shape!r}", path=path, key=name)
    if 0 in shape and math.prod(d for d in shape if d) >= 2**63:  # empty, yet torch cannot make this shape
        raise CheckpointError(f"tensor {name!r} has an impossible shape {shape!r}", path=path, key=name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                    for o in offsets)):
        raise CheckpointError(f"tensor {name!r} has invalid data_offsets {offsets!r}", path=path, key=name)
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(f"tensor {name!r} has offsets {offsets} outside the {data_len}-byte data section",
                              path=path, key=name)
    dtype = DTYPES[code]
    want = math.prod(shape) * dtype.itemsize
    if end - begin != want:
        raise CheckpointError(f"tensor {name!r}: shape {shape} of {code} needs {want} bytes but spans {end - begin}",
                              path=path, key=name)
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=data_start + begin, end=data_start + end)


def safetensors_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[bytes, list[str],
                                                                                                     int]:
    """The 8-byte length prefix plus the JSON header of a safetensors file holding ``tensors``.

    Returns ``(prefix, order, data_bytes)``: the tensors' bytes must follow in ``order`` (largest element size
    first, then by name, so every tensor stays aligned to its element size), ``data_bytes`` in all. The header is
    padded with spaces so the data starts 8-byte aligned, and its bytes are deterministic for the same input. Only
    dtypes and shapes are read: no tensor is copied. Used by :func:`write_safetensors` and by the streamed weights
    download (:mod:`skillhub.wire`), so both produce the same bytes.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in DTYPE_CODES:
            raise CheckpointError(f"cannot serialise dtype {t.dtype}", key=name)
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order, offset

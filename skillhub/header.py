"""The safetensors format, read and written by our own code: a header is parsed and fully checked *before* anything
is mapped, because the reference parser silently keeps the last of two duplicate names and trusts offsets more than
we want to for files dropped by strangers (FAULTS B1, B3, B4, B10); and the header we write is deterministic, so the
same tensors always give the same bytes (a mask file's sha256 is its content address).

Parsing is bounded (FAULTS B3): the header's bytes are read by the streaming scanner of :mod:`skillhub.headerscan`,
one top-level pair at a time, within caps that no real checkpoint reaches; its docstring says what they are and what
a header costs. This module opens the file, sniffs impostors, and checks that the tensors tile the data exactly.

The dtype tables (:mod:`skillhub.dtypecodes`; :data:`DTYPES`, :data:`DTYPE_CODES`, :data:`FLOAT_DTYPES`) are built
on first use, as torch is imported then: code of the package calls :func:`dtypes`, :func:`dtype_codes` and
:func:`float_dtypes`.

Nothing here reads tensor data: :mod:`skillhub.checkpoint` maps it once the header has passed.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skillhub.dtypecodes import UNSUPPORTED_DTYPES, dtype_codes, dtypes, float_dtypes
from skillhub.errors import CheckpointError
from skillhub.headerscan import (
    MAX_DEPTH,
    MAX_ENTRY_VALUES,
    MAX_GENERIC_VALUES,
    MAX_METADATA_VALUES,
    TensorInfo,
    _Scanner,
)

if TYPE_CHECKING:
    import torch

#: (and DTYPES, DTYPE_CODES, FLOAT_DTYPES, built when first read: see ``__getattr__``)
__all__ = [
    "MAX_DEPTH", "MAX_ENTRY_VALUES", "MAX_GENERIC_VALUES", "MAX_HEADER_BYTES", "MAX_METADATA_VALUES", "MAX_TENSORS",
    "UNSUPPORTED_DTYPES", "Header", "TensorInfo", "dtype_codes", "dtypes", "float_dtypes", "read_header",
    "safetensors_header", "sniff_not_safetensors",
]

#: about the safetensors reference implementation's own header cap (100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSORS = 200_000

#: the dtype tables as module attributes, built (and torch imported) when first read: DTYPES, code -> torch dtype;
#: DTYPE_CODES, the reverse; FLOAT_DTYPES, the floating-point ones.
_LAZY = {"DTYPES": dtypes, "DTYPE_CODES": dtype_codes, "FLOAT_DTYPES": float_dtypes}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return _LAZY[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    path: str | Path, *, max_header_bytes: int = MAX_HEADER_BYTES, max_tensors: int = MAX_TENSORS,
    fd: int | None = None,
) -> Header:
    """Read and fully check a safetensors header without mapping or allocating the data.

    Checks: the file is safetensors at all; the header size is within the cap and the file; the header is JSON with
    no duplicate names, within the parse caps; dtypes are known; every tensor's byte span matches its shape and
    dtype, lies inside the data, and the spans tile the data exactly (no overlap, no gap, no trailing bytes). With
    ``fd``, reads that open file from its start (``path`` only names it in errors) instead of opening ``path``.
    """
    path = Path(path)
    try:
        with open(path, "rb") if fd is None else os.fdopen(os.dup(fd), "rb") as f:
            f.seek(0)
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
        tensors, metadata = _Scanner(raw, path, max_tensors).header(8 + n, st.st_size - 8 - n)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        # ValueError: a number json will not read (over 4300 digits; NaN, Infinity or an overflowing float, which
        # the reference parser refuses as well).
        raise CheckpointError(f"header is not valid JSON ({type(e).__name__}): not a safetensors file",
                              path=path) from None
    check_layout(tensors, 8 + n, st.st_size, path)
    return Header(path=path, tensors=tensors, metadata=metadata, file_size=st.st_size)


def check_layout(tensors: Mapping[str, TensorInfo], data_start: int, file_size: int, path: Path) -> None:
    """The tensors' bytes tile the data section exactly: no overlap, no gap, nothing after the last one."""
    cursor = data_start
    for info in sorted(tensors.values(), key=lambda i: (i.start, i.end, i.name)):
        if info.start < cursor:
            raise CheckpointError(f"tensor {info.name!r} overlaps the previous tensor's bytes", path=path,
                                  key=info.name)
        if info.start > cursor:
            raise CheckpointError(f"gap of {info.start - cursor} bytes before tensor {info.name!r}", path=path,
                                  key=info.name)
        cursor = info.end
    if cursor != file_size:
        raise CheckpointError(f"{file_size - cursor} trailing bytes after the last tensor", path=path)


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
    codes = dtype_codes()
    for name in order:
        t = tensors[name]
        if t.dtype not in codes:
            raise CheckpointError(f"cannot serialise dtype {t.dtype}", key=name)
        n = t.numel() * t.element_size()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order, offset

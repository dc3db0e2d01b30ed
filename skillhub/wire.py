"""The safetensors wire format for ``GET /v1/model/weights`` (FAULTS C9): a model version streamed as one file.

The file is built on the fly from a version's tensors: :func:`safetensors_header` computes the header from dtypes
and shapes alone (so the ``Content-Length`` is known up front), then :func:`iter_safetensors` yields the header and
each tensor's bytes, one bounded chunk of at most :data:`CHUNK_BYTES` at a time, whatever the model size. The HTTP
layer (:mod:`skillhub.server`) takes the version once, when the request starts, so a publish during the download
never mixes two versions.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from skillhub.checkpoint import DTYPE_CODES
from skillhub.errors import CheckpointError

if TYPE_CHECKING:
    from skillhub.publish import ModelVersion

#: bytes per chunk of a streamed weights download (bounded memory per download, whatever the model size).
CHUNK_BYTES = 1 << 20


def safetensors_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[bytes, list[str],
                                                                                                     int]:
    """The 8-byte length prefix plus the JSON header of a safetensors file holding ``tensors``.

    Returns ``(prefix, order, data_bytes)``: the tensors must follow in ``order`` (largest element size first, then
    by name, so every tensor stays aligned to its element size; the same order as
    :func:`~skillhub.checkpoint.write_safetensors`), ``data_bytes`` in all. The header is padded with spaces so the
    data starts 8-byte aligned, as the format requires. Only metadata (dtype, shape) is read: no tensor is copied.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
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


def _tensor_chunks(t: torch.Tensor, chunk_bytes: int) -> Iterator[bytes]:
    """One tensor's raw little-endian bytes, ``chunk_bytes`` at a time (at most one tensor is copied, if it is not
    already a contiguous CPU tensor)."""
    if t.numel() == 0:
        return
    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    mv = memoryview(flat.numpy())
    for i in range(0, len(mv), chunk_bytes):
        yield mv[i:i + chunk_bytes].tobytes()


def iter_safetensors(prefix: bytes, order: Sequence[str], tensors: Mapping[str, torch.Tensor],
                     chunk_bytes: int | None = None) -> Iterator[bytes]:
    """The whole file as a sync iterator of chunks (Starlette runs it in its threadpool, off the event loop)."""
    yield prefix
    size = chunk_bytes or CHUNK_BYTES
    for name in order:
        yield from _tensor_chunks(tensors[name], size)


def version_metadata(version: ModelVersion) -> dict[str, str]:
    """The header metadata of a streamed version: its number and its manifest (as JSON)."""
    return {
        "format": "pt",
        "skillhub.version": str(version.number),
        "skillhub.manifest": json.dumps(version.manifest, sort_keys=True, default=str),
    }

"""The safetensors wire format for ``GET /v1/model/weights`` (FAULTS C9): a model version streamed as one file.

The file is built on the fly from a version's tensors: :func:`safetensors_header` computes the header from dtypes
and shapes alone (so the ``Content-Length`` is known up front), then :func:`iter_safetensors` yields the header and
each tensor's bytes, one bounded chunk of at most :data:`CHUNK_BYTES` at a time, whatever the model size. The HTTP
layer (:mod:`skillhub.server`) takes the version once, when the request starts, so a publish during the download
never mixes two versions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from skillhub.header import safetensors_header

__all__ = ["CHUNK_BYTES", "iter_safetensors", "safetensors_header", "version_metadata"]

if TYPE_CHECKING:
    from skillhub.publish import ModelVersion

#: bytes per chunk of a streamed weights download (bounded memory per download, whatever the model size).
CHUNK_BYTES = 1 << 20


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

"""Task vectors and sparse deltas: what one localized skill is.

A task vector is τₜ = θₜ − θ₀ (He et al., arXiv 2408.13656, after Ilharco et al.'s task arithmetic). Localization
keeps a binary mask γₜ over it; a :class:`SparseDelta` is (γₜ, γₜ⊙τₜ) stored sparsely: per included tensor the
sorted flat row-major indices of the mask and τ at those indices. It is all a skill needs once localized; the
finetuned checkpoint can go.

On disk it is the mask file of DESIGN §8 (``*.mask.safetensors``):

- ``KEY::indices``: int32 (int64 when the tensor has more than 2³¹−1 elements), strictly increasing;
- ``KEY::values``: τ at those indices, in the base tensor's dtype;
- header metadata ``skillhub.format`` = ``sparse-delta/1``, ``skillhub.skill``, ``skillhub.base``,
  ``skillhub.source``, ``skillhub.strategy``, ``skillhub.params`` (JSON), ``skillhub.shapes`` (JSON, every included
  tensor, masks empty or not).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from skillhub.checkpoint import TensorFile, write_safetensors
from skillhub.header import DTYPES
from skillhub.errors import CheckpointError

FORMAT = "sparse-delta/1"
INT32_LIMIT = 2**31 - 1


class TensorSource(Protocol):
    """Anything that hands out tensors by key: a :class:`~skillhub.checkpoint.Checkpoint`, or :class:`StateDict`."""

    path: Path | None

    def tensor(self, key: str) -> torch.Tensor: ...


class StateDict:
    """An in-memory ``{key: tensor}`` as a :class:`TensorSource` (for tests, training loops and the Python API)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: Path | None = None) -> None:
        self.tensors = dict(tensors)
        self.path = path

    def tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]


class TaskVector:
    """τ = θₜ − θ₀ over the included tensors, computed lazily one tensor at a time.

    Keys are kept in sorted order: that order is the *canonical order* that tie rules refer to. Values come out in
    ``dtype`` (float32 by default, float64 when asked) whatever the storage dtype, and are checked to be finite
    (FAULTS B8): a NaN or Inf raises :class:`CheckpointError` naming the tensor.
    """

    def __init__(self, base: TensorSource, finetuned: TensorSource, keys: Iterable[str],
                 dtype: torch.dtype = torch.float32) -> None:
        self.base = base
        self.finetuned = finetuned
        self.keys = sorted(keys)
        self.dtype = dtype
        self.shapes = {k: tuple(base.tensor(k).shape) for k in self.keys}
        self.dtypes = {k: base.tensor(k).dtype for k in self.keys}

    @classmethod
    def from_state_dicts(cls, base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                         keys: Iterable[str] | None = None, dtype: torch.dtype = torch.float32) -> TaskVector:
        keys = [k for k in base if base[k].is_floating_point()] if keys is None else keys
        return cls(StateDict(base), StateDict(finetuned), keys, dtype)

    @property
    def numel(self) -> int:
        """Number of included parameters."""
        return sum(math.prod(s) for s in self.shapes.values())

    def tensor(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """τ for one tensor, same shape as the base tensor.

        :param out: a flat workspace of ``self.dtype`` with at least as many elements; τ is written into its head
            and a view of it returned. Reusing one workspace keeps a streaming pass from churning the allocator
            (large transient tensors fragment glibc's heap, and the process would keep a model's worth of RSS).
        """
        f, b = self.finetuned.tensor(key), self.base.tensor(key)
        if out is None:
            t = f.to(self.dtype) - b.to(self.dtype)
        else:
            t = out[: b.numel()].view(b.shape)
            if f.dtype == b.dtype == self.dtype:
                torch.sub(f, b, out=t)
            else:
                t.copy_(f)
                t.sub_(b)
        if t.numel():
            lo, hi = torch.aminmax(t)  # NaN and ±Inf both show up here without a full-size temporary
            if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                raise CheckpointError(f"tensor {key!r} holds NaN or Inf", path=self.finetuned.path, key=key,
                                      hint="the finetune diverged; retrain it or drop another checkpoint")
        return t

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (key, τ), one freshly allocated tensor at a time."""
        for key in self.keys:
            yield key, self.tensor(key)

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (key, τ) through one reused workspace: each τ is only valid until the next step."""
        work = torch.empty(max((math.prod(s) for s in self.shapes.values()), default=0), dtype=self.dtype)
        for key in self.keys:
            yield key, self.tensor(key, out=work)

    def relative_norm(self) -> float:
        """‖τ‖ / ‖θ₀‖ over the included tensors: how far the finetune moved, as a fraction of the model's size
        (a few percent for a finetune; about √2 for an unrelated model of the same shapes). One streaming pass;
        also raises on NaN/Inf like every pass over τ."""
        tau = base = 0.0
        for key, t in self.stream():
            tau += float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
            base += float(torch.linalg.vector_norm(self.base.tensor(key), dtype=torch.float64)) ** 2
        return math.sqrt(tau) / math.sqrt(base) if base > 0 else (math.inf if tau > 0 else 0.0)

    def sparse(self, entries: Mapping[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
               provenance: Provenance | None = None) -> SparseDelta:
        """The :class:`SparseDelta` of this task vector on a mask given per tensor as sorted flat indices, or as
        (indices, τ values) when the strategy already has the values (saves a pass over the tensor)."""
        idx_out: dict[str, torch.Tensor] = {}
        val_out: dict[str, torch.Tensor] = {}
        for key, entry in entries.items():
            idx, vals = entry if isinstance(entry, tuple) else (entry, None)
            if idx.numel() == 0:
                continue
            idx = idx.to(torch.int64)
            if vals is None:
                vals = self.tensor(key).reshape(-1)[idx]
            idx_out[key] = idx.to(index_dtype(math.prod(self.shapes[key])))
            val_out[key] = vals.to(self.dtypes[key])
        return SparseDelta(idx_out, val_out, dict(self.shapes), dict(self.dtypes), provenance or Provenance())


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices unless the tensor is too large for them (DESIGN §8)."""
    return torch.int32 if numel <= INT32_LIMIT else torch.int64


@dataclass(frozen=True)
class Provenance:
    """Where a sparse delta came from: the metadata of its mask file."""

    skill: str = ""
    base: str = ""  # sha256 of the base weights
    source: str = ""  # sha256 of the finetuned checkpoint
    strategy: str = ""
    params: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class SparseDelta:
    """γ⊙τ for one skill: per included tensor, sorted flat indices and the τ values there.

    ``shapes`` names every included tensor (empty masks too), so the delta describes the model it applies to.
    ``dtypes`` is each tensor's base dtype: values are stored in it.
    """

    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    provenance: Provenance = Provenance()

    def __post_init__(self) -> None:
        for key, idx in self.indices.items():
            if key not in self.shapes:
                raise CheckpointError(f"mask for {key!r} but no shape for it", key=key)
            if idx.ndim != 1 or idx.shape != self.values[key].shape:
                raise CheckpointError(f"indices and values of {key!r} differ in shape", key=key)

    @property
    def nnz(self) -> int:
        """Number of masked entries over all tensors."""
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def numel(self) -> int:
        """Number of included parameters (the size of the space the mask lives in)."""
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def density(self) -> float:
        return self.nnz / max(self.numel, 1)

    @property
    def nbytes(self) -> int:
        """Bytes of index and value data (what the mask file holds, less its header)."""
        return sum(i.numel() * i.element_size() + self.values[k].numel() * self.values[k].element_size()
                   for k, i in self.indices.items())

    def fraction_of(self, checkpoint_bytes: int) -> float:
        """Size of this delta's data as a fraction of a checkpoint's size on disk."""
        return self.nbytes / max(checkpoint_bytes, 1)

    def dense(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """γ⊙τ for one tensor as a dense tensor (for tests and small models)."""
        out = torch.zeros(math.prod(self.shapes[key]), dtype=dtype)
        if key in self.indices:
            out[self.indices[key].long()] = self.values[key].to(dtype)
        return out.reshape(self.shapes[key])

    def metadata(self) -> dict[str, str]:
        p = self.provenance
        return {
            "skillhub.format": FORMAT,
            "skillhub.skill": p.skill,
            "skillhub.base": p.base,
            "skillhub.source": p.source,
            "skillhub.strategy": p.strategy,
            "skillhub.params": json.dumps(dict(p.params), sort_keys=True),
            "skillhub.shapes": json.dumps({k: list(v) for k, v in sorted(self.shapes.items())}),
            "skillhub.dtypes": json.dumps({k: str(v).removeprefix("torch.") for k, v in sorted(self.dtypes.items())}),
        }

    def save(self, path: str | Path, *, faultpoint: str | None = None) -> str:
        """Write the mask file atomically; return its sha256 (its content address in the registry)."""
        tensors: dict[str, torch.Tensor] = {}
        for key, idx in self.indices.items():
            if idx.numel() == 0:
                continue
            tensors[f"{key}::indices"] = idx.to(index_dtype(math.prod(self.shapes[key])))
            tensors[f"{key}::values"] = self.values[key].to(self.dtypes[key])
        return write_safetensors(path, tensors, self.metadata(), faultpoint=faultpoint)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> SparseDelta:
        """Read and check a mask file: format tag, shapes, strictly increasing in-range indices."""
        tf = TensorFile(path)
        meta = tf.header.metadata
        if meta.get("skillhub.format") != FORMAT:
            raise CheckpointError(f"not a skillhub mask file (format {meta.get('skillhub.format')!r})", path=path)
        try:
            raw_shapes = json.loads(meta["skillhub.shapes"])
            params = json.loads(meta.get("skillhub.params", "{}"))
            dtype_names = json.loads(meta.get("skillhub.dtypes", "{}"))
            if not (isinstance(raw_shapes, dict) and isinstance(params, dict) and isinstance(dtype_names, dict)):
                raise TypeError("skillhub.shapes, .params and .dtypes must be JSON objects")
            if not all(isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in v) for v in raw_shapes.values()):
                raise TypeError("every shape in skillhub.shapes must be a list of non-negative integers")
            shapes = {k: tuple(v) for k, v in raw_shapes.items()}
            dtypes_known = {str(d).removeprefix("torch."): d for d in DTYPES.values()}
            bad = [n for n in dtype_names.values() if n not in dtypes_known]
            if bad:
                raise TypeError(f"unknown dtype names {bad[:3]}")
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"mask file metadata is malformed ({e})", path=path) from None
        indices: dict[str, torch.Tensor] = {}
        values: dict[str, torch.Tensor] = {}
        dtypes: dict[str, torch.dtype] = {}
        for name in tf.header.tensors:
            key, _, part = name.rpartition("::")
            if part not in ("indices", "values") or key not in shapes:
                raise CheckpointError(f"unexpected tensor {name!r} in mask file", path=path, key=name)
        for key, shape in shapes.items():
            numel = math.prod(shape)
            dtypes[key] = dtypes_known[dtype_names[key]] if key in dtype_names else torch.float32
            has_idx, has_val = f"{key}::indices" in tf.header.tensors, f"{key}::values" in tf.header.tensors
            if has_idx != has_val:
                raise CheckpointError(f"mask file has {'indices' if has_idx else 'values'} for {key!r} but not "
                                      f"{'values' if has_idx else 'indices'}", path=path, key=key)
            if not has_idx:
                continue
            idx = tf.tensor(f"{key}::indices").to(device, copy=True)
            val = tf.tensor(f"{key}::values").to(device, copy=True)
            if idx.dtype not in (torch.int32, torch.int64) or idx.ndim != 1 or val.shape != idx.shape:
                raise CheckpointError(f"bad indices/values for {key!r}", path=path, key=key)
            if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel or bool((idx[1:] <= idx[:-1]).any())):
                raise CheckpointError(f"indices of {key!r} are not strictly increasing within [0, {numel})",
                                      path=path, key=key)
            if key not in dtype_names:
                dtypes[key] = val.dtype
            indices[key], values[key] = idx, val
        prov = Provenance(skill=meta.get("skillhub.skill", ""), base=meta.get("skillhub.base", ""),
                          source=meta.get("skillhub.source", ""), strategy=meta.get("skillhub.strategy", ""),
                          params=params)
        return cls(indices=indices, values=values, shapes=shapes, dtypes=dtypes, provenance=prov)

    def to(self, device: torch.device | str) -> SparseDelta:
        return SparseDelta({k: v.to(device) for k, v in self.indices.items()},
                           {k: v.to(device) for k, v in self.values.items()},
                           self.shapes, self.dtypes, self.provenance)


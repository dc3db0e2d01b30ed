"""Sparse deltas: what one localized skill is.

Localization keeps a binary mask γₜ over a task vector τₜ (:mod:`skillhub.taskvector`); a :class:`SparseDelta` is (γₜ, γₜ⊙τₜ): per included tensor either the sorted flat
row-major indices of the mask and τ at those indices (*sparse*), or one value per entry of the tensor, zero outside
the mask (*dense*, for masks that cover most of a tensor: no index array, and the stitcher adds it with whole-tensor
operations). It is all a skill needs once localized; the finetuned checkpoint can go.

On disk it is the mask file of DESIGN §8 (``*.mask.safetensors``), format ``sparse-delta/1``. Per tensor ``KEY``:

- sparse: ``KEY::indices`` (int32; int64 when the tensor has more than 2³¹−1 elements; strictly increasing) and
  ``KEY::values`` (τ at those indices, in the base tensor's dtype);
- dense: ``KEY::values`` alone, with the tensor's full shape (no ``KEY::indices``): τ at every entry of the mask and
  0 elsewhere, so the mask is the non-zero values. The writer stores a tensor densely when that is no larger than
  indices plus values (a mask over at least half of a float32 tensor, a third of a float16 one; :meth:`encoding`)
  and every masked value is non-zero. Files written before the dense form existed load unchanged.
- header metadata ``skillhub.format`` = ``sparse-delta/1``, ``skillhub.skill``, ``skillhub.base``,
  ``skillhub.source``, ``skillhub.strategy``, ``skillhub.params`` (JSON), ``skillhub.shapes`` (JSON, every included
  tensor, masks empty or not), ``skillhub.dtypes``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from skillhub.checkpoint import TensorFile, write_safetensors
from skillhub.errors import CheckpointError
from skillhub.header import dtypes

if TYPE_CHECKING:
    import torch

FORMAT = "sparse-delta/1"
INT32_LIMIT = 2**31 - 1


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices unless the tensor is too large for them (DESIGN §8)."""
    import torch

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
    """γ⊙τ for one skill, per included tensor in one of two forms.

    - *sparse*: ``indices[key]`` (sorted flat row-major indices of the mask) and ``values[key]`` (τ there);
    - *dense*: ``values[key]`` alone (the key is not in ``indices``), flat, one value per entry of the tensor: τ on
      the mask and 0 elsewhere, so the mask is the non-zero values. No index array exists, not even a lazy one.

    ``shapes`` names every included tensor (empty masks too), so the delta describes the model it applies to.
    ``dtypes`` is each tensor's base dtype: values are stored in it.
    """

    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    provenance: Provenance = Provenance()

    def __post_init__(self) -> None:
        for key in self.indices.keys() | self.values.keys():
            if key not in self.shapes:
                raise CheckpointError(f"mask for {key!r} but no shape for it", key=key)
        for key, idx in self.indices.items():
            if key not in self.values or idx.ndim != 1 or idx.shape != self.values[key].shape:
                raise CheckpointError(f"indices and values of {key!r} differ in shape", key=key)
        for key in self.dense_keys:
            if self.values[key].ndim != 1 or self.values[key].numel() != math.prod(self.shapes[key]):
                raise CheckpointError(f"dense values of {key!r} must hold one value per entry of shape "
                                      f"{list(self.shapes[key])}", key=key)
        object.__setattr__(self, "_nnz", {})  # per-key mask sizes, counted once (a dense one costs a pass)

    @property
    def dense_keys(self) -> list[str]:
        """Keys stored in the dense form (values for every entry, no indices)."""
        return [k for k in self.values if k not in self.indices]

    def is_dense(self, key: str) -> bool:
        return key in self.values and key not in self.indices

    def nnz_of(self, key: str) -> int:
        """Mask size of one tensor (0 when it has no mask)."""
        import torch

        cache: dict[str, int] = self._nnz  # type: ignore[attr-defined]
        if key not in cache:
            if key in self.indices:
                cache[key] = int(self.indices[key].numel())
            else:
                cache[key] = int(torch.count_nonzero(self.values[key])) if key in self.values else 0
        return cache[key]

    @property
    def nnz(self) -> int:
        """Number of masked entries over all tensors."""
        return sum(self.nnz_of(k) for k in self.values)

    @property
    def numel(self) -> int:
        """Number of included parameters (the size of the space the mask lives in)."""
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def density(self) -> float:
        return self.nnz / max(self.numel, 1)

    def flat_indices(self, key: str) -> torch.Tensor:
        """Sorted flat indices of the mask of ``key`` (computed for a dense tensor: for tests and fallbacks)."""
        import torch

        if key in self.indices:
            return self.indices[key]
        if key in self.values:
            return self.values[key].nonzero().reshape(-1)
        return torch.zeros(0, dtype=torch.int64)

    def encoding(self, key: str) -> str:
        """How the mask file stores ``key``: ``"dense"`` when the values of every entry take no more bytes than
        indices plus values and no masked value is 0 (a 0 in the dense form means "not in the mask"), else
        ``"sparse"``. A function of the mask and its values only, so the file bytes are too."""
        dense, sparse = self._sizes(key)
        if dense > sparse or (key in self.indices and bool((self.values[key] == 0).any())):
            return "sparse"
        return "dense"

    def _sizes(self, key: str) -> tuple[int, int]:
        """Bytes of ``key`` in the dense form and in the sparse one."""
        numel, vsize = math.prod(self.shapes[key]), self.dtypes.get(key, self.values[key].dtype).itemsize
        return numel * vsize, self.nnz_of(key) * (index_dtype(numel).itemsize + vsize)

    @property
    def nbytes(self) -> int:
        """Bytes of index and value data (what the mask file holds, less its header)."""
        return sum(self._sizes(k)[self.encoding(k) == "sparse"] for k in self.values)

    def fraction_of(self, checkpoint_bytes: int) -> float:
        """Size of this delta's data as a fraction of a checkpoint's size on disk."""
        return self.nbytes / max(checkpoint_bytes, 1)

    def dense(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """γ⊙τ for one tensor as a dense tensor (for tests and small models); ``dtype``: float32 unless given."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        if self.is_dense(key):
            return self.values[key].to(dtype, copy=True).reshape(self.shapes[key])
        out = torch.zeros(math.prod(self.shapes[key]), dtype=dtype)
        if key in self.indices:
            out[self.indices[key].long()] = self.values[key].to(dtype)
        return out.reshape(self.shapes[key])

    def mask(self, key: str) -> torch.Tensor:
        """γ for one tensor as a bool tensor of its shape."""
        import torch

        if self.is_dense(key):
            return (self.values[key] != 0).reshape(self.shapes[key])
        out = torch.zeros(math.prod(self.shapes[key]), dtype=torch.bool)
        if key in self.indices:
            out[self.indices[key].long()] = True
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
        for key, vals in self.values.items():
            if self.nnz_of(key) == 0:
                continue
            dtype = self.dtypes.get(key, vals.dtype)
            if self.encoding(key) == "dense":
                tensors[f"{key}::values"] = self.dense(key, dtype) if key in self.indices else \
                    vals.to(dtype).reshape(self.shapes[key])
                continue
            idx = self.flat_indices(key)
            if key not in self.indices:
                vals = vals[idx]
            tensors[f"{key}::indices"] = idx.to(index_dtype(math.prod(self.shapes[key])))
            tensors[f"{key}::values"] = vals.to(dtype)
        return write_safetensors(path, tensors, self.metadata(), faultpoint=faultpoint)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> SparseDelta:
        """Read and check a mask file: format tag, shapes, strictly increasing in-range indices, dense values of
        the full shape (:class:`MaskFile`, every tensor at once). A sparse tensor whose indices cover every entry
        loads in the dense form."""
        return MaskFile(path).delta(device=device)

    def to(self, device: torch.device | str) -> SparseDelta:
        """This delta on ``device`` (itself when it is there already, keeping its counted mask sizes)."""
        import torch

        dev = torch.device(device)
        if all(t.device == dev for t in (*self.indices.values(), *self.values.values())):
            return self
        out = SparseDelta({k: v.to(dev) for k, v in self.indices.items()}, {k: v.to(dev) for k, v in self.values.items()},
                          self.shapes, self.dtypes, self.provenance)
        out._nnz.update(self._nnz)  # type: ignore[attr-defined]
        return out


class MaskFile:
    """A mask file opened for reading one tensor at a time (the offline stitch of a big model holds one tensor's
    entries of each mask, not the masks).

    Opening it checks everything the header tells: the format tag, the metadata (shapes, params, dtypes), the tensor
    names, and per tensor the pairing of indices and values and their dtypes and shapes. What only the values tell
    (indices strictly increasing within the tensor) is checked as each tensor is read (:meth:`delta`). Errors are
    :class:`~skillhub.errors.CheckpointError` naming the file and the key.
    """

    def __init__(self, path: str | Path) -> None:
        import torch

        self.path = Path(path)
        self._file = TensorFile(path)
        names, meta = self._file.header.tensors, self._file.header.metadata
        if meta.get("skillhub.format") != FORMAT:
            raise CheckpointError(f"not a skillhub mask file (format {meta.get('skillhub.format')!r})", path=path)
        shapes, params, dtype_names, dtypes_known = _parse_metadata(meta, path)
        for name in names:
            key, _, part = name.rpartition("::")
            if part not in ("indices", "values") or key not in shapes:
                raise CheckpointError(f"unexpected tensor {name!r} in mask file", path=path, key=name)
        #: every included tensor's shape, and its base dtype
        self.shapes = shapes
        self.dtypes: dict[str, torch.dtype] = {}
        #: keys with entries: True when stored sparse (indices and values), False in the dense form
        self.sparse: dict[str, bool] = {}
        for key, shape in shapes.items():
            self.dtypes[key] = dtypes_known[dtype_names[key]] if key in dtype_names else torch.float32
            idx, val = names.get(f"{key}::indices"), names.get(f"{key}::values")
            if idx is not None and val is None:
                raise CheckpointError(f"mask file has indices for {key!r} but not values", path=path, key=key)
            if val is None:
                continue
            if key not in dtype_names:
                self.dtypes[key] = val.dtype
            if idx is None:  # the dense form: one value per entry, in the tensor's own shape
                if tuple(val.shape) != tuple(shape) or not val.dtype.is_floating_point:
                    raise CheckpointError(
                        f"values of {key!r} without indices must be floats of the tensor's full shape {list(shape)}, "
                        f"not {list(val.shape)}", path=path, key=key,
                        hint="a sparse tensor needs KEY::indices next to KEY::values")
            elif idx.dtype not in (torch.int32, torch.int64) or len(idx.shape) != 1 or val.shape != idx.shape:
                raise CheckpointError(f"bad indices/values for {key!r}", path=path, key=key)
            self.sparse[key] = idx is not None
        self.provenance = Provenance(skill=meta.get("skillhub.skill", ""), base=meta.get("skillhub.base", ""),
                                     source=meta.get("skillhub.source", ""),
                                     strategy=meta.get("skillhub.strategy", ""), params=params)

    def delta(self, keys: Iterable[str] | None = None, *, device: torch.device | str = "cpu",
              copy: bool | None = None) -> SparseDelta:
        """The mask's entries of ``keys`` (default: every tensor) as a :class:`SparseDelta` over those tensors,
        their indices checked (strictly increasing within the tensor). A sparse tensor whose indices cover every
        entry with non-zero values comes in the dense form, as files from before the dense form stored it.

        :param copy: copy the arrays out of the file's mapping. By default a file with dense tensors (model-sized)
            stays mapped on the CPU and its arrays are views of the private mapping (mask files are immutable,
            written by rename): no copy, no fresh memory to fault in; sparse-only files, small, are copied, so that
            a service holding many skills does not hold a mapping (and a file descriptor) per skill. ``False``
            keeps views whatever the file holds (give the pages back with :meth:`evict`).
        """
        import torch

        keys = list(self.shapes) if keys is None else list(keys)
        if copy is None:
            copy = all(self.sparse.values())
        copy = copy or torch.device(device).type != "cpu"
        indices: dict[str, torch.Tensor] = {}
        values: dict[str, torch.Tensor] = {}
        for key in keys:
            if key not in self.sparse:
                continue
            numel = math.prod(self.shapes[key])
            val = self._file.tensor(f"{key}::values").to(device, copy=copy)
            if not self.sparse[key]:
                values[key] = val.reshape(-1)
                continue
            idx = self._file.tensor(f"{key}::indices").to(device, copy=copy)
            if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel or bool((idx[1:] <= idx[:-1]).any())):
                raise CheckpointError(f"indices of {key!r} are not strictly increasing within [0, {numel})",
                                      path=self.path, key=key,
                                      hint="the mask file is damaged: localize the skill again")
            if idx.numel() == numel and numel and bool(val.all()):
                values[key] = val  # strictly increasing over every entry: 0..n-1, i.e. dense (files from before it)
                continue
            indices[key], values[key] = idx, val
        return SparseDelta(indices=indices, values=values, shapes={k: self.shapes[k] for k in keys},
                           dtypes={k: self.dtypes[k] for k in keys}, provenance=self.provenance)

    def nnz(self) -> int:
        """Masked entries over all tensors, as :attr:`SparseDelta.nnz` counts them: a sparse tensor's from its
        header, a dense one's by counting its non-zero values (one tensor resident at a time)."""
        import torch

        total = 0
        for key, sparse in self.sparse.items():
            if sparse:
                total += self._file.header.tensors[f"{key}::indices"].numel
                continue
            total += int(torch.count_nonzero(self._file.tensor(f"{key}::values")))
            self.evict(key)
        return total

    def evict(self, key: str | None = None) -> None:
        """Give back the mapped pages of ``key``'s entries (or of the whole file): see :meth:`TensorFile.evict`."""
        if key is None:
            self._file.evict()
            return
        for part in ("indices", "values"):
            if f"{key}::{part}" in self._file.header.tensors:
                self._file.evict(f"{key}::{part}")


def _parse_metadata(meta: Mapping[str, str], path: str | Path
                    ) -> tuple[dict[str, tuple[int, ...]], dict, dict, dict[str, torch.dtype]]:
    """``skillhub.shapes``, ``.params`` and ``.dtypes`` of a mask file, checked."""
    try:
        raw_shapes = json.loads(meta["skillhub.shapes"])
        params = json.loads(meta.get("skillhub.params", "{}"))
        dtype_names = json.loads(meta.get("skillhub.dtypes", "{}"))
        if not (isinstance(raw_shapes, dict) and isinstance(params, dict) and isinstance(dtype_names, dict)):
            raise TypeError("skillhub.shapes, .params and .dtypes must be JSON objects")
        if not all(isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in v) for v in raw_shapes.values()):
            raise TypeError("every shape in skillhub.shapes must be a list of non-negative integers")
        dtypes_known = {str(d).removeprefix("torch."): d for d in dtypes().values()}
        bad = [n for n in dtype_names.values() if n not in dtypes_known]
        if bad:
            raise TypeError(f"unknown dtype names {bad[:3]}")
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"mask file metadata is malformed ({e})", path=path) from None
    return {k: tuple(v) for k, v in raw_shapes.items()}, params, dtype_names, dtypes_known

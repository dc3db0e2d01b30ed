"""Task vectors: τₜ = θₜ − θ₀ (He et al., arXiv 2408.13656, after Ilharco et al.'s task arithmetic), computed
lazily per tensor from two checkpoints, and turned into a :class:`~skillhub.delta.SparseDelta` once a strategy has
chosen its mask."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from skillhub import kernels
from skillhub.delta import Provenance, SparseDelta, index_dtype
from skillhub.errors import CheckpointError

if TYPE_CHECKING:
    import torch


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
                 dtype: torch.dtype | None = None, *, norms: bool = False) -> None:
        import torch

        self.base = base
        self.finetuned = finetuned
        self.keys = sorted(keys)
        self.dtype = torch.float32 if dtype is None else dtype
        self.shapes = {k: tuple(base.tensor(k).shape) for k in self.keys}
        self.dtypes = {k: base.tensor(k).dtype for k in self.keys}
        #: ‖τ‖² per tensor (float64), recorded by every computation of a whole τ (:meth:`tensor`, :meth:`record`)
        #: when ``norms`` is set (someone will ask :meth:`relative_norm`); else a cheaper min/max finiteness check
        self.squares: dict[str, float] = {}
        self.norms = norms
        self._parts: dict[str, Any] = {}  # ‖τ‖² so far of a tensor read in pieces: a float, or kernels' lanes

    @classmethod
    def from_state_dicts(cls, base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                         keys: Iterable[str] | None = None, dtype: torch.dtype | None = None) -> TaskVector:
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
        import torch

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
        self.record(key, t)
        return t

    def record(self, key: str, t: torch.Tensor, *, part: bool = False, buf: Any = None) -> None:
        """Check τ of ``key`` (or, with ``part``, the next piece of it, for a strategy that computes τ in pieces) for
        NaN/Inf (FAULTS B8: :class:`CheckpointError` naming the tensor) and record its ‖τ‖² in :attr:`squares`,
        so the distance check (FAULTS B7, B9) needs no pass of its own over tensors a strategy computed. The sum
        of squares is the finiteness check: a NaN or ±Inf anywhere makes it non-finite. ``buf``: a float64
        workspace for :func:`sum_of_squares`. Pieces must be multiples of :data:`SQUARES_DOT` long (but the last),
        so that ‖τ‖² comes out the same float as from the whole tensor."""
        import torch

        if not self.norms:  # NaN and ±Inf both show up in a min/max reduction, without a full-size temporary
            if t.numel():
                lo, hi = torch.aminmax(t.reshape(-1))
                if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                    raise self._nonfinite(key)
            return
        state = self._parts.get(key) if part else None
        if state is None:  # a fresh sum: the compiled lanes where they take τ (the float a scan gives), else float64
            lanes = kernels.lanes(t)
            state = 0.0 if lanes is None else lanes
        if isinstance(state, float):
            state = sq = sum_of_squares(t, buf, state)
        else:
            kernels.add_squares(t, state)
            sq = kernels.total(state)
        if not math.isfinite(sq):
            lo, hi = torch.aminmax(t.reshape(-1))
            if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                raise self._nonfinite(key)
        if part:
            self._parts[key] = state
        else:
            self.squares[key] = sq

    def record_squares(self, key: str, sq: float) -> None:
        """A pass of a strategy's own (a compiled kernel's) computed ‖τ‖² of ``key`` as it read τ: check it as
        :meth:`record` checks τ (non-finite means τ holds NaN or ±Inf: float64 sums of float32 squares do not
        overflow) and record it when norms are wanted."""
        if not math.isfinite(sq):
            raise self._nonfinite(key)
        if self.norms:
            self.squares[key] = sq

    def _nonfinite(self, key: str) -> CheckpointError:
        return CheckpointError(f"tensor {key!r} holds NaN or Inf", path=self.finetuned.path, key=key,
                               hint="the finetune diverged; retrain it or drop another checkpoint")

    def finish(self, key: str) -> None:
        """All pieces of ``key`` were given to :meth:`record` (with ``part``), in order: its ‖τ‖² is their sum."""
        if self.norms:
            state = self._parts.pop(key, 0.0)
            self.squares[key] = state if isinstance(state, float) else kernels.total(state)

    def pieces(self, key: str, work: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """τ of one tensor, flat, in consecutive pieces of at most ``work.numel()`` entries written into ``work``:
        (offset, piece), each valid until the next step. Each piece is checked and counted as :meth:`tensor` does
        (NaN/Inf raise; ‖τ‖² is recorded once the last piece is out). A workspace of a few hundred kB keeps τ and
        whatever a strategy derives from a piece in the CPU cache, where whole tensors stream through memory."""
        import numpy as np

        f, b = self.finetuned.tensor(key).detach().reshape(-1), self.base.tensor(key).detach().reshape(-1)
        n, size = b.numel(), work.numel()
        same = f.dtype == b.dtype == self.dtype == work.dtype and f.device.type == b.device.type == "cpu"
        if same:
            fa, ba, wa = f.numpy(), b.numpy(), work.numpy()
        if size % SQUARES_DOT and size < n:
            raise ValueError(f"pieces of {size} entries: use a multiple of {SQUARES_DOT}")
        buf = np.empty(min(n, size, SQUARES_CHUNK), dtype=np.float64) if self.norms else None
        self._parts.pop(key, None)  # a fresh sum: the first piece starts it
        for start in range(0, n, size):
            m = min(size, n - start)
            t = work[:m]
            if same:
                np.subtract(fa[start:start + m], ba[start:start + m], out=wa[:m])
            else:
                t.copy_(f[start:start + m])
                t.sub_(b[start:start + m].to(self.dtype))
            self.record(key, t, part=True, buf=buf)
            yield start, t
        self.finish(key)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (key, τ), one freshly allocated tensor at a time."""
        for key in self.keys:
            yield key, self.tensor(key)

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (key, τ) through one reused workspace: each τ is only valid until the next step."""
        import torch

        work = torch.empty(max((math.prod(s) for s in self.shapes.values()), default=0), dtype=self.dtype)
        for key in self.keys:
            yield key, self.tensor(key, out=work)

    def relative_norm(self, base_squares: Mapping[str, float] | None = None) -> float:
        """‖τ‖ / ‖θ₀‖ over the included tensors: how far the finetune moved, as a fraction of the model's size
        (a few percent for a finetune; about √2 for an unrelated model of the same shapes).

        ‖τ‖² of a tensor comes from :attr:`squares` when a pass over it (a strategy's) recorded it already; the
        rest are computed now, in one streaming pass over those tensors only, which raises on NaN/Inf like every
        pass over τ. ``base_squares`` (:func:`base_squares`, e.g. kept per base) saves the pass over θ₀. The result
        is the same whichever pass recorded a tensor's ‖τ‖²."""
        missing = [k for k in self.keys if k not in self.squares]
        if missing:
            import torch

            work = torch.empty(max(math.prod(self.shapes[k]) for k in missing), dtype=self.dtype)
            norms, self.norms = self.norms, True
            try:
                for key in missing:
                    self.tensor(key, out=work)
            finally:
                self.norms = norms
        if base_squares is None:
            base_squares = squares_of(self.base, self.keys)
        tau = sum(self.squares[k] for k in self.keys)
        base = sum(base_squares[k] for k in self.keys)
        return math.sqrt(tau) / math.sqrt(base) if base > 0 else (math.inf if tau > 0 else 0.0)

    def sparse(self, entries: Mapping[str, torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]],
               provenance: Provenance | None = None) -> SparseDelta:
        """The :class:`SparseDelta` of this task vector on a mask given per tensor as sorted flat indices, as
        (indices, τ values) when the strategy already has the values (saves a pass over the tensor), or as
        (``None``, values): the dense form, one value per entry of the tensor and 0 outside the mask."""
        import torch

        idx_out: dict[str, torch.Tensor] = {}
        val_out: dict[str, torch.Tensor] = {}
        for key, entry in entries.items():
            idx, vals = entry if isinstance(entry, tuple) else (entry, None)
            if idx is None:  # dense: no index array at all
                if vals is None or vals.numel() != math.prod(self.shapes[key]):
                    raise CheckpointError(f"a dense entry for {key!r} needs one value per entry", key=key)
                vals = vals.reshape(-1).to(self.dtypes[key])
                if bool(vals.any()):
                    val_out[key] = vals
                continue
            if idx.numel() == 0:
                continue
            if vals is None:
                vals = self.tensor(key).reshape(-1)[idx.to(torch.int64)]
            idx_out[key] = idx.to(index_dtype(math.prod(self.shapes[key])))  # no copy when it is that already
            val_out[key] = vals.to(self.dtypes[key])
        return SparseDelta(idx_out, val_out, dict(self.shapes), dict(self.dtypes), provenance or Provenance())


#: Entries per buffered step of :func:`sum_of_squares` (its float64 copy stays in the CPU cache), and per dot
#: product: at most 10000, so OpenBLAS computes it on the calling thread (a longer one wakes its threads, which costs
#: more than the product, and on a busy machine far more).
SQUARES_CHUNK, SQUARES_DOT = 1 << 16, 1 << 13


def sum_of_squares(t: torch.Tensor, buf: Any = None, start: float = 0.0) -> float:
    """``start`` + Σ t² in float64 (squares of float32 and narrower values are exact there; the running sum is
    rounded in float64, adding one product of :data:`SQUARES_DOT` entries at a time), non-finite when ``t`` holds a
    NaN or ±Inf. ``t`` is copied to float64 through a small buffer (``buf``, a float64 numpy array, or one made
    here): a float64 copy of a whole tensor would stream twice its size through memory, and
    ``torch.linalg.vector_norm(t, dtype=float64)`` is several times slower still. Pieces of one tensor whose
    lengths are multiples of :data:`SQUARES_DOT`, summed by passing each result as the next ``start``, give the
    same float as the whole tensor at once."""
    import numpy as np
    import torch

    flat = t.detach().reshape(-1)
    n, total = flat.numel(), start
    if flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float16, torch.float64):
        for i in range(0, n, SQUARES_DOT):  # other devices and dtypes (bfloat16): torch, the same steps
            c = flat[i:i + SQUARES_DOT].to(torch.float64)
            total += float(torch.dot(c, c))
        return total
    a = flat.numpy()
    if buf is None:
        buf = np.empty(min(n, SQUARES_CHUNK), dtype=np.float64)
    step = buf.size - buf.size % SQUARES_DOT if buf.size > SQUARES_DOT else buf.size
    for i in range(0, n, max(step, 1)):
        c = buf[: min(step, n - i)]
        np.copyto(c, a[i:i + step])
        for j in range(0, c.size, SQUARES_DOT):
            d = c[j:j + SQUARES_DOT]
            total += float(np.dot(d, d))
    return total


def squares_of(source: TensorSource, keys: Iterable[str]) -> dict[str, float]:
    """‖t‖² (float64, :func:`sum_of_squares`) of each tensor ``keys`` names in ``source``: θ₀'s side of the distance
    check, which depends on the base alone (compute it once per base)."""
    return {k: sum_of_squares(source.tensor(k)) for k in keys}

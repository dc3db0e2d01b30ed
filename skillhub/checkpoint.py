"""Checkpoints: the only code that opens or writes tensor files.

A checkpoint is a safetensors file or a folder of safetensors shards with a ``*.index.json``. Headers are parsed and
checked first (:mod:`skillhub.header`), before anything is mapped. Tensors are then read lazily, one at a time, as zero-copy views of a private (copy-on-write) memory map, so reading
an 85M-parameter model costs page-cache pages, not a second copy of the model.

Never map a file that sits in a watched folder: a truncation there turns into SIGBUS. The service copies drops to
staging first (FAULTS A6); this module trusts its caller on that.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from skillhub import faultpoints
from skillhub.atomic import atomic_file
from skillhub.errors import CheckpointError
from skillhub.header import (
    MAX_HEADER_BYTES,
    Header,
    TensorInfo,
    dtype_codes,
    float_dtypes,
    read_header,
    safetensors_header,
)

if TYPE_CHECKING:
    import torch

#: a folder drop's few-shot examples (tensors ``images`` and ``labels``), never one of the model's files
EXAMPLES_FILE = "examples.safetensors"
#: prefixes that training wrappers put in front of every key (DataParallel, Lightning, HF).
STRIP_PREFIXES = ("module.", "model.")


class TensorFile:
    """One checked safetensors file, mapped privately; tensors are zero-copy views created on demand."""

    def __init__(self, path: str | Path, header: Header | None = None) -> None:
        self.path = Path(path)
        self.header = header or read_header(self.path)
        self._mm: mmap.mmap | None = None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: views are writable for torch (no warning) but writes never reach the file.
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mm

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a view of the mapping (valid as long as the returned tensor lives)."""
        import torch

        info = self.header.tensors[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        mm = self._map()
        if info.start % info.dtype.itemsize:
            # Misaligned data (legal in the format): copy instead of viewing.
            buf = bytearray(mm[info.start:info.end])
            return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)
        return torch.frombuffer(mm, dtype=info.dtype, count=info.numel, offset=info.start).reshape(info.shape)

    def evict(self, name: str | None = None, span: tuple[int, int] | None = None) -> None:
        """Give the mapped pages of tensor ``name`` (or of the whole file; ``span``: only its flat entries
        [start, stop)) back to the kernel: they leave this process's resident memory and are read from the file
        again if touched. Views stay valid. For the offline stitch, which reads each tensor once and would otherwise
        keep a whole shard resident. Only for files nobody writes through a view (a write made through one would be
        discarded)."""
        mm = self._mm
        if mm is None or not hasattr(mm, "madvise"):
            return
        if name is None:
            start, end = 0, len(mm)
        else:
            info = self.header.tensors[name]
            start, end = info.start, info.end
            if span is not None:
                size = info.dtype.itemsize
                start, end = info.start + span[0] * size, min(info.end, info.start + span[1] * size)
        page = mmap.PAGESIZE
        lo, hi = start // page * page, min(len(mm), -(-end // page) * page)
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class Checkpoint(Mapping[str, TensorInfo]):
    """A model's tensors by normalised key, read lazily from one file or a sharded folder.

    Open with :func:`open_checkpoint`. ``ckpt[key]`` is the tensor's :class:`TensorInfo`; ``ckpt.tensor(key)`` reads
    it. ``metadata`` is the (first) file's header metadata.
    """

    def __init__(self, path: Path, files: list[TensorFile], prefixes: tuple[str, ...] = STRIP_PREFIXES) -> None:
        self.path = path
        self.files = files
        self._where: dict[str, tuple[TensorFile, str]] = {}
        strip_all = _common_prefix_to_strip([n for f in files for n in f.header.tensors], prefixes)
        for f in files:
            for raw in f.header.tensors:
                key = raw[len(strip_all):] if strip_all else raw
                if key in self._where:
                    raise CheckpointError(f"two tensors map to key {key!r} (after stripping {strip_all!r})",
                                          path=f.path, key=raw)
                self._where[key] = (f, raw)
        self.metadata = dict(files[0].header.metadata) if files else {}

    def __getitem__(self, key: str) -> TensorInfo:
        f, raw = self._where[key]
        return f.header.tensors[raw]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def tensor(self, key: str) -> torch.Tensor:
        f, raw = self._where[key]
        return f.tensor(raw)

    def locate(self, key: str) -> tuple[TensorFile, str]:
        """The file holding ``key`` and the tensor's name as stored there (before prefix stripping and renaming)."""
        return self._where[key]

    def raw_keys(self) -> list[str]:
        """Tensor names as stored in the files (before prefix stripping and renaming)."""
        return [n for f in self.files for n in f.header.tensors]

    def raw_tensor(self, name: str) -> torch.Tensor:
        for f in self.files:
            if name in f.header.tensors:
                return f.tensor(name)
        raise KeyError(name)

    def renamed(self, mapping: Mapping[str, str]) -> Checkpoint:
        """A view with keys ``new`` for each ``new -> old`` of ``mapping`` (other keys dropped); same files."""
        view = Checkpoint.__new__(Checkpoint)
        view.path, view.files, view.metadata = self.path, self.files, self.metadata
        view._where = {new: self._where[old] for new, old in mapping.items()}
        return view

    @property
    def nbytes(self) -> int:
        """Total size of the checkpoint's files on disk."""
        return sum(f.header.file_size for f in self.files)


def _common_prefix_to_strip(names: list[str], prefixes: tuple[str, ...]) -> str:
    """The wrapper prefix shared by *every* key, so that a model with a real ``model.`` submodule is left alone."""
    stripped = ""
    while names:
        for p in prefixes:
            if all(n.startswith(stripped + p) and len(n) > len(stripped + p) for n in names):
                stripped += p
                break
        else:
            return stripped
    return stripped


def open_checkpoint(path: str | Path, *, max_header_bytes: int = MAX_HEADER_BYTES) -> Checkpoint:
    """Open a safetensors file, or a folder holding one ``*.safetensors`` file or shards with a ``*.index.json``."""
    path = Path(path)
    if path.is_dir():
        return _open_folder(path, max_header_bytes)
    if not path.exists():
        raise CheckpointError("no such file", path=path)
    if not path.is_file():
        raise CheckpointError("not a regular file", path=path)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        raise CheckpointError("pickle checkpoints are never opened directly", path=path,
                              hint="convert it with `skillhub convert` first")
    return Checkpoint(path, [TensorFile(path, read_header(path, max_header_bytes=max_header_bytes))])


def _open_folder(folder: Path, max_header_bytes: int) -> Checkpoint:
    indexes = sorted(folder.glob("*.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"several index files: {[i.name for i in indexes]}", path=folder)
    if not indexes:
        # examples.safetensors is a folder drop's few-shot data (README "Service"), not a part of the model
        files = sorted(f for f in folder.glob("*.safetensors") if f.name != EXAMPLES_FILE)
        if len(files) != 1:
            raise CheckpointError(f"expected one .safetensors file or an index, found {len(files)}", path=folder)
        return Checkpoint(folder, [TensorFile(files[0], read_header(files[0], max_header_bytes=max_header_bytes))])
    index = indexes[0]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise CheckpointError(f"unreadable shard index ({type(e).__name__})", path=index) from None
    root = folder.resolve()
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).is_absolute() or not (root / shard).resolve().is_relative_to(root):
            raise CheckpointError(f"shard path {shard!r} for {key!r} leaves the checkpoint folder", path=index, key=key)
        shards.setdefault(shard, []).append(key)
    missing = sorted(s for s in shards if not (folder / s).is_file())
    if missing:
        raise CheckpointError(f"missing shards: {', '.join(missing)}", path=folder,
                              hint="wait until every shard is copied, or drop the folder again")
    files = []
    for shard, keys in sorted(shards.items()):
        tf = TensorFile(folder / shard, read_header(folder / shard, max_header_bytes=max_header_bytes))
        absent = [k for k in keys if k not in tf.header.tensors]
        if absent:
            raise CheckpointError(f"index lists {absent[:3]} in {shard} but the shard lacks them", path=index)
        files.append(tf)
    return Checkpoint(folder, files)


def check_tensor_dtypes(ckpt: Checkpoint, keys: list[str]) -> None:
    """Refuse included tensors that are not floating point (FAULTS B5)."""
    floats = float_dtypes()
    for k in keys:
        if ckpt[k].dtype not in floats:
            raise CheckpointError(f"tensor {k!r} has dtype {dtype_codes()[ckpt[k].dtype]}, expected a float type",
                                  path=ckpt.path, key=k, hint="only float32/float16/bfloat16/float64 weights merge")


def validate_against(base: Checkpoint, ft: Checkpoint, *, limit: int = 5) -> None:
    """Check that ``ft`` is the same architecture as ``base`` (FAULTS B6), naming the first mismatches.

    Keys must match exactly; shapes must match; float tensors may differ in float dtype (the maths runs in float32
    or wider), anything else must match in dtype. Finiteness is checked where the values are read (task vectors).
    """
    missing = [k for k in base if k not in ft]
    extra = [k for k in ft if k not in base]
    problems: list[str] = []
    if missing:
        problems.append(f"missing keys {_few(missing, limit)}")
    if extra:
        problems.append(f"unexpected keys {_few(extra, limit)}")
    bad_shape = [f"{k} {list(ft[k].shape)} vs base {list(base[k].shape)}"
                 for k in base if k in ft and ft[k].shape != base[k].shape]
    if bad_shape:
        problems.append(f"shape mismatch: {_few(bad_shape, limit)}")
    codes, floats = dtype_codes(), float_dtypes()
    bad_dtype = [f"{k} {codes[ft[k].dtype]} vs base {codes[base[k].dtype]}"
                 for k in base if k in ft and ft[k].dtype != base[k].dtype
                 and not (ft[k].dtype in floats and base[k].dtype in floats)]
    if bad_dtype:
        problems.append(f"dtype mismatch: {_few(bad_dtype, limit)}")
    if problems:
        raise CheckpointError("does not match the base model: " + "; ".join(problems), path=ft.path,
                              hint="drop a finetune of the configured base model")


def _few(items: list[str], limit: int) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                      faultpoint: str | None = None) -> str:
    """Write a safetensors file atomically (temp, fsync, rename, fsync dir); return its sha256.

    The bytes are deterministic for the same input (:func:`safetensors_header`), so a mask file's content hash is a
    function of the mask alone. Readable by the reference safetensors library. ``faultpoint`` names the
    :mod:`skillhub.faultpoints` point reached when half the tensors are written (crash tests).
    """
    return write_safetensors_lazy(path, tensors, tensors.__getitem__, metadata, faultpoint=faultpoint)


def write_safetensors_lazy(path: str | Path, layout: Mapping[str, torch.Tensor], produce: Callable[[str], torch.Tensor],
                           metadata: Mapping[str, str], *, faultpoint: str | None = None,
                           written: Callable[[str], None] | None = None) -> str:
    """:func:`write_safetensors` with each tensor made only when its bytes are due: ``layout`` gives dtypes and
    shapes (meta tensors will do) for the header, ``produce(name)`` the tensor itself, one at a time, and
    ``written(name)`` is called once its bytes are out. At most one produced tensor is alive at a time, so a file
    larger than memory can be written (the offline stitch streams a shard this way). Same bytes as
    :func:`write_safetensors` for the same tensors."""
    import torch

    path = Path(path)
    try:
        prefix, order, _ = safetensors_header(layout, metadata)
    except CheckpointError as e:
        raise CheckpointError(e.message, path=path, key=e.key) from None
    digest = hashlib.sha256(prefix)
    with atomic_file(path) as f:
        f.write(prefix)
        for i, name in enumerate(order):
            if faultpoint and i == len(order) // 2:
                f.flush()
                faultpoints.reach(faultpoint)
            t = produce(name).detach().to("cpu").contiguous()
            want = layout[name]
            if t.dtype != want.dtype or tuple(t.shape) != tuple(want.shape):
                raise CheckpointError(f"tensor {name!r} is {t.dtype} {list(t.shape)}, but the header says "
                                      f"{want.dtype} {list(want.shape)}", path=path, key=name)
            if t.numel():
                mv = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                f.write(mv)
                digest.update(mv)
            del t
            if written is not None:
                written(name)
    return digest.hexdigest()


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a whole (small) safetensors file into memory: tensors by raw name, and header metadata."""
    tf = TensorFile(path)
    return {n: tf.tensor(n).clone() for n in tf.header.tensors}, dict(tf.header.metadata)

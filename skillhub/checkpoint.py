"""Checkpoints: the only code that opens or writes tensor files.

A checkpoint is a safetensors file or a folder of safetensors shards with a ``*.index.json``. Headers are parsed and
checked by our own code *before* anything is mapped, because the safetensors parser silently keeps the last of two
duplicate names and trusts offsets more than we want to for files dropped by strangers (FAULTS B1, B3, B4, B10).
Tensors are then read lazily, one at a time, as zero-copy views of a private (copy-on-write) memory map, so reading
an 85M-parameter model costs page-cache pages, not a second copy of the model.

Never map a file that sits in a watched folder: a truncation there turns into SIGBUS. The service copies drops to
staging first (FAULTS A6); this module trusts its caller on that.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from skillhub import faultpoints
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
#: prefixes that training wrappers put in front of every key (DataParallel, Lightning, HF).
STRIP_PREFIXES = ("module.", "model.")


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
        info = self.header.tensors[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        mm = self._map()
        if info.start % info.dtype.itemsize:
            # Misaligned data (legal in the format): copy instead of viewing.
            buf = bytearray(mm[info.start:info.end])
            return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)
        return torch.frombuffer(mm, dtype=info.dtype, count=info.numel, offset=info.start).reshape(info.shape)


def normalise_key(key: str, prefixes: tuple[str, ...] = STRIP_PREFIXES) -> str:
    """Strip wrapper prefixes (``module.``, ``model.``) that training code adds in front of every key."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p) and len(key) > len(p):
                key, changed = key[len(p):], True
    return key


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
        files = sorted(folder.glob("*.safetensors"))
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
    for k in keys:
        if ckpt[k].dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {k!r} has dtype {DTYPE_CODES[ckpt[k].dtype]}, expected a float type",
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
    bad_dtype = [f"{k} {DTYPE_CODES[ft[k].dtype]} vs base {DTYPE_CODES[base[k].dtype]}"
                 for k in base if k in ft and ft[k].dtype != base[k].dtype
                 and not (ft[k].dtype in FLOAT_DTYPES and base[k].dtype in FLOAT_DTYPES)]
    if bad_dtype:
        problems.append(f"dtype mismatch: {_few(bad_dtype, limit)}")
    if problems:
        raise CheckpointError("does not match the base model: " + "; ".join(problems), path=ft.path,
                              hint="drop a finetune of the configured base model")


def _few(items: list[str], limit: int) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


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


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                      faultpoint: str | None = None) -> str:
    """Write a safetensors file atomically (temp, fsync, rename, fsync dir); return its sha256.

    The bytes are deterministic for the same input (:func:`safetensors_header`), so a mask file's content hash is a
    function of the mask alone. Readable by the reference safetensors library. ``faultpoint`` names the
    :mod:`skillhub.faultpoints` point reached when half the tensors are written (crash tests).
    """
    path = Path(path)
    try:
        prefix, order, _ = safetensors_header(tensors, metadata)
    except CheckpointError as e:
        raise CheckpointError(e.message, path=path, key=e.key) from None
    digest = hashlib.sha256(prefix)
    with atomic_file(path) as f:
        f.write(prefix)
        for i, name in enumerate(order):
            if faultpoint and i == len(order) // 2:
                f.flush()
                faultpoints.reach(faultpoint)
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                mv = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                f.write(mv)
                digest.update(mv)
    return digest.hexdigest()


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write ``path`` all or nothing: into a temp file beside it, then fsync, rename and fsync the folder; on any
    error the temp file is removed and ``path`` is as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | Path) -> None:
    """fsync a directory so that a rename inside it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class FingerprintCache:
    """sha256 of a base checkpoint, cached by (path, size, mtime_ns, inode) of each of its files.

    A sharded checkpoint's fingerprint is the sha256 of its shard names and shard hashes.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int, int], str] = {}

    def file(self, path: Path) -> str:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in self._cache:
            self._cache[key] = sha256_file(path)
        return self._cache[key]

    def checkpoint(self, ckpt: Checkpoint) -> str:
        if len(ckpt.files) == 1 and ckpt.path.is_file():
            return self.file(ckpt.files[0].path)
        h = hashlib.sha256()
        for f in ckpt.files:
            h.update(f"{f.path.name}\0{self.file(f.path)}\n".encode())
        return h.hexdigest()


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a whole (small) safetensors file into memory: tensors by raw name, and header metadata."""
    tf = TensorFile(path)
    return {n: tf.tensor(n).clone() for n in tf.header.tensors}, dict(tf.header.metadata)

"""Merged models written in the layout of their base, so that the tools that load the base load the result.

A base given as a single safetensors file gives a single file (tensors under skillhub's normalised keys, as
always). A base given as a folder, as Hugging Face writes one (``config.json``, tokenizer files, and either one
``model.safetensors`` or shards with a ``model.safetensors.index.json``), gives a folder of the same shape: the same
shard files holding the same tensors under the base's own tensor names, an index in the Hugging Face format
(``{"metadata": {"total_size": …}, "weight_map": {name: shard}}``) when the base has one, and copies of every
other file of the base folder (config, tokenizer, generation config), so that
``transformers.AutoModel.from_pretrained(folder)``, vLLM or TGI load it as they load the base.

The offline ``skillhub stitch`` (:func:`skillhub.offline.stitch_masks`) writes this layout shard by shard, all or
nothing (:func:`write_model_staged`); the service's publisher writes each version's weights in it
(``state/models/<n>/``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import TYPE_CHECKING

from skillhub.atomic import atomic_file, fsync_dir
from skillhub.checkpoint import EXAMPLES_FILE, Checkpoint, TensorFile, write_safetensors_lazy
from skillhub.errors import CheckpointError

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
#: files of a base folder that are weights (of the base, so never copied beside merged weights)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".gguf", ".onnx")
#: header metadata every written weights file carries: ``transformers`` refuses a file whose metadata lacks it
FORMAT_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class Shard:
    """One weights file of the output: its file name and the checkpoint keys it holds, in the base's file."""

    name: str
    keys: tuple[str, ...]
    source: TensorFile


@dataclass(frozen=True)
class Layout:
    """How a merged model of ``base`` is written: one file, or a folder of shards (with an index or not)."""

    #: the base is a folder: the output is a folder of the same shape, its tensors under the base's own names
    folder: bool
    #: the base has a shard index, so the output has one too
    indexed: bool
    shards: tuple[Shard, ...]
    #: checkpoint key -> tensor name to write
    names: Mapping[str, str]
    #: the base folder's other files (config, tokenizer...), copied beside the weights
    side_files: tuple[Path, ...]

    def shard_of(self, key: str) -> Shard:
        for s in self.shards:
            if key in s.keys:
                return s
        raise KeyError(key)


def layout_of(base: Checkpoint) -> Layout:
    """The output layout for merged models of ``base`` (see the module docstring)."""
    folder = base.path.is_dir()
    by_file: dict[int, list[str]] = {}
    names: dict[str, str] = {}
    files = {id(f): f for f in base.files}
    for key in base:
        f, raw = base.locate(key)
        by_file.setdefault(id(f), []).append(key)
        names[key] = raw if folder else key
    shards = tuple(Shard(files[i].path.name, tuple(keys), files[i]) for i, keys in by_file.items())
    indexed = folder and any(p.name.endswith(".index.json") for p in base.path.iterdir())
    return Layout(folder, indexed, shards, names, side_files(base.path) if folder else ())


def side_files(folder: Path) -> tuple[Path, ...]:
    """The files of a model folder that are not weights: config, tokenizer, generation config, README… (hidden
    files and subfolders are left out)."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.name == EXAMPLES_FILE:
            continue
        if p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        out.append(p)
    return tuple(out)


def write_model(out: Path, layout: Layout, layouts: Mapping[str, torch.Tensor],
                produce: Callable[[str], torch.Tensor], metadata: Mapping[str, str], *,
                shard_done: Callable[[Shard], None] | None = None, tensor_done: Callable[[str], None] | None = None,
                faultpoint: str | None = None) -> list[Path]:
    """Write a merged model to ``out`` in ``layout``, one shard after the other and one tensor at a time:
    ``layouts[key]`` gives each tensor's dtype and shape (meta tensors will do), ``produce(key)`` the tensor when its
    bytes are due. Each file is written atomically; the side files come first and the index last, so the last file
    written (the index, or the one weights file) says the folder is complete. Returns the files written."""
    meta = {**FORMAT_METADATA, **metadata}
    if not layout.folder:
        (only,) = layout.shards
        write_safetensors_lazy(out, {k: layouts[k] for k in only.keys}, produce, meta, faultpoint=faultpoint,
                               written=tensor_done)
        if shard_done is not None:
            shard_done(only)
        return [out]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the output folder ({e.strerror or e})", path=out) from e
    if not out.is_dir():
        raise CheckpointError("the output must be a folder for a base given as a folder", path=out)
    written: list[Path] = []
    for p in layout.side_files:  # first: the file written last (the index, or the one weights file) says "complete"
        with atomic_file(out / p.name) as f, open(p, "rb") as src:
            shutil.copyfileobj(src, f)
        written.append(out / p.name)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in layout.shards:
        raw = {layout.names[k]: k for k in shard.keys}
        target = out / shard.name
        write_safetensors_lazy(target, {n: layouts[k] for n, k in raw.items()}, lambda n: produce(raw[n]), meta,
                               faultpoint=faultpoint, written=None if tensor_done is None else
                               lambda n: tensor_done(raw[n]))
        for n, k in raw.items():
            weight_map[n] = shard.name
            total += layouts[k].numel() * layouts[k].element_size()
        written.append(target)
        if shard_done is not None:
            shard_done(shard)
    if layout.indexed:
        index = {"metadata": {"total_size": total, **metadata}, "weight_map": dict(sorted(weight_map.items()))}
        with atomic_file(out / INDEX_NAME) as f:
            f.write(json.dumps(index, indent=2, sort_keys=False).encode())
        written.append(out / INDEX_NAME)
    return written


def finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first key holding NaN/Inf, else ``None`` (the weight part of a version's smoke check, and the offline
    stitch's check of each merged tensor). A min/max reduction, which propagates NaN, instead of
    ``isfinite().all()``: no full-size boolean temporary."""
    import torch

    for key, t in tensors.items():
        if t.is_floating_point() and t.numel():
            lo, hi = torch.aminmax(t.reshape(-1))
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                return key
    return None


#: the hidden sibling a folder output is written into before it is moved into place: ``.NAME.partial-PID``
PARTIAL = ".{name}.partial-{pid}"


def write_model_staged(out: Path, layout: Layout, layouts: Mapping[str, torch.Tensor],
                       produce: Callable[[str], torch.Tensor], metadata: Mapping[str, str], *,
                       shard_done: Callable[[Shard], None] | None = None,
                       tensor_done: Callable[[str], None] | None = None) -> list[Path]:
    """:func:`write_model`, all or nothing: a failure half-way (a ``produce`` that raises on a bad tensor of a
    later shard, a full disk) leaves no output behind, and an existing output folder as it was.

    A single file is written atomically anyway. A folder is written into a hidden sibling
    (:data:`PARTIAL`), removed on any error; once complete it is renamed to ``out``, or, when ``out`` is already a
    folder, its files are moved into it one by one, the index last (files of ``out`` that the new output lacks are
    left alone, as :func:`write_model` leaves them). A sibling left by a process that died (killed half-way) is
    removed by the next run for the same ``out``."""
    out = Path(out)
    if not layout.folder:
        return write_model(out, layout, layouts, produce, metadata, shard_done=shard_done, tensor_done=tensor_done)
    if out.exists() and not out.is_dir():
        raise CheckpointError("the output must be a folder for a base given as a folder", path=out)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the output's folder ({e.strerror or e})", path=parent) from e
    _remove_dead_partials(parent, out.name)
    stage = parent / PARTIAL.format(name=out.name, pid=os.getpid())
    shutil.rmtree(stage, ignore_errors=True)
    try:
        written = write_model(stage, layout, layouts, produce, metadata, shard_done=shard_done,
                              tensor_done=tensor_done)
        if not out.exists():
            os.rename(stage, out)
            fsync_dir(parent)
            return [out / p.name for p in written]
        for p in written:  # write_model's order: side files, shards, the index last
            os.replace(p, out / p.name)
        fsync_dir(out)
        stage.rmdir()
        return [out / p.name for p in written]
    except OSError as e:
        raise CheckpointError(f"cannot write the output ({e.strerror or e})", path=out) from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _remove_dead_partials(parent: Path, name: str) -> None:
    """Remove the hidden partial outputs for ``name`` whose writing process is gone."""
    prefix = PARTIAL.format(name=name, pid="")
    for p in parent.glob(f"{glob_escape(prefix)}*"):
        pid = p.name[len(prefix):]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to touch
        return True
    return True

"""The content-addressed files of a state folder: mask files (``masks/<sha256>.mask.safetensors``), classification
heads (``heads/<sha256>.safetensors``), few-shot examples (``examples/<sha256>.safetensors``: tensors ``images``
and ``labels``) and staged checkpoints (``staging/``). Each is named by its content's hash
(never a path a caller chose) and written all or nothing; the rows that reference them, and so which of them may
go, are :class:`~skillhub.registry.Registry`'s.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from skillhub.atomic import fsync_dir, sha256_file
from skillhub.errors import RegistryError

if TYPE_CHECKING:  # tensors are imported where masks and heads are read or written: listing skills needs no torch
    import torch

    from skillhub.delta import SparseDelta
    from skillhub.families import Examples

MASK_SUFFIX = ".mask.safetensors"
SHA_RE = re.compile(r"[0-9a-f]{64}")


class StateFiles:
    """Masks, heads and staged checkpoints of the state folder ``state_dir``."""

    state_dir: Path
    masks_dir: Path
    staging_dir: Path

    def store_head(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
        """Store a skill's classification head (content-addressed, ``heads/<sha>.safetensors``); return its sha."""
        return self._store("heads", tensors, metadata)

    def load_head(self, sha: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return self._load(self.head_path(sha), "head file")

    def store_examples(self, examples: Examples) -> str:
        """Store a skill's few-shot examples (``examples/<sha>.safetensors``); return their sha."""
        return self._store("examples", {"images": examples.images.contiguous(),
                                        "labels": examples.labels.reshape(-1).long().contiguous()}, {})

    def load_examples(self, sha: str) -> Examples:
        from skillhub.families import Examples

        tensors, _ = self._load(self.examples_path(sha), "examples file")
        return Examples(tensors["images"], tensors["labels"])

    def store_statistics(self, tensors: Mapping[str, torch.Tensor]) -> str:
        """Store re-estimated normalization statistics of a served model (``statistics/<sha>.safetensors``, the
        quality gate's :func:`~skillhub.hookspecs.recalibrate_statistics`); return their sha."""
        return self._store("statistics", {k: v.contiguous() for k, v in tensors.items()}, {})

    def load_statistics(self, sha: str) -> dict[str, torch.Tensor]:
        tensors, _ = self._load(self.state_dir / "statistics" / f"{sha}.safetensors", "statistics file")
        return tensors

    def _store(self, kind: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
        folder = self.state_dir / kind
        folder.mkdir(exist_ok=True)
        tmp = folder / f".incoming-{os.getpid()}-{os.urandom(4).hex()}.tmp"
        from skillhub.checkpoint import write_safetensors

        sha = write_safetensors(tmp, tensors, metadata)
        os.replace(tmp, folder / f"{sha}.safetensors")
        fsync_dir(folder)
        return sha

    def _load(self, path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        if not path.is_file():
            raise RegistryError(f"{what} missing", path=path, hint="drop the skill again")
        from skillhub.checkpoint import read_tensors

        return read_tensors(path)

    def mask_path(self, mask_sha: str) -> Path:
        """Where the mask file with this sha256 lives (the hash is checked: it is never a path)."""
        if not isinstance(mask_sha, str) or not SHA_RE.fullmatch(mask_sha):
            raise RegistryError(f"not a sha256 hex digest: {mask_sha!r}")
        return self.masks_dir / f"{mask_sha}{MASK_SUFFIX}"

    def load_mask(self, mask_sha: str, *, verify: bool = False,
                  device: torch.device | str = "cpu") -> SparseDelta:
        """Read a mask file; with ``verify``, first check that its bytes still hash to ``mask_sha``."""
        path = self.mask_path(mask_sha)
        if not path.is_file():
            raise RegistryError("mask file is missing", path=path,
                                hint="run recovery (restart the daemon) and drop the checkpoint again")
        if verify and (actual := sha256_file(path)) != mask_sha:
            raise RegistryError(f"mask file is damaged (sha256 {actual})", path=path,
                                hint="drop the skill's checkpoint again to rebuild it")
        from skillhub.delta import SparseDelta

        return SparseDelta.load(path, device=device)

    def _mask_files(self) -> dict[str, Path]:
        if not self.masks_dir.is_dir():
            return {}
        return {p.name.removesuffix(MASK_SUFFIX): p for p in self.masks_dir.iterdir()
                if p.name.endswith(MASK_SUFFIX) and SHA_RE.fullmatch(p.name.removesuffix(MASK_SUFFIX))}

    def discard_staged(self, path: Path) -> bool:
        """Delete a staged checkpoint (a file or folder in ``staging/``; nothing outside it). Returns whether it was
        there."""
        path = Path(path)
        if path.resolve().parent != self.staging_dir.resolve() or not path.exists():
            return False
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return True

    def head_path(self, sha: str) -> Path:
        """Where the head file with this sha256 lives (the hash is checked: it is never a path)."""
        if not SHA_RE.fullmatch(sha):
            raise RegistryError(f"not a sha256 hex digest: {sha!r}")
        return self.state_dir / "heads" / f"{sha}.safetensors"

    def examples_path(self, sha: str) -> Path:
        """Where the examples file with this sha256 lives (the hash is checked: it is never a path)."""
        if not SHA_RE.fullmatch(sha):
            raise RegistryError(f"not a sha256 hex digest: {sha!r}")
        return self.state_dir / "examples" / f"{sha}.safetensors"

    def _remove_debris(self, inflight: set[str]) -> list[Path]:
        """Temp files of writes a crash interrupted (``*.tmp`` in masks/ and staging/, none still in flight)."""
        debris = []
        for folder in (self.masks_dir, self.staging_dir):
            for entry in sorted(folder.iterdir()):
                if entry.name.endswith(".tmp") and not any(n in entry.name for n in inflight):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                    debris.append(entry)
        return debris

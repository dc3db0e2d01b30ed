"""The soak's drops (bench/soak.py): how finetunes, corrupt files and re-adds reach the daemon's inbox, which of them
are still there, and how each corrupt one was rejected.

A drop arrives the ways a user's would: written in place, written slowly (a pause mid-file), renamed from a temp
name, or moved in from another folder; it names its skill by file stem, header metadata or a sidecar ``.toml``.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from soak_world import class_names, corrupt_bytes, finetune, parse_safetensors_metadata, sha256_bytes, write_atomic


@dataclass
class CorruptDrop:
    """An unusable file dropped at ``t`` (wall clock); ``resolved`` when its reason file appeared in ``.rejected``."""

    kind: str
    name: str
    t: float
    sha: str
    resolved: float | None = None
    reason: str = ""


class Inbox:
    """The driver's side of the daemon's inbox: it drops files and keeps what it dropped.

    ``rng`` is the driver's own, shared so that a seeded run makes the same choices in the same order; so is the one
    numbering of the run (:meth:`next_number`), which names new skills and seeds each finetune.
    """

    def __init__(self, root: Path, base: dict[str, torch.Tensor], seed: int, rng: random.Random) -> None:
        self.base, self.seed, self.rng = base, seed, rng
        self.dir = root / "inbox"
        self.blobs = root / "blobs"  # each skill's last good drop, for re-adding it after a remove
        self.outside = root / "outside"  # where "moved in" drops are written first
        for d in (self.dir, self.blobs, self.outside):
            d.mkdir(exist_ok=True)
        self.drops = 0
        self.counter = 0
        self.pending: dict[str, str] = {}  # valid drops in the inbox: file name -> skill
        self.corrupt: list[CorruptDrop] = []

    def next_number(self) -> int:
        self.counter += 1
        return self.counter

    def busy(self, name: str) -> bool:
        """A drop for skill ``name`` (or named like it) is still in the inbox: removing the skill now would race it."""
        self.pending = {f: n for f, n in self.pending.items() if (self.dir / f).exists()}
        return (self.dir / f"{name}.safetensors").exists() or name in self.pending.values() or any(
            c.name == f"{name}.safetensors" and c.resolved is None for c in self.corrupt)

    def put(self, data: bytes, filename: str, mode: str, sidecar: str | None = None, *, skill: str = "") -> None:
        """Drop bytes into the inbox as ``filename``: in place, slowly, renamed from a temp name, or moved in."""
        self.drops += 1
        self.pending[filename] = skill
        dest = self.dir / filename
        if sidecar is not None:  # before the checkpoint: the intake reads it when the checkpoint is ready
            write_atomic(self.dir / (filename.removesuffix(".safetensors") + ".toml"), sidecar.encode())
        if mode == "rename":
            tmp = self.dir / f".{filename}.part"
            tmp.write_bytes(data)
            os.rename(tmp, dest)
        elif mode == "slow":  # 40 %, a pause, the rest (FAULTS A1)
            cut = int(len(data) * 0.4)
            with open(dest, "wb") as f:
                f.write(data[:cut])
                f.flush()
                time.sleep(0.6)
                f.write(data[cut:])
        elif mode == "move":
            src = self.outside / filename
            src.write_bytes(data)
            os.rename(src, dest)
        else:
            dest.write_bytes(data)

    def valid_drop(self, name: str) -> str:
        """Drop a new finetune for skill ``name``, named by file stem, header metadata or a sidecar; keep its bytes
        (and sidecar classes) for a re-add; return its sha256."""
        number = self.next_number()
        classes = self.rng.randint(2, 5)
        tensors = finetune(self.base, self.seed * 100_000 + number, classes=classes,
                           tower_only=self.rng.random() < 0.3)
        naming = self.rng.choice(("stem", "stem", "meta", "sidecar"))
        if naming == "stem" and self.busy(name):
            naming = "meta"
        meta, sidecar = {}, None
        if naming == "sidecar":
            sidecar = f'skill = "{name}"\nclasses = {json.dumps(class_names(name, classes))}\n'
        else:
            meta["skillhub.classes"] = json.dumps(class_names(name, classes))
            if naming == "meta":
                meta["skillhub.skill"] = name
        data = save_safetensors(tensors, metadata=meta)
        filename = f"{name}.safetensors" if naming == "stem" else f"upload-{self.drops}-{name}.safetensors"
        self.put(data, filename, self.rng.choice(("rename", "rename", "direct", "slow", "move")), sidecar, skill=name)
        self.blob(name).write_bytes(data)
        (self.blobs / f"{name}.sidecar.toml").unlink(missing_ok=True)
        if sidecar is not None:
            (self.blobs / f"{name}.sidecar.toml").write_text(sidecar)
        return sha256_bytes(data)

    def blob(self, name: str) -> Path:
        """Where skill ``name``'s last good drop is kept."""
        return self.blobs / f"{name}.safetensors"

    def readd(self, name: str) -> str:
        """Drop a removed skill's last bytes again (the same sha256 as before the remove), named as before; return
        the sha256."""
        data = self.blob(name).read_bytes()
        side = self.blobs / f"{name}.sidecar.toml"
        upload = f"readd-{self.drops}-{name}.safetensors"
        if side.exists():  # it was named (and its classes given) by a sidecar: send that again
            self.put(data, upload, "rename", side.read_text(), skill=name)
        else:
            named_inside = "skillhub.skill" in parse_safetensors_metadata(data)
            self.put(data, upload if named_inside else f"{name}.safetensors", self.rng.choice(("rename", "direct")),
                     skill=name)
        return sha256_bytes(data)

    def corrupt_drop(self, kind: str, name: str) -> None:
        """Drop an unusable file of ``kind`` named ``name``; it must be rejected and change nothing."""
        data = corrupt_bytes(kind, self.base, self.seed * 100_000 + self.next_number(), name, self.rng)
        filename = f"{name}.safetensors"
        self.corrupt.append(CorruptDrop(kind, filename, time.time(), sha256_bytes(data)))
        self.put(data, filename, self.rng.choice(("rename", "direct", "move")), skill=name)

    def resolve_corrupt(self) -> bool:
        """Note the reason of each corrupt drop the daemon has rejected since the last look; whether all are."""
        rejected = self.dir / ".rejected"
        for c in self.corrupt:
            if c.resolved is not None or (self.dir / c.name).exists():
                continue
            note = rejected / f"{c.name}.reason.txt"
            try:
                if note.stat().st_mtime >= c.t - 1:
                    c.reason = note.read_text(errors="replace").splitlines()[0]
                    c.resolved = time.time()
            except (OSError, IndexError):
                pass
        return all(c.resolved is not None for c in self.corrupt)

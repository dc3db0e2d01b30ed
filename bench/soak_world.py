"""The soak's world (bench/soak.py): the small open_clip model it builds, the finetunes and corrupt files it drops,
the ``config.toml`` it writes (and the invalid edits of it), and the small file helpers every part of the soak uses.

Nothing here talks to the service; everything is seeded, so a run with the same seed drops the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

#: A small CLIP: a 2-block ViT image tower (428k parameters, the part that is merged) and a 1-block text tower.
CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
SPARSITY = 0.05
#: What the reason file of each kind of corrupt drop must mention (one of).
REASONS = {"empty": ("empty", "0 bytes"), "lfs": ("git-lfs",), "truncated": ("truncated",), "html": ("HTML",),
           "wrong_shape": ("shape mismatch",), "nan": ("NaN",), "zero": ("task vector is zero",)}
#: Invalid config edits: (name, transform of the valid text); each must be logged as config_rejected.
INVALID_EDITS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("toml syntax error", lambda t: t.replace("[skills]", "[skills")),
    ("unknown key", lambda t: t.replace("[watch]\n", "[watch]\nstable_secs = 1\n")),
    ("unknown strategy", lambda t: t.replace('strategy = "dataless"', 'strategy = "no-such-strategy"')),
    ("restart-only change", lambda t: t.replace('policy = "average"', 'policy = "sum"')),
    ("bad value", lambda t: t.replace("keep_versions = 5", "keep_versions = 0")),
)


def log(msg: str) -> None:
    """A progress line of the soak on stderr (stdout carries only the report)."""
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the model and the drops ---------------------------------------------------------------------------------------


def build_base(root: Path) -> dict[str, torch.Tensor]:
    """The base CLIP (seeded), its config file ``clip.json`` and weights ``base.safetensors`` in ``root``."""
    from skillhub.families.open_clip import create_clip

    (root / "clip.json").write_text(json.dumps(CLIP_CFG))
    torch.manual_seed(0)
    sd = {k: v.detach().clone().contiguous() for k, v in create_clip(str(root / "clip.json")).state_dict().items()}
    (root / "base.safetensors").write_bytes(save_safetensors(sd))
    return sd


def finetune(base: dict[str, torch.Tensor], seed: int, *, classes: int, tower_only: bool,
             corrupt: str | None = None) -> dict[str, torch.Tensor]:
    """A synthetic finetune: θ₀ + small dense noise on the image tower + a larger change on a random 2% of it (the
    "skill"), and a head ``skillhub.head.weight``. ``corrupt`` makes it unusable: ``wrong_shape``, ``nan``, ``zero``.

    (``bench/common.make_finetune`` is the same idea for a bare tensor dict; this one also writes the head, the
    tower-only layout and the corruptions, and its order of random draws fixes what a seeded soak drops.)"""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        if not k.startswith("visual."):
            if not tower_only:
                out[k] = v
            continue
        new = v
        if v.is_floating_point() and corrupt != "zero":
            skill_part = (torch.rand(v.shape, generator=g) < 0.02) * torch.randn(v.shape, generator=g) * 0.05
            new = v + 0.002 * torch.randn(v.shape, generator=g) + skill_part
        out[k.removeprefix("visual.") if tower_only else k] = new.contiguous()
    tower = sorted(k for k in out if (tower_only or k.startswith("visual.")) and out[k].ndim == 2)
    if corrupt == "wrong_shape":
        key = tower[0]
        out[key] = torch.randn(out[key].shape[0] + 3, out[key].shape[1], generator=g)
    elif corrupt == "nan":
        out[tower[-1]] = out[tower[-1]].clone()
        out[tower[-1]].view(-1)[7] = float("nan")
    out["skillhub.head.weight"] = torch.nn.functional.normalize(torch.randn(classes, CLIP_CFG["embed_dim"],
                                                                            generator=g), dim=-1)
    if seed % 3 == 0:
        out["skillhub.head.bias"] = 0.1 * torch.randn(classes, generator=g)
    return out


def corrupt_bytes(kind: str, base: dict[str, torch.Tensor], seed: int, name: str, rng: random.Random) -> bytes:
    """The bytes of an unusable drop of ``kind`` (a key of :data:`REASONS`) for skill ``name``. Kinds built from a
    finetune draw its layout from ``rng``; the others draw nothing from it."""
    if kind == "empty":
        return b""
    if kind == "lfs":
        return (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + os.urandom(32).hex().encode()
                + b"\nsize 4919504\n")
    if kind == "html":
        return b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>nope</body></html>\n"
    ft = finetune(base, seed, classes=3, tower_only=rng.random() < 0.5, corrupt=kind if kind != "truncated" else None)
    data = save_safetensors(ft, metadata={"skillhub.classes": json.dumps(class_names(name, 3))})
    return data[: int(len(data) * 0.6)] if kind == "truncated" else data


def class_names(skill: str, n: int) -> list[str]:
    return [f"{skill}/c{i}" for i in range(n)]


def png(seed: int, size: int = 24) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# --- the config ------------------------------------------------------------------------------------------------------


def config_text(port: int, disabled: list[str]) -> str:
    return f"""# written by bench/soak.py
device = "cpu"
[base]
family = "open_clip"
model = "clip.json"
weights = "base.safetensors"
[watch]
dir = "inbox"
stable_seconds = 0.3
rescan_seconds = 5
[state]
dir = "state"
keep_versions = 5
[localize]
strategy = "dataless"
[localize.params]
sparsity = {SPARSITY}
[stitch]
policy = "average"
[skills]
disabled = {json.dumps(sorted(disabled))}
[serve]
port = {port}
[plugins]
dirs = []
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- files -----------------------------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all, so the daemon's config watcher never reads half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header, from its bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8:8 + n]).get("__metadata__") or {})

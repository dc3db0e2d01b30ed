"""``skillhub convert``: the one explicit route from a PyTorch pickle (``.pt``/``.bin``/``.pth``/``.ckpt``) to
safetensors. Pickles are never opened on the watched path (FAULTS B2).

The pickle is read in a *separate process* with ``torch.load(weights_only=True)``, which refuses to call arbitrary
code (only tensors, containers and primitive types are rebuilt); the child hands back plain tensors, and this
process writes the safetensors file. A checkpoint that needs code to unpickle is refused with a message, never run.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from skillhub.checkpoint import read_tensors, write_safetensors
from skillhub.errors import CheckpointError

_CHILD = r"""
import sys, torch
from skillhub.checkpoint import write_safetensors
src, dst = sys.argv[1], sys.argv[2]
try:
    obj = torch.load(src, map_location="cpu", weights_only=True)
except Exception as e:
    print(f"cannot load safely: {type(e).__name__}: {str(e).splitlines()[0][:300]}", file=sys.stderr)
    sys.exit(3)
for key in ("state_dict", "model", "model_state_dict", "module"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
        obj = obj[key]
        break
if not isinstance(obj, dict):
    print(f"the pickle holds a {type(obj).__name__}, not a state dict", file=sys.stderr)
    sys.exit(4)
tensors = {str(k): v.detach().contiguous() for k, v in obj.items() if isinstance(v, torch.Tensor)}
if not tensors:
    print("the pickle holds no tensors", file=sys.stderr)
    sys.exit(4)
tensors = {k: v.clone() for k, v in tensors.items()}  # tied weights share storage: give each its own bytes
write_safetensors(dst, tensors, {"skillhub.converted_from": src.rsplit("/", 1)[-1]})
"""


def convert(src: str | Path, dst: str | Path, *, timeout: float = 600.0) -> int:
    """Convert a PyTorch pickle to safetensors at ``dst``; return the number of tensors written."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise CheckpointError("no such file", path=src)
    if dst.exists():
        raise CheckpointError("output exists; not overwriting", path=dst, hint="choose another --out or remove it")
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        staged = Path(tmp) / "out.safetensors"
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(staged)], capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["the converter failed"])[-1]
            raise CheckpointError(f"not converted: {reason}", path=src,
                                  hint="only plain state dicts of tensors convert; re-save it with "
                                       "safetensors.torch.save_file from the training code")
        tensors, meta = read_tensors(staged)  # re-validated by our own header check
        write_safetensors(dst, tensors, meta)
    return len(tensors)


"""Dataless localization on an 85M-parameter float32 pair (a CLIP ViT-B/32 image tower's size), side by side with
the floor (read both files and compute τ once) and a naive global ``torch.topk`` over the concatenated model, by the
numpy path (a process that has not loaded numba) and the compiled one (``skillhub.kernels``, which the service
loads at start-up); and
``skillhub localize`` as a user runs it (a whole process: open, validate, provenance hashes, localize, write the
mask), its start-up (the same process importing what it needs and doing nothing) subtracted.

    .venv/bin/python bench/localize.py [--out bench/out] [--sparsity 0.01] [--blocks 12]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakAnon, best_of, write_pair  # noqa: E402

from skillhub import kernels  # noqa: E402
from skillhub.checkpoint import open_checkpoint  # noqa: E402
from skillhub.delta import Provenance  # noqa: E402
from skillhub.localize import LocalizeContext, run_localizer  # noqa: E402
from skillhub.strategies.dataless import Dataless  # noqa: E402
from skillhub.taskvector import TaskVector  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=None, help="folder for the generated checkpoints (default: a temp dir)")
    ap.add_argument("--sparsity", type=float, default=0.01)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp)
        base_path, (ft_path,) = write_pair(folder, 1, args.blocks)
        base, ft = open_checkpoint(base_path), open_checkpoint(ft_path)
        keys = sorted(base)
        tv = TaskVector(base, ft, keys)
        n = tv.numel
        k = math.floor(args.sparsity * n)
        print(f"model: {n / 1e6:.1f}M float32 parameters in {len(keys)} tensors, checkpoint {ft.nbytes / 2**20:.0f} MiB;"
              f" k = {k} ({args.sparsity:.2%}); torch threads = {torch.get_num_threads()}")

        work = torch.empty(max(math.prod(base[key].shape) for key in keys))

        def floor() -> float:
            total = 0.0
            for key in keys:  # read both files and compute tau once, nothing else (no check)
                b = base.tensor(key)
                # into one reused workspace: a fresh tensor each time made the floor swing 14-62 ms between runs
                # (the allocator's fresh pages), which measures the allocator, not the reading
                tau = torch.sub(ft.tensor(key), b, out=work[:b.numel()].view(b.shape))
                total += float(tau[..., :1].sum())  # touch the result so nothing is optimised away
            return total

        def dataless() -> object:
            return run_localizer(Dataless, tv, {"sparsity": args.sparsity}, LocalizeContext(), Provenance())

        def naive() -> torch.Tensor:
            flat = torch.cat([tau.reshape(-1) for _, tau in tv])
            return torch.topk(flat.abs(), k, sorted=False).indices

        floor()  # warm the page cache so every method reads from memory
        with PeakAnon() as m_floor:
            t_floor, _ = best_of(floor, args.repeats)
        with PeakAnon() as m_np:  # a process that has not loaded the compiled pass (a one-off CLI run)
            t_np, _ = best_of(dataless, args.repeats)
        kernels.warm()  # what the service does at start-up (skillhub.job.Workspace)
        with PeakAnon() as m_dl:
            t_dl, delta = best_of(dataless, args.repeats)
        with PeakAnon() as m_naive:
            t_naive, idx = best_of(naive, args.repeats)
        assert delta.nnz == k, (delta.nnz, k)  # type: ignore[attr-defined]
        mask_path = folder / "bench.mask.safetensors"
        delta.save(mask_path)  # type: ignore[attr-defined]
        model_mib = n * 4 / 2**20
        print(f"{'method':<30}{'time s':>9}{'x floor':>9}{'peak extra MiB':>16}")
        for name, t, m in (("floor (read + tau once)", t_floor, m_floor), ("dataless, compiled (service)", t_dl, m_dl),
                           ("dataless, numpy (not loaded)", t_np, m_np), ("naive global torch.topk", t_naive, m_naive)):
            print(f"{name:<30}{t:>9.3f}{t / t_floor:>9.2f}{m.mib:>16.0f}")
        print(f"naive / dataless time: {t_naive / t_dl:.1f}x; one model copy = {model_mib:.0f} MiB")
        print(f"mask file: {mask_path.stat().st_size / 2**20:.2f} MiB = {mask_path.stat().st_size / ft.nbytes:.2%} of"
              f" the checkpoint (nnz {delta.nnz})")  # type: ignore[attr-defined]
        cli_path(folder, base_path, ft_path, args.sparsity, args.repeats, t_floor, t_np - t_dl)


FLOOR_PROCESS = """
import math, sys, time
import torch
from skillhub.checkpoint import open_checkpoint
t = time.perf_counter()
base, ft = open_checkpoint(sys.argv[1]), open_checkpoint(sys.argv[2])
work = torch.empty(max(math.prod(base[key].shape) for key in base))
total = 0.0
for key in sorted(base):
    b = base.tensor(key)
    total += float(torch.sub(ft.tensor(key), b, out=work[:b.numel()].view(b.shape))[..., :1].sum())
print(time.perf_counter() - t)
"""


LOAD_PROCESS = """
import time
import torch
from skillhub import kernels
t = time.perf_counter()
kernels.warm()
print(time.perf_counter() - t)
"""


def cli_path(folder: Path, base_path: Path, ft_path: Path, sparsity: float, repeats: int, t_floor: float,
             t_np_saved: float) -> None:
    """``skillhub localize`` in a fresh process, with a fresh fingerprint store (the first run a user makes), with a
    store that knows the base (a new finetune: every later drop) and one that knows both (the same finetune again,
    at another sparsity), minus the process's own start-up (a process that
    imports what the command imports and does nothing); beside the floor as a fresh process pays it (the same reader
    opening both files, whose pages are in the page cache but not yet mapped, and τ computed once)."""
    exe = [sys.executable, "-m", "skillhub"]
    startup = [sys.executable, "-c", "import skillhub.cli, skillhub.autosparsity, skillhub.checkpoint, "
                                     "skillhub.desired, skillhub.job, skillhub.localize, skillhub.log, skillhub.ops, "
                                     "skillhub.stitch; from skillhub.plugins import load_plugins; load_plugins([])"]
    out = folder / "cli.mask.safetensors"
    cmd = [*exe, "localize", "--base", str(base_path), "--finetuned", str(ft_path), "--out", str(out),
           "--sparsity", str(sparsity)]

    def run(argv: list[str], env: dict[str, str]) -> float:
        t = time.perf_counter()
        subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       cwd=folder)
        return time.perf_counter() - t

    def floor_process() -> float:  # timed inside the process: its imports are not in it
        done = subprocess.run([sys.executable, "-c", FLOOR_PROCESS, str(base_path), str(ft_path)], check=True,
                              capture_output=True, text=True, cwd=folder)
        return float(done.stdout.strip().splitlines()[-1])

    env = {**os.environ, "SKILLHUB_CACHE_DIR": ""}  # memory only: every run hashes both files
    t_start = min(run(startup, env) for _ in range(repeats))
    t_cold = min(run(cmd, env) for _ in range(repeats))
    # A user's later runs: the base's fingerprint is in the store (any earlier run put it there), the new
    # finetune's is not. The store is reset to the base alone before each run.
    env_store = {**os.environ, "SKILLHUB_CACHE_DIR": str(folder / "cache")}
    run([sys.executable, "-c", "from skillhub.fingerprints import fingerprint; from skillhub.checkpoint import "
                               f"open_checkpoint; fingerprint(open_checkpoint({str(base_path)!r}))"], env_store)
    store = folder / "cache" / "fingerprints.json"
    base_only = store.read_text()

    def warm() -> float:
        store.write_text(base_only)
        return run(cmd, env_store)

    t_warm = min(warm() for _ in range(repeats))
    run(cmd, env_store)  # the store now knows the finetune too: the same finetune localized again (another sparsity)
    t_again = min(run(cmd, env_store) for _ in range(repeats))
    t_floor_cold = min(floor_process() for _ in range(repeats))
    from skillhub.atomic import sha256_file  # what a fingerprint hashes (skillhub.fingerprints)

    t_sha, _ = best_of(lambda: sha256_file(ft_path), repeats)
    print(f"\nsha256 of the finetune's file (its fingerprint, as skillhub.fingerprints takes it): {t_sha:.3f} s = "
          f"{t_sha / t_floor:.1f}x the floor")
    t_load = min(float(subprocess.run([sys.executable, "-c", LOAD_PROCESS], check=True, capture_output=True,
                                      text=True, cwd=folder).stdout.split()[-1]) for _ in range(repeats))
    verdict = "a one-off run is faster on numpy" if t_load > t_np_saved else "a one-off run would gain by loading it"
    print(f"loading the compiled path in a fresh process (numba and its disk cache, torch already imported): "
          f"{t_load:.2f} s; the compiled pass saves {t_np_saved:.3f} s on this model: {verdict}")
    print(f"\n`skillhub localize` as users run it (whole process, best of {repeats}; start-up {t_start:.3f} s "
          f"subtracted: a process importing what it imports)")
    print(f"floor as a fresh process pays it (open both files, tau once, imports not counted): {t_floor_cold:.3f} s")
    print(f"{'run':<46}{'time s':>9}{'x floor':>9}{'x fresh floor':>15}")
    for name, t in (("first run (hashes base and finetune)", t_cold - t_start),
                    ("a new finetune (base's hash from the store)", t_warm - t_start),
                    ("the same finetune again (both from the store)", t_again - t_start)):
        print(f"{name:<46}{t:>9.3f}{t / t_floor:>9.2f}{t / t_floor_cold:>15.2f}")


if __name__ == "__main__":
    main()

"""Start-up of the commands a user types most, as whole processes: ``skillhub --help``, ``config check``,
``skills list`` and ``doctor`` on a real state folder with two registered skills (the service not running),
beside ``python -c pass`` and ``import torch`` on the same machine in the same run.

    .venv/bin/python bench/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_SECONDS = 0.5


def timed(argv: list[str], cwd: Path, repeats: int) -> float:
    """Best of ``repeats`` wall-clock seconds of a whole process (checked to succeed)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "SKILLHUB_CACHE_DIR": ""})
        best = min(best, time.perf_counter() - t)
    return best


def make_state(root: Path) -> None:
    """A config, a base and a state folder with two READY skills, made through the library (no service)."""
    import torch

    from skillhub.checkpoint import write_safetensors
    from skillhub.config import load_config
    from skillhub.hub import Hub

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=g)}
    write_safetensors(root / "base.safetensors", base, {})
    (root / "config.toml").write_text('[base]\nweights = "base.safetensors"\n[state]\ndir = "state"\n')
    hub = Hub(load_config(root / "config.toml", env={}))
    hub.start()
    try:
        for name in ("a", "b"):
            write_safetensors(root / f"{name}.safetensors", {"w": base["w"] + 0.01 * torch.randn(64, 64, generator=g)},
                              {})
            hub.ingest(root / f"{name}.safetensors", skill=name)
        hub.reconcile()
    finally:
        hub.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    exe = [sys.executable, "-m", "skillhub"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_state(root)
        rows = [("python -c pass", [sys.executable, "-c", "pass"], None),
                ("python -c 'import torch'", [sys.executable, "-c", "import torch"], None),
                ("skillhub --help", [*exe, "--help"], GOAL_SECONDS),
                ("skillhub skills list", [*exe, "skills", "list"], GOAL_SECONDS),
                ("skillhub doctor", [*exe, "doctor"], GOAL_SECONDS),
                ("skillhub config check", [*exe, "config", "check"], GOAL_SECONDS)]
        print(f"whole processes, best of {args.repeats}; goal: at most {GOAL_SECONDS} s on an idle machine")
        print(f"{'command':<28}{'seconds':>9}  goal")
        for name, argv, goal in rows:
            t = timed(argv, root, args.repeats)
            verdict = "" if goal is None else ("met" if t <= goal else "NOT MET")
            print(f"{name:<28}{t:>9.3f}  {verdict}")


if __name__ == "__main__":
    main()

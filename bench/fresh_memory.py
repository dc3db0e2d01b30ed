"""What memory the machine has not handed out lately costs on first touch, beside memory just freed and touched
again: on a virtual machine whose host backs guest memory lazily (and takes freed pages back), every page of a
fresh allocation costs a host fault, and a staged copy of a drop is that many fresh page-cache pages.

Touches ``--mib`` of anonymous memory that the process has not used (twice as much as the first step asks for, so
that it is not served from pages another process freed a moment ago), then frees and touches the same amount again.

    .venv/bin/python bench/fresh_memory.py [--mib 335] [--hold-gib 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def touch(mib: int) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    a = np.ones(mib << 17)  # 8-byte elements: mib MiB, every page written
    return time.perf_counter() - t, a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=335, help="memory per step (the 85M model's checkpoint: 335 MiB)")
    ap.add_argument("--hold-gib", type=float, default=3.0, help="memory held first, as a service's model is")
    args = ap.parse_args()
    t_hold, held = touch(int(args.hold_gib * 1024))
    t_fresh, a = touch(args.mib)
    del a
    t_again, b = touch(args.mib)
    del b, held
    print(f"held first: {args.hold_gib:.1f} GiB touched in {t_hold:.2f} s ({t_hold / args.hold_gib:.2f} s per GiB)")
    print(f"{args.mib} MiB of fresh memory, first touch: {t_fresh:.3f} s")
    print(f"{args.mib} MiB again, just freed by this process: {t_again:.3f} s ({t_fresh / t_again:.1f}x faster)")


if __name__ == "__main__":
    main()

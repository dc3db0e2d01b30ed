"""The intake's staging of a drop alone (rename into a real inbox → the checked, hashed staged copy handed over):
the part of `bench/loop.py`'s "watch+stage" that the copy costs. Two runs of ``--drops`` drops: in a small process,
then in the same process once it holds as much memory as the service does on the 85M model (``--hold-gib``). Each
staged copy is that many new page-cache pages: whether they land on memory the machine touched lately decides the
time here (`bench/fresh_memory.py` measures what a fresh page costs).

    .venv/bin/python bench/staging.py [--drops 3] [--hold-gib 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_pair  # noqa: E402

from skillhub.drops import Arrival  # noqa: E402
from skillhub.intake import Intake  # noqa: E402


def stage_times(root: Path, sources: list[Path]) -> list[float]:
    """Seconds from each rename into the inbox to the intake's hand-over of the staged copy."""
    inbox, arrived = root / "inbox", threading.Event()
    shutil.rmtree(inbox, ignore_errors=True)
    shutil.rmtree(root / "staging", ignore_errors=True)
    inbox.mkdir(parents=True)

    def on_arrival(a: Arrival) -> None:
        arrived.set()

    intake = Intake(inbox, root / "staging", on_arrival, stable_seconds=1.0)
    intake.start()
    out = []
    try:
        for i, src in enumerate(sources):
            part = inbox / f".drop{i}.part"
            shutil.copyfile(src, part)
            arrived.clear()
            t0 = time.perf_counter()
            os.rename(part, inbox / f"drop{i}.safetensors")
            if not arrived.wait(60):
                raise SystemExit("the intake did not hand the drop over within 60 s")
            out.append(time.perf_counter() - t0)
    finally:
        intake.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--drops", type=int, default=3)
    ap.add_argument("--hold-gib", type=float, default=3.0, help="memory held in the second run (the service's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, sources = write_pair(root / "src", args.drops)
        size = sources[0].stat().st_size
        stage_times(root, sources[:1])  # warm-up: imports and first-call costs in neither figure
        small = stage_times(root, sources)
        held = np.ones(int(args.hold_gib * 2**30) // 8)  # every page written, kept while the second run stages
        big = stage_times(root, sources)
        del held
    print(f"{args.drops} drops of {size / 2**20:.0f} MiB each, renamed into a real inbox; seconds to the staged copy")
    print(f"small process:                  {', '.join(f'{t:.3f}' for t in small)} (median {median(small):.3f})")
    print(f"holding {args.hold_gib:.1f} GiB, as the service: {', '.join(f'{t:.3f}' for t in big)} "
          f"(median {median(big):.3f})")


if __name__ == "__main__":
    main()

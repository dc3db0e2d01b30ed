"""The intake's staging of a drop alone (rename into a real inbox → the checked, hashed staged file handed over):
the part of `bench/loop.py`'s "watch+stage" that staging costs, both ways side by side in one process that holds as
much memory as the service does on the 85M model (``--hold-gib``). **Moved**: nobody holds the drop open, so it is
moved out of the inbox and only hashed (skillhub/taking.py). **Copied**: the dropper still holds it open for writing
(as a writer at work does), so it is copied while hashed; each copy is that many new page-cache pages, and whether
they land on memory the machine touched lately decides its time (`bench/fresh_memory.py`).

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


def stage_times(root: Path, sources: list[Path], *, hold_open: bool) -> tuple[list[float], list[bool]]:
    """Seconds from each rename into the inbox to the intake's hand-over of the staged file, and whether each drop
    was moved (not copied); with ``hold_open`` the dropper keeps each file open for writing until then."""
    inbox, arrived = root / "inbox", threading.Event()
    shutil.rmtree(inbox, ignore_errors=True)
    shutil.rmtree(root / "staging", ignore_errors=True)
    inbox.mkdir(parents=True)
    moved: list[bool] = []

    def on_arrival(a: Arrival) -> None:
        moved.append(a.taken is not None)
        arrived.set()

    intake = Intake(inbox, root / "staging", on_arrival, stable_seconds=1.0)
    intake.start()
    out = []
    try:
        for i, src in enumerate(sources):
            part = inbox / f".drop{i}.part"
            shutil.copyfile(src, part)
            fd = os.open(part, os.O_WRONLY) if hold_open else None
            arrived.clear()
            t0 = time.perf_counter()
            os.rename(part, inbox / f"drop{i}.safetensors")
            if not arrived.wait(60):
                raise SystemExit("the intake did not hand the drop over within 60 s")
            out.append(time.perf_counter() - t0)
            if fd is not None:
                os.close(fd)
    finally:
        intake.stop()
    return out, moved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--drops", type=int, default=3)
    ap.add_argument("--hold-gib", type=float, default=3.0, help="memory held in the second run (the service's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, sources = write_pair(root / "src", args.drops)
        size = sources[0].stat().st_size
        stage_times(root, sources[:1], hold_open=False)  # warm-up: imports and first-call costs in neither figure
        held = np.ones(int(args.hold_gib * 2**30) // 8)  # every page written, kept while both runs stage
        moved, how_m = stage_times(root, sources, hold_open=False)
        copied, how_c = stage_times(root, sources, hold_open=True)
        del held
    if not all(how_m) or any(how_c):
        raise SystemExit(f"expected every drop moved, then every drop copied; got {how_m}, {how_c}")
    print(f"{args.drops} drops of {size / 2**20:.0f} MiB each, renamed into a real inbox, holding {args.hold_gib:.1f} "
          "GiB as the service does; seconds to the staged file")
    print(f"moved (nobody holds it open):   {', '.join(f'{t:.3f}' for t in moved)} (median {median(moved):.3f})")
    print(f"copied (the dropper holds it):  {', '.join(f'{t:.3f}' for t in copied)} (median {median(copied):.3f})")
    print(f"copied / moved:                 {median(copied) / median(moved):.1f}x")


if __name__ == "__main__":
    main()

"""Named fault points for the crash and disk-full tests (FAULTS C1-C4, C8); inert unless a test arms them.

The service calls :func:`reach` at the exact moments a crash or a full disk is most interesting (a half-written mask
file, a mask renamed into place but not yet committed, a version directory made but not yet current, …). Nothing
happens unless the process was started with ``SKILLHUB_FAULTPOINT`` set; the variable is read once, at import, so in
a process a user runs each call is one comparison with ``None``.

``SKILLHUB_FAULTPOINT=<action>:<point>`` arms one point:

- ``stop:<point>``: write ``<point>`` to the file ``SKILLHUB_FAULTPOINT_FILE`` names (the handshake), then stop the
  whole process with SIGSTOP, so that nothing else moves on disk; the test then sends SIGKILL and restarts a fresh
  process on the same state folder.
- ``enospc:<point>``: raise ``OSError(ENOSPC)`` there, as a full disk would (used where the test cannot make a
  small file system: not root, or no tmpfs).
- ``oom:<point>``: raise ``torch.OutOfMemoryError`` there, as a device out of memory would.
- ``kill:<point>``: SIGKILL this process there, as a crashed or OOM-killed localization worker would die. Worker
  processes are started afresh and inherit the variable, so this action fires once across processes: only in the
  process that creates the file ``SKILLHUB_FAULTPOINT_FILE`` names (which it writes ``<point>`` to).

``<point>`` may end in ``*N`` to fire on the N-th time it is reached (``stop:mask_write*2``), and fires once.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

__all__ = ["POINTS", "reach"]

#: Every point the service reaches, in the order a drop passes them.
POINTS = (
    "staging_copy",      # intake: part of a drop copied to staging/ (the copy is a temp file)
    "localize_job",      # job: a localization job starts (on the executor's thread or worker process)
    "mask_write",        # registry: half of a mask file's bytes written to its temp file
    "mask_renamed",      # registry: the mask file renamed into place; its row is not READY yet
    "mask_committed",    # registry: the row is READY; nothing is stitched or published yet
    "stitch",            # hub: the stitcher holds the new masks; the version is not built yet
    "stitch_add",        # hub: about to stitch one mask in (out-of-memory injection point)
    "publish_manifest",  # publisher: a version's manifest is in its temp directory, not renamed yet
    "publish_current",   # publisher: the version directory exists; `current` still names the old version
    "weights_write",     # publisher: half of a version's weights file written to its temp file
)

_ARMED = os.environ.get("SKILLHUB_FAULTPOINT") or None
_lock = threading.Lock()
_seen: dict[str, int] = {}
_fired = False


def _parse(spec: str) -> tuple[str, str, int]:
    action, _, point = spec.partition(":")
    point, _, nth = point.partition("*")
    if action not in ("stop", "enospc", "oom", "kill") or point not in POINTS:
        raise SystemExit(f"SKILLHUB_FAULTPOINT={spec!r}: expected stop|enospc|oom|kill:<point>[*N], point one of "
                         + ", ".join(POINTS))
    return action, point, int(nth or 1)


_SPEC = _parse(_ARMED) if _ARMED else None


def reach(point: str) -> None:
    """Mark that the service is at ``point``; a no-op unless a test armed this point."""
    if _SPEC is None:
        return
    global _fired
    action, armed, nth = _SPEC
    if point != armed:
        return
    with _lock:
        _seen[point] = _seen.get(point, 0) + 1
        if _fired or _seen[point] != nth:
            return
        _fired = True
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {point})")
    if action == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {point})")
    marker = os.environ.get("SKILLHUB_FAULTPOINT_FILE")
    if action == "kill":
        if marker:
            try:
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return  # another process has died here already
            os.write(fd, point.encode())
            os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    if marker:
        with open(marker, "w") as f:
            f.write(point)
    # Directed at this thread, so that it is this thread that starts the group stop on its way back from the
    # system call; and should it still run a moment, it only sleeps: nothing past the point ever executes.
    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    while True:
        time.sleep(3600)

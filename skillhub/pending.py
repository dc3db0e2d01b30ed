"""A drop intake's worker is waiting on, and the arrival rule (DESIGN §4): how long it must stay unchanged.

A drop renamed into the inbox (from inside or outside it) is ready at once: a rename is how a writer says it is done
(FAULTS A2). After a close-write it is ready once it has not changed for :data:`SETTLE_SECONDS`; otherwise once its
signature (mode, size, mtime, ctime and inode of every file, and of a file's sidecar) has not changed for
``stable_seconds``. A folder whose index names shards not there yet waits for them up to the intake's
``shard_timeout_seconds`` (FAULTS A3). A staged copy that looked truncated at the drop's current signature is looked at
again only after :func:`truncated_quiet`, and rejected as truncated once it has stayed so that long.

Only :class:`skillhub.intake.Intake`'s worker thread touches a :class:`Pending`.
"""

from __future__ import annotations

from dataclasses import dataclass

from skillhub.drops import Arrival
from skillhub.watcher import CLOSED, MOVED_IN

SETTLE_SECONDS = 0.1  # quiet time after a close-write event (a move-in needs none)
TICK_SECONDS = 0.25  # longest sleep of the worker while something is pending


def quiet_after(hint: str | None, stable_seconds: float) -> float:
    """How long a drop must stay unchanged after the event ``hint`` before it is read."""
    return 0.0 if hint == MOVED_IN else SETTLE_SECONDS if hint == CLOSED else stable_seconds


def truncated_quiet(stable_seconds: float) -> float:
    """How long a drop whose staged copy looked truncated must stay unchanged: max(5 × ``stable_seconds``, 5 s)."""
    return max(5 * stable_seconds, 5.0)


class Wait(Exception):
    """Keep the drop pending without complaint; look again at ``due``."""

    def __init__(self, due: float) -> None:
        self.due = due


@dataclass
class Pending:
    """A drop the worker has seen and not decided yet: what it last observed of it, and when to look again."""

    name: str
    kind: str = ""
    sig: object = None  # last observed signature of the drop (and its sidecar)
    since: float = 0.0  # monotonic time at which ``sig`` was first observed
    hint: str | None = None  # the last event, if it says more than "changed": CLOSED or MOVED_IN
    due: float = 0.0
    truncated: object = None  # signature at which the staged copy looked truncated
    error: str | None = None  # last transient error logged, so that each is logged once
    held: Arrival | None = None  # staged copy kept across RetryLater while the source is unchanged

    def quiet(self, sig: object, stable_seconds: float) -> float:
        """How long the drop must stay unchanged at signature ``sig`` before it is read (the arrival rule)."""
        return truncated_quiet(stable_seconds) if self.truncated == sig else quiet_after(self.hint, stable_seconds)

    def look_again(self, now: float) -> None:
        """Forget what was seen of the drop (it changed while being read, or a part of it went away); look again
        after a tick."""
        self.sig, self.hint, self.truncated, self.due = None, None, None, now + TICK_SECONDS

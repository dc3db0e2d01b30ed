"""The executor seam: where localization jobs run (DESIGN §7 "Beyond one machine"; ``[executor]``).

A drop's validation and localization (:func:`skillhub.job.run`) is independent of every other drop's and writes
nothing, so it can run anywhere that sees the staged checkpoint and the base. An :class:`Executor` takes a
:class:`~skillhub.job.LocalizeJob` and gives back a :class:`~concurrent.futures.Future` of its
:class:`~skillhub.job.Localized` result; the ingestor (:mod:`skillhub.ingest`), in the daemon's process, registers
what comes back, so the registry keeps one writer whatever runs the jobs.

- :class:`LocalExecutor` (``kind = "local"``, the default) runs the job at once on the caller's thread: the future
  is done when :meth:`~Executor.submit` returns, which is exactly the service's behaviour without a seam.
- :class:`skillhub.rayexec.RayExecutor` (``kind = "ray"``) runs each job as a Ray task; several drops localize at
  once. Ray is imported only then (it is an optional extra).

A job whose worker dies fails its future with :class:`~skillhub.errors.JobLostError`: nothing was stored, and the
drop is localized again. Errors about the drop itself (:class:`~skillhub.errors.SkillhubError`) come back as they
were raised, wherever the job ran.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

from skillhub.config import ExecutorSection
from skillhub.errors import ExecutorError
from skillhub.job import LocalizeJob, Localized, Workspace, WorkspaceSpec
from skillhub.job import run as run_job
from skillhub.log import get_logger

__all__ = ["Executor", "LocalExecutor", "WorkspaceSpec", "make_executor"]
log = get_logger("skillhub.executor")


class Executor(Protocol):
    """Runs localization jobs (:class:`LocalExecutor`, :class:`skillhub.rayexec.RayExecutor`); :meth:`submit`
    never blocks on another job."""

    #: ``[executor] kind`` of this executor
    kind: str = ""

    def submit(self, job: LocalizeJob, *, needs_gpu: bool = False) -> Future[Localized]:
        """Start ``job``; the future gives its result, or raises the :class:`~skillhub.errors.SkillhubError` the
        job raised, or :class:`~skillhub.errors.JobLostError` when its worker died.

        :param needs_gpu: the job's strategy is data-driven (it may reserve ``[executor] num_gpus``).
        """
        ...

    def close(self) -> None:
        """Release the executor's resources (jobs in flight are abandoned; their drops stay pending)."""


class LocalExecutor:
    """Each job runs at once on the caller's thread, against the daemon's own workspace."""

    kind = "local"

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    def close(self) -> None:
        pass

    def submit(self, job: LocalizeJob, *, needs_gpu: bool = False) -> Future[Localized]:
        future: Future[Localized] = Future()
        try:
            future.set_result(run_job(job, self.workspace))
        except Exception as e:  # the caller sees it from future.result(), as if it had run the job itself
            future.set_exception(e)
        return future


def make_executor(section: ExecutorSection, workspace: Workspace, spec: WorkspaceSpec) -> Executor:
    """The executor ``[executor]`` asks for. With ``kind = "ray"``: connects to (or starts) Ray now, so that an
    unreachable cluster stops the start-up with an :class:`~skillhub.errors.ExecutorError` naming
    ``[executor] address``, or, with ``on_unreachable = "local"``, falls back to the local executor."""
    if section.kind == "local":
        return LocalExecutor(workspace)
    try:
        try:
            from skillhub.rayexec import RayExecutor
        except ImportError as e:
            raise ExecutorError(f"[executor] kind = \"ray\", but Ray cannot be imported ({e})", key="executor.kind",
                                hint='install the extra: pip install -e ".[ray]", or set [executor] kind = "local"'
                                ) from e
        return RayExecutor(section, spec)
    except ExecutorError as e:
        if section.on_unreachable != "local":
            raise
        log.error("executor_unreachable", error=str(e), fallback="local")
        return LocalExecutor(workspace)

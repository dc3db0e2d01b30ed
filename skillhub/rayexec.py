"""Localization jobs as Ray tasks (``[executor] kind = "ray"``; :mod:`skillhub.executor` is the seam).

Imported only when the config asks for Ray: ``import skillhub`` and the local executor never import ``ray``.

Each job is one Ray task that reserves ``[executor] num_cpus`` (and ``num_gpus`` for data-driven strategies), reads
the staged checkpoint and the base from the paths the daemon sees (one machine; on a cluster, every node must mount
the same storage at the same paths), and returns the mask, head and examples by value through Ray's object store.
A worker process opens its workspace (plugins, family, base, checked against the served base's fingerprint) once and
keeps it for every later job on the same base. Tasks are not retried by Ray (``max_retries = 0``): a lost worker
comes back as :class:`~skillhub.errors.JobLostError`, and the ingestor decides (the drop stays pending and is
localized again, at most ``[executor] max_job_losses`` times).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
from concurrent.futures import Future
from typing import Any

import ray
import ray.exceptions

from skillhub.config import ExecutorSection
from skillhub.errors import ExecutorError, JobLostError, SkillhubError
from skillhub.job import LocalizeJob, Localized, Workspace, WorkspaceSpec
from skillhub.job import run as run_job
from skillhub.log import get_logger

log = get_logger("skillhub.rayexec")
PROBE_SECONDS = 5.0
WARM_WORKERS = 16  # most workers warmed up at start-up  # how long a cluster address may take to accept a TCP connection at start-up

#: the workspaces of this worker process, by spec (a worker serves one daemon's base, normally one entry)
_WORKSPACES: dict[str, Workspace] = {}
_WORKSPACES_LOCK = threading.Lock()


def _workspace(spec: WorkspaceSpec) -> Workspace:
    key = repr((spec.base.model_dump_json(), spec.base_sha, [str(p) for p in spec.plugin_dirs], spec.device))
    with _WORKSPACES_LOCK:
        ws = _WORKSPACES.get(key)
        if ws is None:
            ws = _WORKSPACES[key] = spec.open()
        return ws


def _task(spec: WorkspaceSpec, job: LocalizeJob) -> tuple[str, Any]:
    """The Ray task: run the job in this worker. A :class:`SkillhubError` is a verdict about the drop, sent back as
    a value (pickled whole, see :meth:`SkillhubError.__reduce__`) rather than through Ray's exception wrapping."""
    try:
        out = run_job(job, _workspace(spec))
    except SkillhubError as e:
        return "error", e
    worker = f"{os.getpid()}@{socket.gethostname()}"
    return "ok", dataclasses.replace(out, worker=worker)


def _warm(spec: WorkspaceSpec) -> str:
    """A task that only opens this worker's workspace (start-up: the first drops then do not pay for it)."""
    _workspace(spec)
    return f"{os.getpid()}@{socket.gethostname()}"


class RayExecutor:
    """Runs each localization job as a Ray task (an :class:`skillhub.executor.Executor`).

    Connects at construction: to the Ray session this process already has (an application that called
    ``ray.init`` itself), else as ``[executor] address`` says. Raises :class:`~skillhub.errors.ExecutorError`
    naming ``[executor] address`` when the cluster cannot be reached.
    """

    kind = "ray"

    def __init__(self, section: ExecutorSection, spec: WorkspaceSpec) -> None:
        self.section, self.spec = section, spec
        self._owns = False
        if not ray.is_initialized():
            self._connect(section.address)
            self._owns = True
        remote = ray.remote(_task)
        self._cpu = remote.options(num_cpus=section.num_cpus, max_retries=0)
        self._gpu = remote.options(num_cpus=section.num_cpus, num_gpus=section.num_gpus, max_retries=0)
        resources = ray.cluster_resources()
        log.info("ray_executor", address=section.address, started_here=self._owns, cpus=resources.get("CPU"),
                 gpus=resources.get("GPU", 0), job_cpus=section.num_cpus, job_gpus=section.num_gpus)
        # As many workers as can run jobs at once open their workspace now, in the background (a worker that cannot
        # see the served base says so in the log before any drop arrives).
        slots = min(WARM_WORKERS, max(1, int(resources.get("CPU", 1) // section.num_cpus)))
        warm = ray.remote(_warm).options(num_cpus=section.num_cpus, max_retries=0)
        for _ in range(slots):
            warm.remote(spec).future().add_done_callback(_warmed)

    def _connect(self, address: str) -> None:
        options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if address == "local":
            options |= {"address": "local", "include_dashboard": False}
        else:
            if address != "auto":
                _probe(address)
            options["address"] = address
        # ray.init replaces SIGTERM's handler (with sys.exit) and installs a C-level crash handler that aborts the
        # process on SIGTERM: the daemon's graceful shutdown (finish the step in flight) needs its own back.
        main = threading.current_thread() is threading.main_thread()
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
        try:
            ray.init(**options)
        except (ConnectionError, RuntimeError, ValueError, OSError) as e:
            raise ExecutorError(f"cannot reach Ray at [executor] address = {address!r}: {e}", key="executor.address",
                                hint='start the cluster (ray start --head) or fix the address; or set [executor] '
                                     'on_unreachable = "local" to localize locally when it is down') from e
        finally:
            for sig, handler in saved.items():
                if handler is not None:
                    signal.signal(sig, handler)

    def submit(self, job: LocalizeJob, *, needs_gpu: bool = False) -> Future[Localized]:
        ref = (self._gpu if needs_gpu and self.section.num_gpus > 0 else self._cpu).remote(self.spec, job)
        out: Future[Localized] = Future()
        ref.future().add_done_callback(lambda f: _settle(out, f, job))
        return out

    def close(self) -> None:
        if self._owns and ray.is_initialized():
            ray.shutdown()


def _warmed(done: Future[str]) -> None:
    try:
        log.debug("ray_worker_warm", worker=done.result())
    except Exception as e:  # the same problem fails the drops' jobs, with their own errors
        log.error("ray_worker_warm_failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _settle(out: Future[Localized], done: Future[tuple[str, Any]], job: LocalizeJob) -> None:
    """Translate a finished Ray task into the job's future."""
    try:
        status, value = done.result()
    except ray.exceptions.RayTaskError as e:  # not a verdict about the drop: a bug, or a torch error, in the job
        cause = getattr(e, "cause", None)
        out.set_exception(cause if isinstance(cause, Exception) else e)
        return
    except Exception as e:  # ray.exceptions.RayError: the worker, its node or the object store went away
        out.set_exception(JobLostError(f"the localization job of {job.skill!r} was lost: {type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else ''}", key=job.skill,
                                       hint="nothing was stored; the drop stays pending and is localized again"))
        return
    if status == "error":
        out.set_exception(value)
    else:
        out.set_result(value)


def _probe(address: str) -> None:
    """Fail fast when nothing listens at ``HOST:PORT`` (``ray.init`` itself would retry for minutes)."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(f"[executor] address = {address!r} is not HOST:PORT, ray://HOST:PORT, \"auto\" or "
                            "\"local\"", key="executor.address", hint="e.g. address = \"10.0.0.5:6379\"")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS):
            pass
    except OSError as e:
        raise ExecutorError(f"cannot reach Ray at [executor] address = {address!r}: {e.strerror or e}",
                            key="executor.address",
                            hint='start the cluster (ray start --head) or fix the address; or set [executor] '
                                 'on_unreachable = "local" to localize locally when it is down') from e

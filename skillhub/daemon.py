"""``skillhub run``: the long-running service, shaped like uvicorn's server: start-up, a main loop, shutdown.

Start-up: load and check the config, take the state-folder lock, recover from a crash, replay the registry into the
stitcher (serving the same version as before a restart), start the HTTP server, start watching the inbox (with a
full rescan). Main loop: coalesce change notifications (a burst of drops becomes one or a few versions), reconcile
and publish, poll ``config.toml`` for edits. Shutdown on SIGTERM/SIGINT: stop taking new work, let the step in
flight finish, stop the server, release the lock. Exit codes: 0 clean shutdown, 1 failure, 2 config error.

``skillhub run --follow`` (``Daemon(config, follow=True)``) runs a read-only replica instead: the hub follows the
primary's published versions (:mod:`skillhub.follow`), the HTTP server serves them, and there is no inbox, no
config reload and no write to the state folder.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from skillhub.config import Config, load_config
from skillhub.errors import ConfigError, DiskFullError, JobLostError, SkillhubError
from skillhub.follow import Follower
from skillhub.heap import limit_malloc_arenas
from skillhub.hub import Hub
from skillhub.log import get_logger
from skillhub.recovery import RECOVERY_STEPS

log = get_logger("skillhub.daemon")
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
COALESCE_SECONDS = 3.0
JOB_POLL_SECONDS = 1.0  # a drop localizing on the executor is looked at again this often, or at once when done


def resolve_token(cfg: Config, *, create: bool = True) -> str:
    """The bearer token: from the environment variable ``[serve] token_env`` names; else, on a loopback bind, a
    random one kept in ``state/token`` (mode 0600, reused across restarts) so that local tools can read it. Without
    ``create`` (a follower, which never writes the state folder) only the primary's existing token file is read."""
    token = os.environ.get(cfg.serve.token_env, "").strip()
    if token:
        return token
    if cfg.serve.host not in LOOPBACK:
        raise ConfigError(f"serving on {cfg.serve.host} needs a token in ${cfg.serve.token_env}", key="serve.token_env",
                          hint=f"export {cfg.serve.token_env}=<a long random string>")
    path = Path(cfg.state.dir) / "token"
    if path.exists():
        return path.read_text().strip()
    if not create:
        raise ConfigError(f"no token: ${cfg.serve.token_env} is not set and the primary has written no {path}",
                          key="serve.token_env", hint=f"export {cfg.serve.token_env} (the primary's token), or "
                                                      "start the primary first")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class Daemon:
    """The service process: a :class:`~skillhub.hub.Hub`, its inbox intake and its HTTP server."""

    def __init__(self, config: Config, *, config_path: Path | None = None, follow: bool = False) -> None:
        self.config = config
        self.follow = follow
        self.config_path = config_path or config.source
        self.should_exit = threading.Event()
        self._changed = threading.Event()
        self._config_stamp = self._stamp()
        self.hub: Hub | None = None
        self.intake: Any = None
        self.server: Any = None
        self._arrived: dict[Path, float] = {}  # staged copy -> when it was first handed over (ingest_seconds)

    # --- life ---------------------------------------------------------------------------------------------------

    def run(self) -> int:
        limit_malloc_arenas()  # before the service's threads exist, so they share two arenas
        self._install_signal_handlers()
        try:
            self.startup()
            self.main_loop()
        except SkillhubError as e:
            log.error("daemon_failed", error=str(e))
            raise
        finally:
            self.shutdown()
            self._restore_signal_handlers()
        return 0

    def startup(self) -> None:
        from skillhub.intake import Intake
        from skillhub.server import Server, create_app

        self.config = cfg = _with_base(self.config)
        # before the hub, so a bad serve config fails before any state is touched
        token = resolve_token(cfg, create=not self.follow)
        self.hub = hub = Hub(cfg, follow=self.follow)
        hub.on_change = self._changed.set
        hub.start()
        if cfg.serve.enabled:
            app = create_app(hub, token=token, health=self.health)
            self.server = Server(app, cfg.serve.host, cfg.serve.port)
            self.server.start()
            log.info("serving", url=f"http://{cfg.serve.host}:{self.server.port}", token_env=cfg.serve.token_env,
                     token_file=str(Path(cfg.state.dir) / "token") if not os.environ.get(cfg.serve.token_env) else None)
        if self.follow:  # the primary watches the inbox; a follower only serves
            log.info("follower_ready", version=hub.current.number if hub.current else None, pid=os.getpid())
            return
        if hub.read_only is not None:  # C5: drops stay in the inbox, untouched, until the registry is restored
            log.error("read_only_mode", reason=hub.read_only, serving=hub.current.number if hub.current else None)
            return
        inbox = Path(cfg.watch.dir)
        inbox.mkdir(parents=True, exist_ok=True)
        self.intake = Intake(inbox, Path(cfg.state.dir) / "staging", self._on_arrival,
                             stable_seconds=cfg.watch.stable_seconds, rescan_seconds=cfg.watch.rescan_seconds,
                             poll=cfg.watch.poll, shard_timeout_seconds=cfg.watch.shard_timeout_seconds,
                             max_bytes=max(4 * hub.base.nbytes, 1 << 20),
                             on_reject=lambda reason: hub.metrics.rejected.inc())
        self.intake.start()
        log.info("daemon_ready", inbox=str(inbox), version=hub.current.number if hub.current else None, pid=os.getpid())

    def main_loop(self) -> None:
        assert self.hub is not None
        next_config_check = 0.0
        while not self.should_exit.is_set():
            if self._changed.wait(0.25):
                self._coalesce()
                self._changed.clear()
                self._reconcile()
            now = time.monotonic()
            if self.hub.retry_at is not None and now >= self.hub.retry_at:  # after disk full (C4) or OOM (C8)
                self._reconcile()
            if now >= next_config_check and not self.follow:  # a follower's config changes need a restart
                next_config_check = now + 1.0
                self._check_config()

    def _coalesce(self) -> None:
        """Let a burst (ten files dropped at once) finish arriving so that it becomes one or a few versions, not
        ten: wait while the intake still has drops queued or in progress, at most ``COALESCE_SECONDS``."""
        # No fixed wait first: a burst's later drops are queued (or being staged) by the time the first is
        # registered, which arriving() sees; a lone drop is reconciled as soon as its hand-over is done. While
        # drops arrive, look again every 10 ms, so the last one's hand-over is not followed by a long sleep.
        # Jobs in flight on the executor are drops arriving too (with the local executor there are none here).
        deadline = time.monotonic() + COALESCE_SECONDS
        while self.intake is not None and (self.intake.arriving() or self.hub is not None and self.hub.localizing()) \
                and time.monotonic() < deadline and not self.should_exit.is_set():
            time.sleep(0.01)

    def _reconcile(self) -> None:
        assert self.hub is not None
        try:
            self.hub.reconcile()
        except SkillhubError as e:
            log.error("reconcile_failed", error=str(e))
        except Exception as e:  # keep serving the old version whatever happens (C8)
            log.exception("reconcile_crashed", error=f"{type(e).__name__}: {e}")

    def shutdown(self) -> None:
        log.info("shutting_down")
        if self.intake is not None:
            self.intake.stop()
        if self.server is not None:
            self.server.stop()
        if self.hub is not None:
            self.hub.close()
        log.info("stopped")

    # --- work ---------------------------------------------------------------------------------------------------

    def _on_arrival(self, arrival: Any) -> None:
        """Intake callback (intake's worker thread): localize and register the drop (named as :meth:`Hub.ingest`
        says, the inbox name last). With an executor that runs jobs elsewhere (Ray), the first call submits the job
        and leaves the drop pending, so that intake goes on to the next drop while this one localizes; the job's end
        pokes the intake, whose next call registers the result."""
        assert self.hub is not None
        from skillhub.intake import RetryLater

        t0 = self._arrived.setdefault(arrival.staged, time.perf_counter())
        try:
            row = self.hub.offer(arrival.staged, default_name=arrival.stem, sha256=arrival.sha256,
                                 sidecar=arrival.sidecar or {}, keep=self.config.state.keep_staged,
                                 on_done=lambda: self.intake.poke(arrival.name))
        except DiskFullError as e:  # C4: nothing was stored; the drop stays pending and is tried again
            log.error("ingest_deferred", error=str(e))
            self._arrived.pop(arrival.staged, None)
            raise RetryLater() from e
        except JobLostError as e:  # its worker died: nothing was stored; localize it again at once
            raise RetryLater("localization job lost", seconds=0.0) from e
        except BaseException:
            self._arrived.pop(arrival.staged, None)
            raise
        if row is None:  # localizing elsewhere; the poke brings it back (the timeout is only a safety net)
            raise RetryLater("localizing", seconds=JOB_POLL_SECONDS)
        self._arrived.pop(arrival.staged, None)
        self.hub.metrics.ingest_seconds.observe(time.perf_counter() - t0)

    def health(self) -> dict[str, Any]:
        assert self.hub is not None
        if self.follow:  # the version served, the one the primary's `current` names, and the lag
            follower = self.hub.reconciler
            return {"role": "follower", "follow": follower.health() if isinstance(follower, Follower) else {}}
        if self.hub.read_only is not None:
            return {"inbox": {"ok": False, "detail": "not watched: the registry is read-only"},
                    "registry": {"ok": False, "detail": f"{self.hub.read_only}; {RECOVERY_STEPS}"}}
        ok, detail = self.intake.health if self.intake is not None else (False, "not started")
        # /healthz needs no token: no absolute paths in it.
        out: dict[str, Any] = {"inbox": {"ok": ok, "detail": detail.replace(str(Path(self.config.watch.dir)),
                                                                             "[watch] dir")}}
        if self.hub.last_error:
            out["last_error"] = self.hub.last_error
        held = dict(self.hub.reconciler.held) if hasattr(self.hub, "reconciler") else {}
        if held:  # which skills the quality gate keeps out of the merged model, and why
            out["held"] = {name: why for name, (_, why) in sorted(held.items())}
        return out

    # --- config reload ------------------------------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = Path(self.config_path).stat() if self.config_path else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size) if st else None

    def _check_config(self) -> None:
        stamp = self._stamp()
        if stamp == self._config_stamp or self.config_path is None:
            return
        self._config_stamp = stamp
        try:
            new = _with_base(load_config(self.config_path))
            assert self.hub is not None
            self.hub.apply_config(new)
        except SkillhubError as e:  # B11: an invalid edit is logged; the running config stays in force
            log.error("config_rejected", path=str(self.config_path), error=str(e))
            return
        self.config = new
        log.info("config_applied", path=str(self.config_path))

    # --- signals ------------------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            self._old_handlers: dict[int, Any] = {}
            return
        self._old_handlers = {sig: signal.signal(sig, self._handle_exit) for sig in HANDLED_SIGNALS}

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)

    def _handle_exit(self, sig: int, frame: FrameType | None) -> None:
        log.info("signal_received", signal=signal.Signals(sig).name)
        self.should_exit.set()


def _with_base(cfg: Config) -> Config:
    """The config with its base model: the built-in demo when ``[base] weights`` is not set (made on first use)."""
    if cfg.base.weights is not None:
        return cfg
    from skillhub.demo import with_demo_base  # only then: the demo's trainer is no part of a configured service

    return with_demo_base(cfg)


def run(config_path: str | None = None) -> int:
    """Run the service on ``config_path`` (``skillhub run`` builds its :class:`Daemon` in the CLI)."""
    cfg = load_config(config_path)
    return Daemon(cfg).run()

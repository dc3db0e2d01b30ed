"""The service under soak (bench/soak.py): ``python -m skillhub run`` as a child process, what its log says, and what
``/proc`` says about its memory, threads and descriptors, sampled every second."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from common import proc_status

TOKEN = "soak-token"
#: Error events the daemon logs for expected faults (rejected drops and edits); any other error is a failure.
EXPECTED_ERRORS = {"config_rejected", "skill_failed"}


def http_client(url: str, timeout: float = 60) -> httpx.Client:
    """An HTTP client of the service with its token (and no proxy from the environment)."""
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=timeout, trust_env=False)


class Service:
    """``python -m skillhub run`` as a child process; its stderr (JSON log lines) goes to ``daemon.log``."""

    def __init__(self, root: Path, port: int, extra_env: dict[str, str] | None = None) -> None:
        self.root, self.port, self.extra_env = root, port, dict(extra_env or {})
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_pos = 0
        self.events: Counter[str] = Counter()  # every log event, by name
        self.errors: Counter[str] = Counter()  # error-level events, by name (expected ones too)
        self.error_samples: list[str] = []  # the first unexpected error lines
        self.plain_lines: list[str] = []  # log lines that are not JSON
        self._log_lock = threading.Lock()

    @staticmethod
    def env() -> dict[str, str]:
        """The environment of the daemon and the CLI: none of the caller's ``SKILLHUB_*``, the soak's token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")}
        env["SKILLHUB_TOKEN"] = TOKEN
        return env

    def start(self, timeout: float = 120.0) -> None:
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([sys.executable, "-m", "skillhub", "run", "--config",
                                          str(self.root / "config.toml")], cwd=self.root,
                                         env=self.env() | self.extra_env, stdout=subprocess.DEVNULL, stderr=logf)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive("starting")
            try:
                with http_client(self.url, timeout=5) as http:
                    if http.get("/readyz").status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the service did not become ready:\n" + self.tail())

    def cli(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """``python -m skillhub ARGS --config config.toml``: a new process, as a user at a shell would run it."""
        return subprocess.run([sys.executable, "-m", "skillhub", *args, "--config", str(self.root / "config.toml")],
                              cwd=self.root, env=self.env(), capture_output=True, text=True, timeout=timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self, what: str) -> None:
        if not self.alive():
            raise RuntimeError(f"the daemon exited ({self.proc.returncode if self.proc else None}) while {what}:\n"
                               + self.tail())

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; the exit code, or None if it had to be killed (or never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def scan_log(self) -> None:
        """Count log events (all) and error-level events (by name) written since the last scan."""
        with self._log_lock:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(self._log_pos)
                    data = f.read()
            except OSError:
                return
            end = data.rfind(b"\n") + 1  # a line still being written is read next time
            self._log_pos += end
            for line in data[:end].splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # not structured: an error only if it looks like one
                    text = line.decode(errors="replace")
                    self.plain_lines.append(text[:300])
                    if any(w in text for w in ("Traceback", "Error", "ERROR", "CRITICAL", "Exception")):
                        self.errors["<plain-text error>"] += 1
                        if len(self.error_samples) < 20:
                            self.error_samples.append(text[:500])
                    continue
                event = str(rec.get("event"))
                self.events[event] += 1
                if rec.get("level") in ("error", "critical", "exception"):
                    self.errors[event] += 1
                    if event not in EXPECTED_ERRORS and len(self.error_samples) < 20:
                        self.error_samples.append(line.decode(errors="replace")[:500])

    def count(self, event: str) -> int:
        """How many times the daemon has logged ``event`` so far."""
        self.scan_log()
        with self._log_lock:
            return self.events[event]

    def status(self) -> dict[str, float] | None:
        """VmRSS, RssAnon, RssFile (MiB), threads and open file descriptors of the daemon, from ``/proc``."""
        try:
            st = proc_status(self.pid)
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return None
        if "VmRSS" not in st:  # a zombie: exited, not yet reaped
            return None
        out: dict[str, float] = {name: st[key] / 1024 for key, name in
                                 (("VmRSS", "rss"), ("RssAnon", "anon"), ("RssFile", "file")) if key in st}
        if "Threads" in st:
            out["threads"] = st["Threads"]
        return out | {"fds": fds}

    def cpu_seconds(self) -> float:
        """User + system CPU time the daemon has used so far."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0


class RssSampler(threading.Thread):
    """The daemon's memory, threads and descriptors (:meth:`Service.status`) every ``every`` seconds, with the
    machine's 1-minute load average."""

    def __init__(self, service: Service, every: float = 1.0) -> None:
        super().__init__(name="soak-rss", daemon=True)
        self.service, self.every = service, every
        self.samples: list[dict[str, float]] = []  # t (seconds since start), rss, anon, file, threads, fds, load
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop_event.is_set():
            st = self.service.status()
            if st is not None:
                self.samples.append(st | {"t": time.monotonic() - self.t0, "load": os.getloadavg()[0]})
            self.stop_event.wait(self.every)

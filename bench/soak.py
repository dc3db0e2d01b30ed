"""Soak test (issue #5): the real service for N minutes under a stream of changes, bad inputs and inference load.

    .venv/bin/python bench/soak.py --minutes 10 --out bench/results/soak.json
    .venv/bin/python bench/soak.py --seconds 35        # the short run CI makes (tests/test_soak.py)
    .venv/bin/python bench/soak.py --minutes 10 --daemon-env MALLOC_ARENA_MAX=2    # diagnosis: other malloc settings

It builds its own small open_clip model (a ViT image tower at 32 px, nothing downloaded), writes a config and starts
``python -m skillhub run`` as a real subprocess on a real inbox, state folder, SQLite registry and HTTP port. Then:

- a **driver** thread takes one step at a time, at random (seeded): new skills; new versions of known skills;
  bursts of drops; corrupt drops (zero bytes, a git-lfs pointer, a truncated file, HTML, wrong tensor shapes, NaN,
  the base itself as a "finetune"); ``config.toml`` edits (disable/enable a skill; invalid edits that must be
  rejected while the daemon keeps running); enable/disable, pin/unpin and remove over HTTP; remove through the CLI;
  re-adding a removed skill's very bytes. Drops arrive written in place, slowly, renamed from a temp name or moved
  in, named by file stem, header metadata or a sidecar. After every step it waits until the served model holds
  exactly the skills (and versions) it should, and every ~20 s it checks the served weights (below);
- **client** threads send predict (multipart and JSON) and embed requests throughout, to skills the driver knows to
  be served, plus deliberate bad requests (unknown skill → 404, unreadable image → 400);
- a **sampler** reads the daemon's VmRSS (and RssAnon, RssFile, threads, open descriptors) from ``/proc/PID`` every
  second.

At the end it checks (and exits 1 if any check fails):

1. no failed request: every answer is 200, or one of the expected 4xx (a 404 for a skill the driver had just taken
   out while the request was in flight, the deliberate 404/400s), counted separately; every prediction's labels
   belong to the skill asked;
2. every READY registry row (SQLite opened read-only) has its mask file, whose sha256 matches; integrity ``ok``;
3. the served weights (``GET /v1/model/weights``) equal an independent float64 stitch, done here from the base file
   and the mask files of the skills in the served manifest: θ₀ + Σ masked τ / max(count, 1), exactly θ₀ where no
   mask is active and outside the image tower;
4. the served skills and versions are what the driver's actions imply; every step was applied in time;
5. every corrupt drop went to ``inbox/.rejected/`` with a reason naming the problem, and never became a skill;
   every invalid config edit was rejected and the daemon kept serving;
6. the daemon's RSS is flat after warm-up (see :data:`soak_checks.RSS_SLOPE_LIMIT`);
7. the daemon logged no crash (``request_crashed``, ``reconcile_crashed``, ``intake_error`` ...), ``skillhub doctor``
   finds the state folder healthy, and SIGTERM stops it with exit code 0.

This file is the command line and the run's sequence; the pieces are its sibling modules: ``soak_world`` (the model,
finetunes, corrupt files and config), ``soak_service`` (the daemon process, its log and ``/proc``), ``soak_inbox``
(how drops arrive), ``soak_driver`` (the steps), ``soak_traffic`` (the clients), ``soak_checks`` (the reference
stitch and the end checks) and ``soak_report`` (the JSON record and the tables).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_checks import WARMUP_FRACTION, Outcome, check_doctor, check_registry, end_checks, rss_summary  # noqa: E402
from soak_driver import Driver  # noqa: E402
from soak_report import report, results  # noqa: E402
from soak_service import RssSampler, Service  # noqa: E402
from soak_traffic import Traffic  # noqa: E402
from soak_world import build_base, config_text, free_port, log  # noqa: E402


def soak(root: Path, seconds: float, clients: int, think: float, seed: int,
         daemon_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Build the world in ``root``, start the service, drive it for ``seconds`` under ``clients`` client threads,
    check everything at the end and stop it; the JSON record of the run (``ok`` false if any check failed, or if
    the soak itself broke down, with the daemon's log tail)."""
    t_start = time.time()
    log(f"building the model in {root}")
    base = build_base(root)
    port = free_port()
    (root / "inbox").mkdir()
    (root / "config.toml").write_text(config_text(port, []))
    service = Service(root, port, daemon_env)
    traffic = Traffic(service.url, clients, think, seed)
    driver: Driver | None = None
    sampler: RssSampler | None = None
    result: dict[str, Any] = {}
    try:
        service.start()
        sampler = RssSampler(service)
        sampler.start()
        log(f"service ready (pid {service.pid}, port {port}); driving for {seconds:.0f} s with {clients} clients")
        driver = Driver(root, service, traffic, base, port, seed)
        traffic.start()
        t0 = time.monotonic()
        cpu0 = service.cpu_seconds()
        driver.run(seconds)
        driver.finish()
        driving = time.monotonic() - t0
        cpu = service.cpu_seconds() - cpu0
        traffic.stop()
        rss_end = sampler.samples[-1]["t"] if sampler.samples else 0.0
        sampler.stop_event.set()
        rss_start = sampler.samples[0]["t"] if sampler.samples else 0.0
        driver.weights_check()  # once more, on the final state
        registry = check_registry(root / "state", {c.sha for c in driver.inbox.corrupt})
        final_model = driver.api.model()
        doctor = check_doctor(service)
        service.scan_log()
        alive = service.alive()
        rc = service.stop()
        service.scan_log()
        rss = rss_summary(sampler.samples, rss_start + WARMUP_FRACTION * (rss_end - rss_start), rss_end)
        outcome = Outcome(driver, service, traffic.summary(driving), rss, registry, doctor, alive, rc, final_model,
                          sampler.samples, base, seed, daemon_env or {}, driving, cpu, time.time() - t_start)
        result = results(outcome, end_checks(outcome))
    except Exception as e:  # noqa: BLE001 - any crash of the soak itself is reported as a failed check
        log(f"soak aborted: {type(e).__name__}: {e}")
        result = {"ok": False, "checks": [{"check": "soak ran to the end", "ok": False,
                                           "detail": f"{type(e).__name__}: {e}"}],
                  "driver_failures": driver.failures if driver else [], "log_tail": service.tail()}
    finally:
        traffic.stop()
        if sampler is not None:
            sampler.stop_event.set()
        if driver is not None:
            driver.close()
        service.stop()
    if not result.get("ok"):
        result["log_tail"] = service.tail(4000)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long to drive the service (default 10)")
    length.add_argument("--seconds", type=float, help="the same in seconds, for short runs")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--clients", type=int, default=4, help="client threads sending requests")
    ap.add_argument("--think-ms", type=float, default=20.0, help="mean pause of a client between requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="work here and keep it (default: a temporary folder, removed)")
    ap.add_argument("--daemon-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the daemon only, for diagnosis (e.g. MALLOC_ARENA_MAX=2)")
    args = ap.parse_args(argv)
    if any("=" not in kv for kv in args.daemon_env):
        ap.error("--daemon-env takes KEY=VALUE")
    daemon_env = dict(kv.split("=", 1) for kv in args.daemon_env)
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes if args.minutes is not None else 10)
    if seconds <= 0 or args.clients < 1:
        ap.error("--minutes/--seconds and --clients must be positive")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=False)
        res = soak(args.workdir, seconds, args.clients, args.think_ms / 1000, args.seed, daemon_env)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="skillhub-soak-"))
        try:
            res = soak(tmp, seconds, args.clients, args.think_ms / 1000, args.seed, daemon_env)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(report(res))
    if not res.get("ok") and res.get("log_tail"):
        print("\ndaemon log tail:\n" + res["log_tail"][-2000:], file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())

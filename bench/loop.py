"""Drop-to-served latency of the real service on an 85M-parameter float32 model, next to localizing that checkpoint
alone, measured in one run, against the goal of issue #9: drop to served <= 1.2 x localization + 0.5 s.

A real `skillhub run` subprocess watches a real inbox; each finetuned checkpoint is written under a temp name and
renamed into place (the moment it is "finished"); the clock stops when `/v1/model` lists the skill. Before each drop
the service is left to finish the previous version's background work (its weights file), so that each figure is
the latency of one drop into an idle service, not of the previous drop's tail; and that drop's checkpoint is
localized alone in this process (the service idle), so that each drop is compared with a localization timed under
the same machine load (a shared machine's load drifts between the start and the end of a run).

    .venv/bin/python bench/loop.py [--skills 3] [--blocks 12] [--stable-seconds 1.0]

With ``--executor ray``: a burst instead (issue #11). The same service twice, with ``[executor] kind = "local"`` and
then ``kind = "ray"`` (``address = "local"``: a Ray started inside the daemon on this machine), each warmed up with one
drop first; then ``--drops`` checkpoints (8) renamed into the inbox at once, and the clock runs from the first rename
until `GET /v1/model` lists all of them. Prints both times and their ratio.

    .venv/bin/python bench/loop.py --executor ray [--drops 8] [--job-cpus 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from statistics import median
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_base, make_finetune, until, vit_b_shapes  # noqa: E402

from skillhub.checkpoint import open_checkpoint, write_safetensors  # noqa: E402
from skillhub.delta import Provenance  # noqa: E402
from skillhub import kernels  # noqa: E402
from skillhub.localize import LocalizeContext, run_localizer  # noqa: E402
from skillhub.strategies.dataless import Dataless  # noqa: E402
from skillhub.taskvector import TaskVector  # noqa: E402

TOKEN = "bench-token"
GOAL_FACTOR, GOAL_SECONDS = 1.2, 0.5  # issue #9: drop to served <= 1.2 x localization + 0.5 s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skills", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--stable-seconds", type=float, default=1.0)
    ap.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="ray: a burst of --drops drops, local executor vs Ray side by side")
    ap.add_argument("--drops", type=int, default=8, help="drops in the burst (--executor ray)")
    ap.add_argument("--job-cpus", type=float, default=1.0, help="[executor] num_cpus of each Ray job")
    ap.add_argument("--poll-ms", type=float, default=5.0, help="how often the client asks GET /v1/model (each ask "
                    "costs the service some CPU: on a 2-core machine, 5 ms polling is felt)")
    args = ap.parse_args()
    if args.executor == "ray":
        return _burst(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_base(vit_b_shapes(args.blocks))
        write_safetensors(root / "base.safetensors", base, {})
        srcs = []
        for i in range(args.skills):
            p = root / f"src{i}.safetensors"
            write_safetensors(p, make_finetune(base, seed=200 + i), {})
            srcs.append(p)
        del base
        b = open_checkpoint(root / "base.safetensors")
        kernels.warm()  # the compiled pass, loaded as the service's workspace loads it at start-up
        _localize_alone(b, srcs[0])  # warm-up: first-call costs are no part of either figure
        times: list[float] = []

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        (root / "config.toml").write_text(
            f'[base]\nweights = "base.safetensors"\n[watch]\ndir = "inbox"\nstable_seconds = {args.stable_seconds}\n'
            f'[state]\ndir = "state"\n[serve]\nport = {port}\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")} | {"SKILLHUB_TOKEN": TOKEN}
        log = open(root / "daemon.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "skillhub", "run", "--config", str(root / "config.toml")],
                                cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=log)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            t_start = time.perf_counter()
            until(lambda: client.get("/readyz").status_code == 200, [proc], 300)
            t_ready = time.perf_counter() - t_start
            (root / "inbox").mkdir(exist_ok=True)
            latencies: list[float] = []
            renamed_at: list[float] = []
            seen_at: list[float] = []
            for i, p in enumerate(srcs):
                _wait_quiet(client, root / "state", proc)
                times.append(_localize_alone(b, p))  # this drop's localization alone, for its ratio
                tmp_name = root / "inbox" / f".skill{i}.safetensors.part"
                shutil.copyfile(p, tmp_name)
                t0 = time.perf_counter()
                renamed_at.append(time.time())
                os.rename(tmp_name, root / "inbox" / f"skill{i}.safetensors")
                until(lambda i=i: f"skill{i}" in (client.get("/v1/model").json().get("skills") or {}), [proc], 300,
                       every=args.poll_ms / 1000)
                latencies.append(time.perf_counter() - t0)
                seen_at.append(time.time())
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            client.close()
            log.close()
            phases = _phases(root / "daemon.log", renamed_at, seen_at)
        goals = [GOAL_FACTOR * t + GOAL_SECONDS for t in times]
        met = sum(lat <= g for lat, g in zip(latencies, goals))
        print(f"model {len(srcs)} drops of {srcs[0].stat().st_size / 2**20:.0f} MiB; "
              f"stable_seconds = {args.stable_seconds} (a rename into place skips it)")
        print(f"service start to ready (85M base, demo-free): {t_ready:.2f} s")
        print(f"localize alone, before each drop:          {', '.join(f'{t:.3f}' for t in times)} s")
        print(f"drop to served, each drop:                 {', '.join(f'{t:.3f}' for t in latencies)} s")
        print(f"drop to served / localize alone:           "
              f"{', '.join(f'{lat / t:.1f}x' for lat, t in zip(latencies, times))} "
              f"(median {median(lat / t for lat, t in zip(latencies, times)):.1f}x)")
        print(f"goal {GOAL_FACTOR} x localize + {GOAL_SECONDS} s:              {', '.join(f'{g:.3f}' for g in goals)} s: "
              f"{'MET' if met == len(goals) else 'MISSED'} ({met} of {len(goals)} drops within it; median drop "
              f"{median(lat - g for lat, g in zip(latencies, goals)):+.3f} s from its goal)")
        print("where the time goes, per drop (from the daemon's log), s:")
        widths = (13, 19, 10, 10, 16, 7)
        print(f"{'drop':>6}{'staged':>8}" + "".join(f"{h:>{w}}" for h, w in zip(
            ("watch+stage", "open+validate+reg", "localize*", "consume", "stitch+publish", "seen"), widths)))
        for i, (how, row) in enumerate(phases):
            print(f"{i:>6}{how:>8}" + "".join(f"{v:>{w}.3f}" for v, w in zip(row, widths)))
        print("staged: moved out of the inbox (nobody held it open: skillhub/taking.py) or copied while hashed; "
              "watch+stage: rename -> staged file checked and hashed (FAULTS A6); "
              "open+validate+reg: staged -> mask durable, less localize*; localize*: as the daemon logs it "
              "(ops.localize_checkpoint: the localizer, whose pass over tau also gives the relative-norm check its "
              "norms); "
              "consume: -> the "
              "drop removed from the inbox; stitch+publish: -> version published; seen: -> GET /v1/model lists it")


def _burst(args: argparse.Namespace) -> None:
    """Local executor vs Ray: time from the first rename of a burst of drops until all of them are served."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_base(vit_b_shapes(args.blocks))
        write_safetensors(root / "base.safetensors", base, {})
        srcs = []
        for i in range(args.drops + 1):  # the first one warms each service up
            p = root / f"src{i}.safetensors"
            write_safetensors(p, make_finetune(base, seed=300 + i), {})
            srcs.append(p)
        size = srcs[0].stat().st_size / 2**20
        del base
        results = {}
        for kind in ("local", "ray"):
            results[kind] = _burst_one(root / kind, root, srcs, kind, args)
        print(f"model {args.drops} drops of {size:.0f} MiB at once (85M-parameter float32 base), after one warm-up "
              f"drop; {os.cpu_count()} CPUs; Ray jobs reserve {args.job_cpus:g} CPU each")
        for kind, r in results.items():
            print(f"{kind:>5}: ready {r['ready']:.2f} s; warm-up drop served {r['warm']:.2f} s; all {args.drops} served "
                  f"{r['all']:.2f} s after the first rename ({r['versions']} versions published on the way); each "
                  f"drop served at {', '.join(f'{t:.2f}' for t in r['each'])} s; localize* per drop (median) "
                  f"{r['localize']:.3f} s")
        print(f"local / ray, time to all served: {results['local']['all'] / results['ray']['all']:.2f}x "
              "(> 1: Ray is faster)")


def _burst_one(root: Path, top: Path, srcs: list[Path], kind: str, args: argparse.Namespace) -> dict[str, Any]:
    root.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    executor = f'[executor]\nkind = "{kind}"\naddress = "local"\nnum_cpus = {args.job_cpus}\n'
    (root / "config.toml").write_text(
        f'[base]\nweights = "{top / "base.safetensors"}"\n[watch]\ndir = "inbox"\n'
        f'stable_seconds = {args.stable_seconds}\n[state]\ndir = "state"\n[serve]\nport = {port}\n{executor}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")} | {"SKILLHUB_TOKEN": TOKEN}
    log = open(root / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "skillhub", "run", "--config", str(root / "config.toml")],
                            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=log)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"})
    inbox = root / "inbox"
    try:
        t_start = time.perf_counter()
        until(lambda: client.get("/readyz").status_code == 200, [proc], 300)
        ready = time.perf_counter() - t_start
        inbox.mkdir(exist_ok=True)

        def served() -> dict[str, Any]:
            return client.get("/v1/model").json().get("skills") or {}

        shutil.copyfile(srcs[0], inbox / ".warm.part")
        t0 = time.perf_counter()
        os.rename(inbox / ".warm.part", inbox / "warm.safetensors")
        until(lambda: "warm" in served(), [proc], 300, every=args.poll_ms / 1000)
        warm = time.perf_counter() - t0
        _wait_quiet(client, root / "state", proc)
        first_version = client.get("/v1/model").json().get("version")
        names = [f"skill{i}" for i in range(1, len(srcs))]
        for name, src in zip(names, srcs[1:]):  # copied before the clock starts: the burst is the renames
            shutil.copyfile(src, inbox / f".{name}.part")
        seen: dict[str, float] = {}
        t0 = time.perf_counter()
        for name in names:
            os.rename(inbox / f".{name}.part", inbox / f"{name}.safetensors")

        def all_served() -> bool:
            now = time.perf_counter() - t0
            for n in served():
                seen.setdefault(n, now)
            return all(n in seen for n in names)

        until(all_served, [proc], 600, every=args.poll_ms / 1000)
        total = time.perf_counter() - t0
        versions = client.get("/v1/model").json().get("version") - first_version
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        client.close()
        log.close()
    localize = [float(rec.get("seconds") or 0.0) for rec in _records(root / "daemon.log", "skill_registered")
                if rec.get("skill") in names]
    return {"ready": ready, "warm": warm, "all": total, "versions": versions,
            "each": sorted(seen[n] for n in names), "localize": median(localize) if localize else float("nan")}


def _records(log_path: Path, event: str) -> list[dict]:
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


def _localize_alone(base: Any, path: Path) -> float:
    """Seconds to localize ``path`` against ``base`` with the service's default strategy, in this process."""
    task = TaskVector(base, open_checkpoint(path), sorted(base))
    t0 = time.perf_counter()
    run_localizer(Dataless, task, {"sparsity": 0.01}, LocalizeContext(), Provenance())
    return time.perf_counter() - t0


def _phases(log_path: Path, renamed_at: list[float],
            seen_at: list[float]) -> list[tuple[str, tuple[float, ...]]]:
    """Per drop, from the daemon's JSON log lines (wall-clock timestamps): how it was staged ("moved" out of the
    inbox or "copied"), and rename -> staged, staged -> registered less the localization, the localization (as
    logged), registered -> consumed, consumed -> published, published -> seen by the client."""
    names = ("drop_staged", "skill_registered", "drop_consumed", "version_published")
    events: dict[str, list[tuple[float, dict]]] = {n: [] for n in names}
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") in events:
            t = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()
            events[rec["event"]].append((t, rec))
    published = events["version_published"][1:]  # the first one is the empty base at start-up
    out = []
    for r, (st, staged), (g, reg), (c, _), (p, _), seen in zip(renamed_at, events["drop_staged"],
                                                          events["skill_registered"], events["drop_consumed"],
                                                          published, seen_at):
        loc = float(reg.get("seconds") or 0.0)
        out.append(("moved" if staged.get("moved") else "copied",
                    (st - r, g - st - loc, loc, max(0.0, c - g), p - max(c, g), seen - p)))
    return out


def _wait_quiet(client: httpx.Client, state: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Wait until the served version's weights file is written (the publisher's background work is done), at most
    ``timeout`` seconds (a service configured not to write weights files is quiet at once)."""
    def written() -> bool:
        version = client.get("/v1/model").json().get("version")
        return version is None or (state / "models" / str(version) / "model.safetensors").exists()

    try:
        until(written, [proc], timeout)
    except TimeoutError:
        pass


if __name__ == "__main__":
    main()

"""Drop-to-served latency of the real service on an 85M-parameter float32 model, next to localizing that checkpoint
alone, measured in one run.

A real `skillhub run` subprocess watches a real inbox; each finetuned checkpoint is written under a temp name and
renamed into place (the moment it is "finished"); the clock stops when `/v1/model` lists the skill.

    .venv/bin/python bench/loop.py [--skills 3] [--blocks 12] [--stable-seconds 1.0]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_base, make_finetune, vit_b_shapes  # noqa: E402

from skillhub.checkpoint import open_checkpoint, write_safetensors  # noqa: E402
from skillhub.delta import Provenance, TaskVector  # noqa: E402
from skillhub.localize import LocalizeContext, run_localizer  # noqa: E402
from skillhub.strategies.dataless import Dataless  # noqa: E402

TOKEN = "bench-token"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skills", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--stable-seconds", type=float, default=1.0)
    args = ap.parse_args()
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
        # Localization alone, on the same files, for the ratio.
        b = open_checkpoint(root / "base.safetensors")
        times = []
        for p in srcs:
            tv = TaskVector(b, open_checkpoint(p), sorted(b))
            t0 = time.perf_counter()
            run_localizer(Dataless, tv, {"sparsity": 0.01}, LocalizeContext(), Provenance())
            times.append(time.perf_counter() - t0)
        t_localize = min(times)

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
            _until(lambda: _ok(client, "/readyz"), proc, 300)
            t_ready = time.perf_counter() - t_start
            (root / "inbox").mkdir(exist_ok=True)
            latencies: list[float] = []
            renamed_at: list[float] = []
            for i, p in enumerate(srcs):
                tmp_name = root / "inbox" / f".skill{i}.safetensors.part"
                shutil.copyfile(p, tmp_name)
                t0 = time.perf_counter()
                renamed_at.append(time.time())
                os.rename(tmp_name, root / "inbox" / f"skill{i}.safetensors")
                _until(lambda i=i: f"skill{i}" in (client.get("/v1/model").json().get("skills") or {}), proc, 300,
                       every=0.005)
                latencies.append(time.perf_counter() - t0)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            client.close()
            log.close()
            phases = _phases(root / "daemon.log", renamed_at)
        best = min(latencies)
        print(f"model {sum(1 for _ in [0])and ''}{len(srcs)} drops of {srcs[0].stat().st_size / 2**20:.0f} MiB; "
              f"stable_seconds = {args.stable_seconds} (a rename into place skips it)")
        print(f"service start to ready (85M base, demo-free): {t_ready:.2f} s")
        print(f"localize alone (best of {len(times)}):          {t_localize:.3f} s")
        print(f"drop to served, each drop:                 {', '.join(f'{t:.3f}' for t in latencies)} s")
        print(f"drop to served / localize alone (best):    {best / t_localize:.1f}x")
        print("where the time goes, per drop (from the daemon's log):")
        print(f"{'drop':>6}{'watch+settle+stage':>20}{'validate+localize+register':>28}{'stitch+publish':>16}")
        for i, (a, b, c) in enumerate(phases):
            print(f"{i:>6}{a:>20.3f}{b:>28.3f}{c:>16.3f}")
        print("stage = copy the drop out of the inbox while hashing it (sha256) and fsync (FAULTS A6)")


def _phases(log_path: Path, renamed_at: list[float]) -> list[tuple[float, float, float]]:
    """(rename → staged, staged → registered, registered → published) per drop, from the JSON log lines."""
    import json
    from datetime import datetime

    events: dict[str, list[float]] = {"drop_staged": [], "skill_registered": [], "version_published": []}
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") in events:
            events[rec["event"]].append(datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp())
    published = events["version_published"][1:]  # the first one is the empty base at start-up
    return [(s - r, g - s, p - g) for r, s, g, p in zip(renamed_at, events["drop_staged"],
                                                       events["skill_registered"], published)]


def _ok(client: httpx.Client, route: str) -> bool:
    try:
        return client.get(route).status_code == 200
    except httpx.HTTPError:
        return False


def _until(cond, proc: subprocess.Popen[bytes], timeout: float, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited with {proc.returncode}")
        try:
            if cond():
                return
        except httpx.HTTPError:
            pass
        time.sleep(every)
    raise SystemExit("timed out")


if __name__ == "__main__":
    main()

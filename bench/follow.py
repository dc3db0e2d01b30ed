"""Follower lag: the primary publishes a version -> a follower (`skillhub run --follow`) serves it, median and max over
20 versions, on an 85M-parameter float32 model (issue #11).

A real primary `skillhub run` and a real follower `skillhub run --follow` share one state folder. A few skills are
dropped first (renamed into the inbox); then each version is made by disabling or enabling one skill through the
primary's API, so every version changes one mask (the follower replays one remove or one add). "Published" is the
moment the primary moved `state/models/current` (that file's mtime); "served" is the first answer of the follower's
`GET /v1/model` that names the new version (asked every `--poll-ms`). The follower's own figure (from the same mtime
to its switch, in `/healthz`) is printed beside it, and its apply time (masks read and checked, stitched, snapshot)
from `/metrics`. Before each version both services are left to finish the previous one's background work (the
primary's weights file), so each figure is one version into idle services. For comparison: when the primary's
weights file of each version is complete, and what reading one costs: a replica that loaded weights files could
not serve sooner than the sum (a follower never reads them).

    .venv/bin/python bench/follow.py [--versions 20] [--skills 4] [--blocks 12] [--poll-seconds 0.1]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import httpx
from safetensors.torch import load as load_safetensors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_base, make_finetune, until, vit_b_shapes  # noqa: E402

from skillhub.checkpoint import write_safetensors  # noqa: E402

TOKEN = "bench-token"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--versions", type=int, default=20)
    ap.add_argument("--skills", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--poll-seconds", type=float, default=0.1, help="the follower's [follow] poll_seconds")
    ap.add_argument("--poll-ms", type=float, default=2.0, help="how often this client asks the follower")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_base(vit_b_shapes(args.blocks))
        params = sum(t.numel() for t in base.values())
        write_safetensors(root / "base.safetensors", base, {})
        for i in range(args.skills):
            write_safetensors(root / f"src{i}.safetensors", make_finetune(base, seed=300 + i), {})
        del base
        ports = [_free_port(), _free_port()]
        (root / "config.toml").write_text(
            f'[base]\nweights = "base.safetensors"\n[watch]\ndir = "inbox"\n[state]\ndir = "state"\n'
            f'[serve]\nport = {ports[0]}\n[follow]\npoll_seconds = {args.poll_seconds}\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")} | {"SKILLHUB_TOKEN": TOKEN}
        procs, logs, clients = [], [], []
        try:
            for n, extra in enumerate([(), ("--follow", "--port", str(ports[1]))]):
                logs.append(open(root / f"service{n}.log", "wb"))
                procs.append(subprocess.Popen([sys.executable, "-m", "skillhub", "run", "--config",
                                               str(root / "config.toml"), *extra], cwd=root, env=env,
                                              stdout=subprocess.DEVNULL, stderr=logs[-1]))
                clients.append(httpx.Client(base_url=f"http://127.0.0.1:{ports[n]}", timeout=60,
                                            headers={"Authorization": f"Bearer {TOKEN}"}))
                until(lambda: clients[-1].get("/readyz").status_code == 200, procs, 300)
                if n == 0:  # the skills first, so that the follower starts on a version with masks in it
                    (root / "inbox").mkdir(exist_ok=True)
                    for i in range(args.skills):
                        shutil.copyfile(root / f"src{i}.safetensors", root / "inbox" / f".s{i}.part")
                        os.rename(root / "inbox" / f".s{i}.part", root / "inbox" / f"s{i}.safetensors")
                    until(lambda: len(_model(clients[0]).get("skills") or {}) == args.skills, procs, 600)
            primary, follower = clients
            models = root / "state" / "models"
            seen, own, masks, files = [], [], [], []
            applied = _applied(follower)  # the start-up version's apply is no part of the figure
            enabled = set(range(args.skills))
            for v in range(args.versions):
                number = _model(primary)["version"]
                until(lambda: _model(follower).get("version") == number, procs, 60)
                until(lambda: (models / str(number) / "model.safetensors").exists(), procs, 120)  # primary quiet
                skill = v % args.skills
                action = "disable" if skill in enabled else "enable"
                enabled ^= {skill}
                r = primary.post(f"/v1/skills/s{skill}/{action}")
                r.raise_for_status()
                until(lambda: _current(models) not in (None, number), procs, 60, every=0.0005)
                new = _current(models)
                published = (models / "current").stat().st_mtime
                until(lambda: _model(follower).get("version") == new, procs, 60, every=args.poll_ms / 1000)
                seen.append(time.time() - published)
                own.append(float(follower.get("/healthz").json()["follow"]["lag_seconds"]))
                masks.append(_model(primary)["skills"].get(f"s{skill}", {}).get("nnz") or 0)
                weights_file = models / str(new) / "model.safetensors"
                until(weights_file.exists, procs, 120)
                files.append(weights_file.stat().st_mtime - published)
            after = _applied(follower)
            apply_sum, apply_count = after[0] - applied[0], after[1] - applied[1]
            last = _model(primary)["version"]
            weights = models / str(last) / "model.safetensors"
            until(weights.exists, procs, 120)
            t0 = time.perf_counter()
            load_safetensors(weights.read_bytes())  # read and copied into tensors, as a follower would have to
            full_read = time.perf_counter() - t0
            size = weights.stat().st_size
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            for c in clients:
                c.close()
            for f in logs:
                f.close()
        mask_nnz = max(masks) if masks else 0
        print(f"model {params / 1e6:.1f}M float32 parameters; {args.skills} skills at 1 % "
              f"({mask_nnz} entries per mask); {args.versions} versions, each disabling or enabling one skill on the "
              f"primary; follower poll_seconds = {args.poll_seconds}, client poll {args.poll_ms} ms")
        print(f"primary publishes -> follower serves (client-observed): median {median(seen) * 1000:.1f} ms, "
              f"max {max(seen) * 1000:.1f} ms")
        print(f"primary publishes -> follower switches (its /healthz):  median {median(own) * 1000:.1f} ms, "
              f"max {max(own) * 1000:.1f} ms")
        print(f"follower apply per version (masks read + sha256 checked, stitched, snapshot; /metrics): "
              f"mean {apply_sum / max(apply_count, 1) * 1000:.1f} ms over {apply_count:.0f} versions")
        print(f"for comparison, the primary's weights file of each version is complete (written in the background "
              f"after a quiet moment) at: median {median(files) * 1000:.0f} ms, max {max(files) * 1000:.0f} ms; "
              f"reading one ({size / 2**20:.0f} MiB, page cache warm): {full_read * 1000:.0f} ms")
        print("each version, client-observed ms: " + ", ".join(f"{s * 1000:.0f}" for s in seen))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _current(models: Path) -> int | None:
    try:
        return int((models / "current").read_text().strip())
    except (OSError, ValueError):
        return None


def _model(client: httpx.Client) -> dict:
    return client.get("/v1/model").json()


def _applied(client: httpx.Client) -> tuple[float, float]:
    """The follower's total apply seconds and versions applied so far (its /metrics histogram)."""
    text = client.get("/metrics").text
    return _metric(text, "skillhub_follow_apply_seconds_sum"), _metric(text, "skillhub_follow_apply_seconds_count")


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


if __name__ == "__main__":
    main()

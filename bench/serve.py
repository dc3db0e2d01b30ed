"""Inference throughput over real HTTP with and without dynamic batching, measured side by side in one run.

A Hub with the open_clip family (an EfficientNet-Lite0 image tower at 64 px, `skillhub.demo.tower`) serves one skill;
K client threads send single-image predict requests for a fixed time, first with batching off (max_batch = 1), then
on (max_batch = 32, wait 5 ms). Both runs use the same server code, port type and images.

    .venv/bin/python bench/serve.py [--clients 16] [--seconds 15]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

from skillhub.checkpoint import write_safetensors
from skillhub.config import load_config
from skillhub.hub import Hub
from skillhub.server import Server, create_app

TOKEN = "bench"


def make_world(root: Path) -> None:
    from skillhub.demo.tower import build_clip, clip_config

    (root / "clip.json").write_text(json.dumps(clip_config(64)))
    model = build_clip(64)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_safetensors(root / "base.safetensors", sd, {})
    g = torch.Generator().manual_seed(1)
    ft = {k: (v + 1e-3 * torch.randn(v.shape, generator=g) if k.startswith("visual.") and v.is_floating_point()
              else v) for k, v in sd.items()}
    ft["skillhub.head.weight"] = torch.nn.functional.normalize(torch.randn(10, 1280, generator=g), dim=-1)
    write_safetensors(root / "skill.safetensors", ft, {"skillhub.classes": json.dumps([str(i) for i in range(10)])})


def run(root: Path, max_batch: int, clients: int, seconds: float) -> tuple[float, int, float]:
    (root / f"config-{max_batch}.toml").write_text(
        f'[base]\nfamily = "open_clip"\nmodel = "clip.json"\nweights = "base.safetensors"\n'
        f'[state]\ndir = "state-{max_batch}"\n[watch]\ndir = "inbox"\n'
        f'[serve]\nport = 0\nmax_batch = {max_batch}\nbatch_wait_ms = 5.0\nmax_concurrency = 256\n')
    hub = Hub(load_config(root / f"config-{max_batch}.toml", env={}))
    hub.start()
    hub.ingest(root / "skill.safetensors", skill="digits")
    hub.reconcile()
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(buf, format="PNG")
    img = buf.getvalue()
    server = Server(create_app(hub, token=TOKEN), "127.0.0.1", 0)
    server.start()
    done, failed = [0], [0]
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/skills/digits/predict", files=[("images", ("x.png", img, "image/png"))])
                with lock:
                    if r.status_code == 200:
                        done[0] += 1
                    else:
                        failed[0] += 1

    # Warm up (build the runtime) before the clock starts.
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        c.post("/v1/skills/digits/predict", files=[("images", ("x.png", img, "image/png"))])
    batches0 = hub.engine.batches
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    batches = hub.engine.batches - batches0
    server.stop()
    hub.close()
    return done[0] / elapsed, failed[0], done[0] / max(batches, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_world(root)
        print(f"{args.clients} concurrent clients, 1 image per request, {args.seconds:.0f} s each, "
              f"torch threads {torch.get_num_threads()}")
        rows = []
        for max_batch in (1, 32):
            rps, failed, per_batch = run(root, max_batch, args.clients, args.seconds)
            rows.append((max_batch, rps, failed, per_batch))
        print(f"{'max_batch':>10}{'requests/s':>12}{'failed':>8}{'images/batch':>14}")
        for mb, rps, failed, per_batch in rows:
            print(f"{mb:>10}{rps:>12.1f}{failed:>8}{per_batch:>14.1f}")
        print(f"batched / unbatched throughput: {rows[1][1] / rows[0][1]:.2f}x")
    sys.exit(0)


if __name__ == "__main__":
    main()

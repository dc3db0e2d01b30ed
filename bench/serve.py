"""Serving benchmarks, each measured side by side in one run (ratios, not absolute times, are what carry over on a
shared machine):

1. **Dynamic batching**: inference throughput over real HTTP with batching off (max_batch = 1) and on (max_batch =
   32, wait 5 ms), on the merged model (``route=merged``). A Hub with the open_clip family (an EfficientNet-Lite0
   image tower at 64 px, `skillhub.demo.tower`) serves one skill; K client threads send single-image predict
   requests for a fixed time.
2. **Skill-routed throughput** (issue #10: 4 skills interleaved ≥ 70% of one skill): the max_batch-32 Hub of (1)
   serves 4 skills; the same K clients send one-image predicts (a) all to one skill on ``route=skill``, (b)
   round-robin over the 4 skills on ``route=skill``, (c) round-robin over the 4 on ``route=merged``. The phases
   take turns in ``--rounds`` slices so that load from other jobs falls on all of them alike. The inference
   worker's batches and its ``SkillPatcher.use`` calls are timed (wrapped, not changed) to show where time goes.
3. **Skill switch cost** (issue #10: ≤ 2× one stitcher add of the same mask): on an 85M-parameter float32 model of
   CLIP ViT-B/32's shapes, ``SkillPatcher.use`` switching between two different 1% masks (restore θ₀ where the
   last mask was, patch the next one in) next to ``Stitcher.add`` of the same masks (average policy, float64
   accumulators, as the service stitches), interleaved, best of ``--repeats``.

    .venv/bin/python bench/serve.py [--clients 16] [--seconds 15] [--rounds 5] [--skills 4] [--repeats 7]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import cycle
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_base, vit_b_shapes
from stitch import random_delta

from skillhub.checkpoint import write_safetensors
from skillhub.config import load_config
from skillhub.families import Runtime
from skillhub.hub import Hub
from skillhub.placement import synchronize
from skillhub.plugins import load_plugins
from skillhub.routing import SkillPatcher
from skillhub.server import Server, create_app
from skillhub.stitch import Stitcher

TOKEN = "bench"


# --- 3. switch cost on the 85M model ----------------------------------------------------------------------------


class TensorsRuntime(Runtime):
    """A Runtime that is only its tensors: what the patcher writes into. No forward pass is run or measured."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = dict(tensors)

    def tensors(self) -> Mapping[str, torch.Tensor]:
        return self._tensors


def best(fn: Callable[[], object], repeats: int) -> float:
    """The shortest wall time of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def switch_cost(density: float, repeats: int) -> None:
    shapes = vit_b_shapes(12)
    base = make_base(shapes)
    n = sum(t.numel() for t in base.values())
    masks = [random_delta(shapes, density, seed) for seed in (1, 2)]
    patcher = SkillPatcher(TensorsRuntime({k: v.clone() for k, v in base.items()}))
    stitcher = Stitcher(base, load_plugins([], entry_points=False).make_policy("average"), device="auto")
    turn = cycle([("b", masks[1]), ("a", masks[0])])
    patcher.use("a", masks[0])  # warm: the first switch has no restore, every later one does

    def switch() -> None:
        patcher.use(*next(turn))

    # Interleaved, one switch then one add, so both see the same load from other jobs.
    t_switch, t_add = float("inf"), float("inf")
    for i in range(repeats):
        t_switch = min(t_switch, best(switch, 1))
        delta = masks[i % 2]
        synchronize(stitcher.device)  # CUDA runs asynchronously: time the work, not its queuing
        t0 = time.perf_counter()
        stitcher.add("x", delta)
        synchronize(stitcher.device)
        t_add = min(t_add, time.perf_counter() - t0)
        stitcher.remove("x")  # untimed: the next add starts from the same empty stitcher
    patcher.restore()
    assert all(torch.equal(patcher.runtime.tensors()[k], base[k]) for k in base), "restore is not bit-exact"
    print(f"\nswitch cost: {n / 1e6:.1f}M float32 params (CLIP ViT-B/32 shapes), masks of {masks[0].nnz} entries "
          f"({density:.0%}, random, per tensor), best of {repeats}, device {stitcher.device}; the patcher's "
          f"runtime is a bench stand-in that only holds the tensors (the patch is measured, not a forward pass); "
          f"the stitcher holds no snapshot (no copy on write)")
    print(f"{'operation':<52}{'ms':>9}")
    print(f"{'SkillPatcher.use, switch between 2 masks':<52}{t_switch * 1e3:>9.2f}")
    print(f"{'Stitcher.add of the same mask (average, float64)':<52}{t_add * 1e3:>9.2f}")
    print(f"switch / add: {t_switch / t_add:.2f}x (goal <= 2x: {'met' if t_switch <= 2 * t_add else 'NOT met'})")


# --- 1 and 2. throughput over HTTP -----------------------------------------------------------------------------


def make_world(root: Path, skills: int) -> None:
    """The open_clip base, and ``skills`` finetunes of it, each with its own noise and head."""
    from skillhub.demo.tower import build_clip, clip_config

    (root / "clip.json").write_text(json.dumps(clip_config(64)))
    model = build_clip(64)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_safetensors(root / "base.safetensors", sd, {})
    for i in range(skills):
        g = torch.Generator().manual_seed(1 + i)
        # BN running statistics stay θ₀'s (noise could make a variance negative: NaN outputs, which the smoke
        # check's probe batch refuses)
        ft = {k: (v + 1e-3 * torch.randn(v.shape, generator=g) if k.startswith("visual.") and v.is_floating_point()
                  and "running_" not in k else v) for k, v in sd.items()}
        ft["skillhub.head.weight"] = torch.nn.functional.normalize(torch.randn(10, 1280, generator=g), dim=-1)
        write_safetensors(root / f"skill{i}.safetensors", ft,
                          {"skillhub.classes": json.dumps([str(c) for c in range(10)])})


class Served:
    """A Hub serving ``skills`` skills over the real uvicorn server, and a load generator against it."""

    def __init__(self, root: Path, max_batch: int, skills: int, clients: int) -> None:
        (root / f"config-{max_batch}.toml").write_text(
            f'[base]\nfamily = "open_clip"\nmodel = "clip.json"\nweights = "base.safetensors"\n'
            f'[state]\ndir = "state-{max_batch}"\n[watch]\ndir = "inbox"\n'
            f'[serve]\nport = 0\nmax_batch = {max_batch}\nbatch_wait_ms = 5.0\nmax_concurrency = 256\n')
        self.hub = Hub(load_config(root / f"config-{max_batch}.toml", env={}))
        self.hub.start()
        self.names = [f"skill{i}" for i in range(skills)]
        for i, name in enumerate(self.names):
            self.hub.ingest(root / f"skill{i}.safetensors", skill=name)
        self.hub.reconcile()
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (120, 30, 200)).save(buf, format="PNG")
        self.img = buf.getvalue()
        self.server = Server(create_app(self.hub, token=TOKEN), "127.0.0.1", 0)
        self.server.start()
        self.clients = clients
        self.totals: dict[str, list[float]] = {}

    def post(self, c: httpx.Client, skill: str, route: str) -> int:
        return c.post(f"/v1/skills/{skill}/predict", files=[("images", ("x.png", self.img, "image/png"))],
                      data={"route": route}).status_code

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

    def warm(self, routes: Sequence[str]) -> None:
        """Build every runtime and read every mask before any clock starts; then time the inference worker."""
        with self.client() as c:
            for route in routes:
                for name in self.names:
                    assert self.post(c, name, route) == 200, (name, route)
        engine = self.hub.engine
        if "skill" in routes:
            engine.patcher().use = self.timed(engine.patcher().use, "patch")  # type: ignore[method-assign]
        if not hasattr(self, "seconds"):
            self.seconds = {"busy": 0.0, "patch": 0.0}
            engine._embed_group = self.timed(engine._embed_group, "busy")  # type: ignore[method-assign]

    def timed(self, fn: Callable[..., Any], what: str) -> Callable[..., Any]:
        """``fn``, adding its wall time to ``self.seconds[what]`` (only the worker thread calls these two)."""

        def wrapper(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[what] += time.perf_counter() - t0

        return wrapper

    def phase(self, label: str, skills: Sequence[str], route: str, seconds: float) -> None:
        """K clients for ``seconds``, client i sending to skills[(i + j) % len] on its j-th request."""
        done, failed = [0], [0]
        lock = threading.Lock()
        stop = threading.Event()

        def run(i: int) -> None:
            with self.client() as c:
                j = i
                while not stop.is_set():
                    ok = self.post(c, skills[j % len(skills)], route) == 200
                    j += 1
                    with lock:
                        done[0] += ok
                        failed[0] += not ok

        engine = self.hub.engine

        def counters() -> tuple[int, int, float, float]:
            # the skill route's patcher exists once a skill-route request ran
            switches = engine.patcher().switches if route == "skill" else 0
            return engine.batches, switches, self.seconds["busy"], self.seconds["patch"]

        before = counters()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(self.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        row = self.totals.setdefault(label, [0.0] * 7)
        for k, v in enumerate((elapsed, done[0], failed[0], *(b - a for a, b in zip(before, counters())))):
            row[k] += v

    def result(self, label: str) -> tuple[float, int, float, float, float, float]:
        """requests/s, failed, images per forward pass, patcher switches per second, share of the wall time the
        inference worker was busy, and share it spent switching skills."""
        elapsed, done, failed, batches, switches, busy, patch = self.totals[label]
        return (done / elapsed, int(failed), done / max(batches, 1), switches / elapsed, busy / elapsed,
                patch / elapsed)

    def close(self) -> None:
        self.server.stop()
        self.hub.close()


def patch_ms(served: Served, repeats: int) -> float:
    """One switch of the served tower's patcher between two of its skills' masks (server idle)."""
    engine = served.hub.engine
    version = served.hub.current
    assert version is not None
    shas = [str(engine.route_mask(version, name, "skill")) for name in served.names[:2]]
    patcher = engine.patcher()
    patcher.use(shas[1], engine.masks.get(shas[1]))  # so that every timed call is a real switch
    turn = cycle(shas)

    def switch() -> None:
        sha = next(turn)
        patcher.use(sha, engine.masks.get(sha))

    return best(switch, repeats) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15.0, help="per throughput row (all rounds together)")
    ap.add_argument("--rounds", type=int, default=5, help="slices the routed phases take turns in")
    ap.add_argument("--skills", type=int, default=4)
    ap.add_argument("--density", type=float, default=0.01, help="mask density of the switch-cost benchmark")
    ap.add_argument("--repeats", type=int, default=7, help="best of this many switches and adds")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_world(root, args.skills)
        print(f"{args.clients} concurrent clients, 1 image per request, {args.seconds:g} s per row, "
              f"torch threads {torch.get_num_threads()}")

        # 1. dynamic batching, route=merged, one skill
        rows: list[tuple[int, float, int, float]] = []
        for max_batch in (1, 32):
            served = Served(root, max_batch, args.skills, args.clients)
            served.warm(["merged"])
            served.phase("batching", served.names[:1], "merged", args.seconds)
            rps, failed, per_batch, *_ = served.result("batching")
            rows.append((max_batch, rps, failed, per_batch))
            if max_batch == 1:
                served.close()
        print("\ndynamic batching (route=merged, 1 skill)")
        print(f"{'max_batch':>10}{'requests/s':>12}{'failed':>8}{'images/batch':>14}")
        for mb, rps, failed, per_batch in rows:
            print(f"{mb:>10}{rps:>12.1f}{failed:>8}{per_batch:>14.1f}")
        print(f"batched / unbatched throughput: {rows[1][1] / rows[0][1]:.2f}x")

        # 2. skill routing, on the max_batch-32 hub of (1)
        served.warm(["skill"])
        phases = [("(a) route=skill, 1 skill", served.names[:1], "skill"),
                  (f"(b) route=skill, {args.skills} skills round-robin", served.names, "skill"),
                  (f"(c) route=merged, {args.skills} skills round-robin", served.names, "merged")]
        for _ in range(args.rounds):
            for label, skills, route in phases:
                served.phase(label, skills, route, args.seconds / args.rounds)
        switch = patch_ms(served, args.repeats)
        served.close()
        print(f"\nskill routing (max_batch 32, wait 5 ms; {args.rounds} rounds taking turns; switches/s = "
              f"SkillPatcher switches; worker = share of the wall time the inference worker ran batches, patch = "
              f"the share it spent switching skills in SkillPatcher.use)")
        print(f"{'phase':<42}{'requests/s':>12}{'failed':>8}{'images/batch':>14}{'switches/s':>12}{'worker':>8}"
              f"{'patch':>7}")
        res = {label: served.result(label) for label, _, _ in phases}
        for label, (rps, failed, per_batch, sw, busy, patch) in res.items():
            print(f"{label:<42}{rps:>12.1f}{failed:>8}{per_batch:>14.1f}{sw:>12.1f}{busy:>8.0%}{patch:>7.0%}")
        (a, b, c) = (res[label][0] for label, _, _ in phases)
        print(f"one switch on this tower (best of {args.repeats}, idle): {switch:.2f} ms")
        print(f"(b) / (a): {b / a:.2f} (goal >= 0.70: {'met' if b >= 0.7 * a else 'NOT met'}); "
              f"(b) / (c): {b / c:.2f}")

        # 3. switch cost on the 85M model (last: its 2 GB of tensors are not held during the HTTP runs)
        switch_cost(args.density, args.repeats)
    sys.exit(0)


if __name__ == "__main__":
    main()

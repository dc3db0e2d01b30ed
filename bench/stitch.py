"""Incremental stitching on an 85M-parameter float32 model: the cost of adding the 1st and the 16th skill (and of
removing one) next to a full rebuild of 16 skills, measured in one run.

    .venv/bin/python bench/stitch.py [--skills 16] [--density 0.01] [--blocks 12] [--dense]

``--dense`` gives every mask in the dense form (values for every entry, 0 outside the mask, no indices), what
``localize --sparsity 1.0`` makes: ``--density 1 --dense --policy sum`` is task arithmetic.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_base, vit_b_shapes

from skillhub.delta import SparseDelta
from skillhub.placement import synchronize
from skillhub.plugins import load_plugins
from skillhub.sections import StitchSection
from skillhub.stitch import Stitcher, resolve_device, service_layout
from skillhub.stitchstate import DENSE_SHARE


def random_delta(shapes: dict[str, tuple[int, ...]], density: float, seed: int, dense: bool = False) -> SparseDelta:
    """A mask of ``density`` at random positions with random values (stitch cost does not depend on where); in the
    dense form when ``dense``."""
    g = torch.Generator().manual_seed(seed)
    idx, val = {}, {}
    for k, s in shapes.items():
        n = torch.Size(s).numel()
        m = max(1, int(n * density))
        v = torch.randn(m, generator=g) * 1e-3
        if dense and m == n:
            val[k] = v
            continue
        i = torch.randperm(n, generator=g)[:m].sort().values
        if dense:
            val[k] = torch.zeros(n).index_put_((i,), v)
        else:
            idx[k], val[k] = i.to(torch.int32), v
    return SparseDelta(idx, val, dict(shapes), {k: torch.float32 for k in shapes})


def timed(fn, device: str = "auto") -> float:
    """Seconds of ``fn``, with the device's queued work finished before each clock reading (CUDA is asynchronous)."""
    dev = resolve_device(device)
    synchronize(dev)
    t0 = time.perf_counter()
    fn()
    synchronize(dev)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skills", type=int, default=16)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--policy", default="average")
    ap.add_argument("--dense", action="store_true", help="masks in the dense form (no indices)")
    ap.add_argument("--state", choices=("service", "dense", "sparse", "derived"), default="service",
                    help="the stitcher's accumulators: as the service keeps them for this model size ([stitch] "
                         "sparse_from, default 500M parameters: dense below, derived from there), always dense, "
                         "always sparse (stored runs), or sparse and derived from the kept masks")
    args = ap.parse_args()
    shapes = vit_b_shapes(args.blocks)
    base = make_base(shapes)
    deltas = [random_delta(shapes, args.density, s, args.dense) for s in range(args.skills + 1)]
    policy = load_plugins([], entry_points=False).make_policy(args.policy)
    n = sum(t.numel() for t in base.values())
    layout = {"service": service_layout(n, StitchSection().sparse_from), "dense": {"dense_share": 0.0},
              "sparse": {"dense_share": DENSE_SHARE},
              "derived": {"dense_share": DENSE_SHARE, "derived": True}}[args.state]
    s = Stitcher(base, policy, device="auto", **layout)
    kind = "dense" if layout["dense_share"] == 0 else "sparse, derived" if s.derived else "sparse"
    print(f"model {n / 1e6:.1f}M params, {args.skills} skills of {deltas[0].nnz} entries ({args.density:.1%}), "
          f"policy {args.policy}, device {s.device}, accumulators {kind} (--state {args.state})")

    t_init = timed(lambda: Stitcher(base, policy, device="auto", **layout))
    # A dense add leaves its merged tensors to be recomputed when next read: each change is timed with that read
    # (free after a sparse add), not with a copy.
    def read(st: Stitcher) -> None:
        for k in st.keys:
            st.tensor(k)

    t_first = timed(lambda: (s.add("0", deltas[0]), read(s)))
    adds = []  # every add in between, timed: the sparse accumulators' runs are merged every so often (amortised)
    for i in range(1, args.skills - 1):
        adds.append(timed(lambda: (s.add(str(i), deltas[i]), read(s))))
    t_nth = timed(lambda: (s.add(str(args.skills - 1), deltas[args.skills - 1]), read(s)))
    if hasattr(s, "footprint"):  # bytes the stitcher holds per parameter, beyond the merged model and the masks
        fp = s.footprint()
        extra = sum(v for k, v in fp.items() if k not in ("merged", "masks"))
        print(f"stitcher state with {args.skills} skills in: merged {fp['merged'] / n:.2f} B/param, extra "
              f"{extra / n:.2f} B/param, masks kept {fp['masks'] / n:.2f} B/param")
    t_remove = timed(lambda: (s.remove("3"), read(s)))
    t_snapshot = timed(lambda: s.snapshot())

    def rebuild() -> None:
        r = Stitcher(base, policy, device="auto", **layout)
        for i in range(args.skills):
            r.add(str(i), deltas[i])
        read(r)
    t_rebuild = timed(rebuild)
    print(f"{'operation':<36}{'seconds':>10}{'x first add':>13}")
    for name, t in (("stitcher init (θ₀ to device)", t_init), ("add 1st skill", t_first),
                    (f"add {args.skills}th skill ({args.skills - 1} already in)", t_nth),
                    ("remove a skill", t_remove), ("snapshot (copy merged weights)", t_snapshot),
                    (f"full rebuild of {args.skills} skills", t_rebuild)):
        print(f"{name:<36}{t:>10.4f}{t / t_first:>13.2f}")
    adds.append(t_nth)
    print(f"adds 2 to {args.skills}: mean {sum(adds) / len(adds):.4f} s, max {max(adds):.4f} s "
          f"(mean / 1st add {sum(adds) / len(adds) / t_first:.2f})")
    print(f"16th add / 1st add: {t_nth / t_first:.2f}; rebuild / one add: {t_rebuild / t_nth:.1f}")


if __name__ == "__main__":
    main()

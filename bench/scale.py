"""Bounded memory at 1B parameters: a synthetic LLM-shaped bf16 model (a 32k×2048 embedding, 16 blocks of
attention and MLP weights, norms, an untied output head: 1.0B parameters) in 4 shards, made on disk here with 8
finetunes; each localized at 1% and stitched in, incrementally, through the service's own localizer
(``ops.localize_checkpoint``, the ``state_dict`` family, ``dataless``) and :class:`~skillhub.stitch.Stitcher`.

    .venv/bin/python bench/scale.py [--dir DIR] [--finetunes 8] [--sparsity 0.01] [--size 1.0] [--keep]

The model is written under ``--dir`` (a temp dir by default, removed afterwards unless ``--keep``; an existing
model there of the same size is reused): 2 GB per copy, 18 GB for the base and 8 finetunes. The measurement runs in
a fresh child process, so its peak memory is the stitch's alone. Printed: peak RSS (anonymous memory, which is
the process's own; and all of it, which also counts the page cache of the memory-mapped checkpoints it reads)
against one bf16 copy of the model plus the masks, the time per skill, the stitcher's bytes per parameter
against the layout before (θ₀, the merged tensor, an int16 count and a float64 sum for every entry), and what a
published version held beside the stitcher costs. ``--size 0.1`` runs the same on a tenth of the blocks and
vocabulary, for a quick look.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import llama_shapes, proc_status

from skillhub.checkpoint import open_checkpoint, write_safetensors

SHARDS = 4
MiB = 1 << 20


def llm_shapes(size: float = 1.0) -> dict[str, tuple[int, ...]]:
    """An LLM's tensor shapes (LLaMA-like names): 1.0B parameters at ``size`` 1."""
    return llama_shapes(max(1, round(16 * size)), round(32000 * size), 2048, 6144)


def tensor(key_index: int, shape: tuple[int, ...], finetune: int | None) -> torch.Tensor:
    """θ₀ of one tensor (seeded by its index), or one finetune's θ: θ₀ + a change of about a quarter of a weight's
    size everywhere (every bf16 entry moves: θ₀'s own noise, shifted by a finetune-dependent offset, so no second
    random draw of the whole model is needed) and 8 times that on a random 1% (the skill)."""
    g = torch.Generator().manual_seed(1_000_003 * key_index)
    noise = torch.randn(shape, generator=g).mul_(0.02)
    if finetune is not None:
        flat = noise.reshape(-1)
        tau = flat.roll(7919 * (finetune + 1)).mul_(0.25)
        g.manual_seed(1_000_003 * key_index + 7919 * (finetune + 1))
        tau[torch.randint(0, flat.numel(), (max(1, flat.numel() // 100),), generator=g)] *= 8
        noise.add_(tau.view(shape))
    if len(shape) == 1:
        noise.add_(1.0)  # a norm's weight
    return noise.to(torch.bfloat16)


def write_model(folder: Path, shapes: dict[str, tuple[int, ...]], finetune: int | None) -> None:
    """One checkpoint as ``SHARDS`` safetensors shards and an index, written tensor by tensor."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(shapes)
    total = sum(math.prod(s) for s in shapes.values())
    weight_map: dict[str, str] = {}
    shard, part, size = 0, {}, 0
    for i, key in enumerate(keys):
        part[key] = tensor(i, shapes[key], finetune)
        size += part[key].numel()
        if size >= total * (shard + 1) / SHARDS or i == len(keys) - 1:
            name = f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
            write_safetensors(folder / name, part, {})
            weight_map |= {k: name for k in part}
            shard, part = shard + 1, {}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


class Peaks:
    """Samples ``/proc/self/status`` every 20 ms: the peaks of RssAnon and VmRSS (MiB)."""

    def __init__(self) -> None:
        self.anon = self.rss = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, float]:
        s = proc_status()
        now = {"anon": s.get("RssAnon", 0) / 1024, "rss": s.get("VmRSS", 0) / 1024}
        self.anon, self.rss = max(self.anon, now["anon"]), max(self.rss, now["rss"])
        return now

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.02)

    def __enter__(self) -> Peaks:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.sample()


def measure(folder: Path, finetunes: int, sparsity: float, accumulate: torch.dtype, state: str) -> None:
    """The child process: localize and stitch every finetune as the service does, and print what it cost."""
    from skillhub.ops import localize_checkpoint
    from skillhub.plugins import load_plugins
    from skillhub.sections import StitchSection
    from skillhub.heap import fix_mmap_threshold
    from skillhub.stitch import Stitcher, service_layout
    from skillhub.stitchstate import DENSE_SHARE

    from skillhub import kernels

    plugins = load_plugins([], entry_points=False)
    family = plugins.family("state_dict")()
    policy = plugins.make_policy("average")
    kernels.warm()  # the service's workspace loads the compiled pass at start-up: its memory is in the peak
    peaks = Peaks()
    with peaks:
        start = peaks.sample()
        base = open_checkpoint(folder / "base")
        keys = family.included_keys(base)
        params = sum(math.prod(base[k].shape) for k in keys)
        fixed = fix_mmap_threshold(params, StitchSection().sparse_from)  # as the Hub does for a model this size
        copy = sum(math.prod(base[k].shape) * base[k].dtype.itemsize for k in base) / MiB
        t0 = time.perf_counter()
        # As the service builds it (Hub): θ₀ straight from the memory-mapped base, the layout for this size
        layout = {"service": service_layout(params, StitchSection().sparse_from), "runs": {"dense_share": DENSE_SHARE},
                  "derived": {"dense_share": DENSE_SHARE, "derived": True}}[state]
        stitcher = Stitcher({k: base.tensor(k) for k in keys}, policy, device="cpu", accumulate=accumulate,
                            **layout)
        t_init = time.perf_counter() - t0
        after_init = peaks.sample()
        print(f"model {params / 1e9:.2f}B params bf16 in {len(base.files)} shards; one bf16 copy {copy:.0f} MiB; "
              f"{finetunes} finetunes at sparsity {sparsity:g}, policy average, {str(accumulate)[6:]} sums, cpu, "
              f"torch threads {torch.get_num_threads()}; glibc mmap threshold "
              f"{'fixed by the service (skillhub.heap)' if fixed else 'as the environment leaves it'}; sparse state "
              f"{'derived from the masks' if stitcher.derived else 'stored in runs'} (--state {state})")
        print(f"process at start: {start['anon']:.0f} MiB anonymous; stitcher built in {t_init:.1f} s: "
              f"{after_init['anon']:.0f} MiB anonymous")
        print(f"{'skill':<7}{'localize s':>11}{'stitch s':>10}{'mask MiB':>10}{'anon MiB':>10}{'RSS MiB':>9}"
              f"{'state B/param':>15}")
        masks = 0.0
        loc_total = add_total = 0.0
        for i in range(finetunes):
            ft = open_checkpoint(folder / f"ft{i}")
            t0 = time.perf_counter()
            prepared = family.prepare(base, ft, None)
            result = localize_checkpoint(base, prepared, family=family, localizer="dataless",
                                         params={"sparsity": sparsity}, plugins=plugins, skill=f"s{i}",
                                         base_sha="bench", source_sha=f"ft{i}")
            t_loc = time.perf_counter() - t0
            t0 = time.perf_counter()
            stitcher.add(f"s{i}", result.delta)
            for k in keys:  # read every merged tensor, as a publication does (nothing is left to recompute)
                stitcher.tensor(k)
            t_add = time.perf_counter() - t0
            del prepared, ft, result
            masks = stitcher.footprint()["masks"] / MiB
            loc_total, add_total = loc_total + t_loc, add_total + t_add
            now = peaks.sample()
            fp = stitcher.footprint()
            extra = sum(v for k, v in fp.items() if k not in ("merged", "masks"))
            print(f"{i + 1:<7}{t_loc:>11.2f}{t_add:>10.2f}{fp['masks'] / MiB:>10.0f}{now['anon']:>10.0f}"
                  f"{now['rss']:>9.0f}{extra / params:>15.2f}")
        stitch_peak_anon, stitch_peak_rss = peaks.anon, peaks.rss
        fp = stitcher.footprint()
        extra = sum(v for k, v in fp.items() if k not in ("merged", "masks"))
        # A published version held beside the stitcher (the service serves one while it stitches the next): the
        # next change copies each tensor it touches (copy on write); a 1% mask touches every tensor.
        version = stitcher.snapshot()
        held_before = peaks.sample()["anon"]
        t0 = time.perf_counter()
        removed = stitcher.remove(f"s{finetunes - 1}")
        stitcher.add(f"s{finetunes - 1}", removed)
        for k in keys:
            stitcher.tensor(k)
        t_cycle = time.perf_counter() - t0
        held_after = peaks.sample()["anon"]
        shared = sum(1 for k in keys if version[k].data_ptr() == stitcher.tensor(k).data_ptr())
        del version
    target = 1.5 * copy + masks
    print(f"per skill: localize {loc_total / finetunes:.2f} s, stitch {add_total / finetunes:.2f} s; "
          f"all {finetunes}: {loc_total + add_total:.1f} s")
    own = stitch_peak_anon - start["anon"]
    print(f"peak anonymous RSS while localizing and stitching: {stitch_peak_anon:.0f} MiB = "
          f"{stitch_peak_anon / copy:.2f}x one bf16 copy; above the process at start (Python, torch): {own:.0f} MiB "
          f"= {own / copy:.2f}x; target 1.5x copy + masks = {target:.0f} MiB: "
          f"{'met' if stitch_peak_anon <= target else 'met above the start' if own <= target else 'NOT met'}")
    print(f"peak RSS with the page cache of the mapped checkpoints: {stitch_peak_rss:.0f} MiB "
          f"({stitch_peak_rss / copy:.2f}x); VmHWM {proc_status().get('VmHWM', 0) / 1024:.0f} MiB")
    print(f"stitcher state: merged {fp['merged'] / MiB:.0f} MiB (the model, bf16) + extra {extra / MiB:.0f} MiB "
          f"(θ₀ {fp['base'] / MiB:.0f}, counts {fp['count'] / MiB:.0f}, sums {fp['accumulators'] / MiB:.0f}, "
          f"positions {fp['positions'] / MiB:.0f}) + masks {fp['masks'] / MiB:.0f} MiB")
    print(f"bytes per parameter: before (θ₀ copy 2 + merged 2 + int16 count 2 + {str(accumulate)[6:]} sum "
          f"{accumulate.itemsize}) {6 + accumulate.itemsize:.2f}; "
          f"now merged {fp['merged'] / params:.2f} + extra {extra / params:.2f} = {(fp['merged'] + extra) / params:.2f} "
          f"(+ masks {fp['masks'] / params:.2f})")
    print(f"a version held while the next change is stitched: +{held_after - held_before:.0f} MiB anonymous "
          f"({(held_after - held_before) / copy:.2f}x copy; {shared}/{len(keys)} tensors still shared); "
          f"remove + add of one skill {t_cycle:.2f} s")
    # The offline `skillhub stitch` of the same masks (streaming, shard by shard) is measured by its own row, added
    # here by the work on the offline stitch: peak RSS against one shard plus the masks.


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, help="where the model is made (default: a temp dir, removed after)")
    ap.add_argument("--finetunes", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.01)
    ap.add_argument("--size", type=float, default=1.0, help="fraction of the blocks and vocabulary (1: 1.0B)")
    ap.add_argument("--keep", action="store_true", help="keep the model made in a temp dir")
    ap.add_argument("--threads", type=int, help="torch threads in the measuring process (default: torch's own)")
    ap.add_argument("--accumulate", choices=["float64", "float32"], default="float64",
                    help="the stitcher's accumulator dtype ([stitch] accumulate)")
    ap.add_argument("--state", choices=["service", "runs", "derived"], default="service",
                    help="the stitcher's layout: the service's for this size (dense below [stitch] sparse_from, "
                         "from there the sparse state derived from the kept masks), the sparse state stored in runs "
                         "(the layout before), or derived whatever the size")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.measure:
        if args.threads:
            torch.set_num_threads(args.threads)
        measure(args.dir, args.finetunes, args.sparsity, getattr(torch, args.accumulate), args.state)
        return
    folder = args.dir or Path(tempfile.mkdtemp(prefix="skillhub-scale-"))
    shapes = llm_shapes(args.size)
    stamp = folder / "shapes.json"
    made = stamp.is_file() and json.loads(stamp.read_text()) == {k: list(v) for k, v in shapes.items()}
    try:
        t0 = time.perf_counter()
        for i in [None, *range(args.finetunes)]:
            target = folder / ("base" if i is None else f"ft{i}")
            if not (made and (target / "model.safetensors.index.json").is_file()):
                write_model(target, shapes, i)
        stamp.write_text(json.dumps({k: list(v) for k, v in shapes.items()}))
        print(f"model and {args.finetunes} finetunes on disk in {folder} ({time.perf_counter() - t0:.0f} s)")
        sys.stdout.flush()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                            os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, __file__, "--measure", "--dir", str(folder), "--finetunes",
                        str(args.finetunes), "--sparsity", str(args.sparsity), "--accumulate", args.accumulate, "--state", args.state,
                        *(["--threads", str(args.threads)] if args.threads else [])], check=True, env=env)
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

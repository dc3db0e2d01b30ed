"""skillhub beside mergekit: task arithmetic and TIES on the same files, whole processes, against a float64 reference.

    .venv/bin/python bench/mergekit.py [--mergekit-python /work/mergekit-venv/bin/python] [--repeats 3]
        [--threads N] [--only ta|ties] [--blocks 12] [--finetunes 4] [--scale 0.3] [--density 0.2] [--ties-scale 1.0] [--keep DIR]

An 85M-parameter float32 tower (CLIP ViT-B/32 shapes, :mod:`common`) and 4 finetunes, each written as a
Hugging Face-style folder (``model.safetensors`` + a ``config.json``). mergekit reads such folders whatever the
architecture: it infers the layout from the tensor names (and logs that it could not instantiate the model, which is
harmless), so both tools merge exactly the same files.

- **task arithmetic** θ₀ + λ Σ τᵢ: skillhub ``localize --sparsity 1.0`` per finetune, then ``stitch --policy sum
  --param scale=λ``, or the one process ``merge --sparsity 1.0 --policy sum --param scale=λ``; mergekit
  ``task_arithmetic`` with ``lambda: λ``, every weight 1.
- **TIES** (trim to the top ``density`` of every tensor, elect signs, disjoint mean, λ): skillhub ``localize
  --param scope=tensor --sparsity density`` per finetune (mergekit's per-tensor trimming), then ``stitch --policy
  ties --param zero_sign=positive`` (mergekit's rule where the summed value is exactly 0), or the one process
  ``merge --sparsity density --scope tensor --policy ties ...``; mergekit ``ties`` with that density and lambda.

Every tool runs as whole processes (``python -m skillhub ...``, ``mergekit-yaml``), timed from outside: wall time,
CPU time (user + system) and peak RSS of each process come from ``os.wait4``. The shared machine may be busy: CPU
time depends on it less. On a machine other jobs keep busy, torch's two intra-op threads wait on each other at every
operation (one of them is descheduled): ``--threads 1`` (``OMP_NUM_THREADS`` for every process of both tools) takes
that out of the comparison. Each output is compared with a reference computed here in float64
(selection on float32 |τ|, as both tools do; ties at the k-th value to the earliest index): the largest absolute
difference and the number of entries that differ from the reference rounded to float32.

mergekit is an optional benchmark dependency, never a runtime one. Install it in a venv of its own::

    python3 -m venv /work/mergekit-venv
    /work/mergekit-venv/bin/pip install "torch==2.14.1" "mergekit==0.1.5"

and pass ``--mergekit-python /work/mergekit-venv/bin/python`` (or set ``MERGEKIT_PYTHON``); without it the mergekit
rows are skipped and the reason is printed.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_base, make_finetune, vit_b_shapes

from skillhub.checkpoint import open_checkpoint, write_safetensors

#: A config.json mergekit and transformers can read; the architecture name is not one mergekit knows, so it infers
#: the layout from the tensor names instead of expecting a known model's.
CONFIG = {"architectures": ["SkillhubTower"], "model_type": "vit"}
MERGEKIT_FLAGS = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


@dataclass
class Run:
    """One whole process: wall seconds, CPU seconds (user + system) and peak RSS in MiB."""

    wall: float
    cpu: float
    rss: float


# Children are started by a small launcher process, not by this one: on Linux a child's peak RSS (ru_maxrss) starts
# from its parent's at fork time, and this process holds the references (gigabytes).
LAUNCHER = r"""
import json, os, subprocess, sys, time
for line in sys.stdin:
    job = json.loads(line)
    t0 = time.perf_counter()
    proc = subprocess.Popen(job["cmd"], cwd=job["cwd"], env=job["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    print(json.dumps({"wall": time.perf_counter() - t0, "cpu": usage.ru_utime + usage.ru_stime,
                      "rss": usage.ru_maxrss / 1024, "code": os.waitstatus_to_exitcode(status),
                      "out": out.decode(errors="replace")[-3000:]}), flush=True)
"""


class Launcher:
    """Runs whole processes and reports their wall time, CPU time and peak RSS (``os.wait4``)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def run(self, cmd: list[str], cwd: Path, repeats: int, env: dict[str, str] | None = None,
            before: Callable[[], None] | None = None) -> Run:
        """Run ``cmd`` ``repeats`` times (``before`` ahead of each); the fastest run (a shared machine only ever
        slows a process down)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        best: Run | None = None
        for _ in range(repeats):
            if before is not None:
                before()
            self.proc.stdin.write(json.dumps({"cmd": cmd, "cwd": str(cwd), "env": env or dict(os.environ)}) + "\n")
            self.proc.stdin.flush()
            res = json.loads(self.proc.stdout.readline())
            if res["code"] != 0:
                sys.exit(f"{' '.join(cmd)} failed ({res['code']}):\n{res['out']}")
            r = Run(res["wall"], res["cpu"], res["rss"])
            best = r if best is None or r.wall < best.wall else best
        assert best is not None
        return best

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


def total(runs: list[Run]) -> Run:
    """The runs one after another: summed times, the largest peak."""
    return Run(sum(r.wall for r in runs), sum(r.cpu for r in runs), max(r.rss for r in runs))


# --- the models and the float64 references ---------------------------------------------------------------------------


def write_models(folder: Path, blocks: int, finetunes: int) -> list[Path]:
    """base/ and ft0/.. as HF-style folders; returns [base, ft0, ...]."""
    base = make_base(vit_b_shapes(blocks))
    dirs = []
    for name, seed in [("base", None)] + [(f"ft{i}", 100 + i) for i in range(finetunes)]:
        d = folder / name
        d.mkdir(parents=True)
        tensors = base if seed is None else make_finetune(base, seed=seed)
        write_safetensors(d / "model.safetensors", tensors, {"format": "pt"})
        (d / "config.json").write_text(json.dumps(CONFIG))
        dirs.append(d)
    return dirs


def top_k_mask(tau32: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest non-zero |τ| of one flat tensor (ties at the k-th value: earliest index), as a bool mask."""
    a = np.abs(tau32.numpy())
    nonzero = int(np.count_nonzero(a))
    keep = a > 0
    if k < nonzero:
        v = np.partition(a, a.size - k)[a.size - k]
        keep = a > v
        tied = np.flatnonzero(a == v)
        keep[tied[: k - int(keep.sum())]] = True
    return torch.from_numpy(keep)


@dataclass
class Reference:
    """One merge in float64 from the files, rounded to float32 once: ``exact`` takes τ = θᵢ − θ₀ in float64;
    ``stored`` rounds τ to float32 first, as a mask file stores it (in the base dtype)."""

    exact: dict[str, torch.Tensor]
    stored: dict[str, torch.Tensor]


def references(base: Path, fts: list[Path], scale: float, density: float, ties_scale: float
               ) -> tuple[Reference, Reference, int]:
    """Task arithmetic and TIES; and the number of TIES entries whose summed value is exactly 0 (elected +, as
    mergekit does and skillhub with ``zero_sign = "positive"``)."""
    b = open_checkpoint(base / "model.safetensors")
    f = [open_checkpoint(p / "model.safetensors") for p in fts]
    ta, ties = Reference({}, {}), Reference({}, {})
    zero_sums = 0
    for key in b:
        shape = b.tensor(key).shape
        b64 = b.tensor(key).double().reshape(-1)
        tau32 = [(x.tensor(key) - b.tensor(key)).reshape(-1) for x in f]  # what both tools select on
        k = math.floor(density * b64.numel())
        masks = torch.stack([top_k_mask(t, k) for t in tau32])
        for form, taus in (("exact", torch.stack([x.tensor(key).double().reshape(-1) - b64 for x in f])),
                           ("stored", torch.stack(tau32).double())):
            getattr(ta, form)[key] = (b64 + scale * taus.sum(0)).float().reshape(shape)
            kept = taus * masks
            sign = torch.sign(kept.sum(0))
            if form == "exact":
                zero_sums += int(((sign == 0) & masks.any(0)).sum())
            sign[sign == 0] = 1.0
            agree = ((kept > 0) & (sign > 0)) | ((kept < 0) & (sign < 0))
            mean = (kept * agree).sum(0) / agree.sum(0).clamp(min=1)
            getattr(ties, form)[key] = (b64 + ties_scale * mean).float().reshape(shape)
    return ta, ties, zero_sums


def compare(out: Path, ref: Reference) -> tuple[float, int, int]:
    """Largest |out − reference| (τ exact) and the entries that differ from each reference (0: exact)."""
    ckpt = open_checkpoint(out)
    worst, differ, differ_stored = 0.0, 0, 0
    for key, want in ref.exact.items():
        got = ckpt.tensor(key)
        if got.dtype != torch.float32 or got.shape != want.shape:
            raise SystemExit(f"{out}: {key} is {got.dtype} {list(got.shape)}, not float32 {list(want.shape)}")
        worst = max(worst, float((got.double() - want.double()).abs().max()))
        differ += int((got != want).sum())
        differ_stored += int((got != ref.stored[key]).sum())
    return worst, differ, differ_stored


# --- the two tools -----------------------------------------------------------------------------------------------------


def skillhub_merge(launcher: Launcher, work: Path, dirs: list[Path], name: str, localize: list[str],
                   stitch: list[str], repeats: int) -> tuple[list[Run], Run, Path]:
    """``skillhub localize`` per finetune, then one ``skillhub stitch``: (localize runs, stitch run, output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")}  # defaults, no config file
    py = [sys.executable, "-m", "skillhub"]
    base = str(dirs[0] / "model.safetensors")
    masks, loc = [], []
    for ft in dirs[1:]:
        mask = work / f"{name}-{ft.name}.mask.safetensors"
        loc.append(launcher.run(py + ["localize", "--base", base, "--finetuned", str(ft / "model.safetensors"),
                             "--out", str(mask), "--skill", ft.name, *localize], work, repeats, env))
        masks.append(str(mask))
    out = work / f"{name}-skillhub.safetensors"
    st = launcher.run(py + ["stitch", "--base", base, "--out", str(out), *stitch, *masks], work, repeats, env)
    return loc, st, out


# What one process of skillhub's library does for the same merge: every finetune localized in memory (no mask
# file), stitched, the merged tensors written. The lower bound of `skillhub merge` (no config, no input checks ahead,
# no hashes), kept to show what the command adds to it.
ONE_PROCESS = r"""
import json, sys
from skillhub.checkpoint import open_checkpoint, write_safetensors
from skillhub.delta import Provenance
from skillhub.taskvector import TaskVector
from skillhub.localize import LocalizeContext, run_localizer
from skillhub.plugins import load_plugins
from skillhub.stitch import Stitcher
base_path, out, policy, policy_params, params, *fts = sys.argv[1:]
plugins = load_plugins([], entry_points=False)
base = open_checkpoint(base_path)
keys = sorted(k for k in base if base[k].dtype.is_floating_point)
stitcher = Stitcher({k: base.tensor(k) for k in keys}, plugins.make_policy(policy, json.loads(policy_params)),
                    device="cpu")
for i, ft in enumerate(fts):
    task = TaskVector(base, open_checkpoint(ft), keys)
    delta = run_localizer(plugins.localizer("dataless"), task, json.loads(params), LocalizeContext(), Provenance())
    stitcher.add(str(i), delta)
merged = stitcher.snapshot()
write_safetensors(out, {k: merged.get(k, base.tensor(k)) for k in base}, {})
"""


def library_merge(launcher: Launcher, work: Path, dirs: list[Path], name: str, policy: str,
                  policy_params: dict[str, object], params: dict[str, object], repeats: int) -> tuple[Run, Path]:
    """The same merge through skillhub's library in one process (:data:`ONE_PROCESS`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")}
    out = work / f"{name}-library.safetensors"
    cmd = [sys.executable, "-c", ONE_PROCESS, str(dirs[0] / "model.safetensors"), str(out), policy,
           json.dumps(policy_params), json.dumps(params), *(str(d / "model.safetensors") for d in dirs[1:])]
    return launcher.run(cmd, work, repeats, env), out


def merge_command(launcher: Launcher, work: Path, dirs: list[Path], name: str, args: list[str],
                  repeats: int) -> tuple[Run, Path]:
    """One ``skillhub merge`` process: every finetune localized and stitched, no mask files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")}  # defaults, no config file
    out = work / f"{name}-merge.safetensors"
    cmd = [sys.executable, "-m", "skillhub", "merge", "--base", str(dirs[0] / "model.safetensors"), "--out", str(out),
           *args, *(str(d / "model.safetensors") for d in dirs[1:])]
    return launcher.run(cmd, work, repeats, env), out


def mergekit_merge(launcher: Launcher, work: Path, dirs: list[Path], name: str, method: str,
                   params: dict[str, float], python: str, repeats: int) -> tuple[Run, Path]:
    """One ``mergekit-yaml`` process on the same folders."""
    cfg = {"merge_method": method, "base_model": str(dirs[0]), "dtype": "float32",
           "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d in dirs[1:]], "parameters": params}
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    out = work / f"{name}-mergekit"
    script = Path(python).parent / "mergekit-yaml"
    cmd = [str(script)] if script.exists() else \
        [python, "-c", "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())"]

    r = launcher.run(cmd + [str(path), str(out), *MERGEKIT_FLAGS], work, repeats,
            before=lambda: shutil.rmtree(out, ignore_errors=True))
    return r, out


def mergekit_version(python: str | None) -> tuple[str | None, str]:
    """(version, "") when ``python`` can import mergekit, else (None, why not)."""
    if not python:
        return None, ("no --mergekit-python or MERGEKIT_PYTHON given (install mergekit==0.1.5 in its own venv, see "
                      "this script's docstring)")
    try:
        proc = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                              capture_output=True, text=True, timeout=120, check=False)
    except OSError as e:
        return None, f"{python} cannot run ({e})"
    if proc.returncode != 0:
        return None, f"{python} cannot import mergekit ({proc.stderr.strip().splitlines()[-1:]})"
    return proc.stdout.strip(), ""


# --- the report ----------------------------------------------------------------------------------------------------


def row(merge: str, tool: str, step: Run, end: Run, diff: tuple[float, int, int]) -> str:
    return (f"| {merge} | {tool} | {step.wall:.2f} | {step.cpu:.2f} | {step.rss:.0f} | {end.wall:.2f} | {end.cpu:.2f} "
            f"| {end.rss:.0f} | {diff[0]:.3g} | {diff[1]:,} | {diff[2]:,} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit-python", default=os.environ.get("MERGEKIT_PYTHON"))
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--finetunes", type=int, default=4)
    ap.add_argument("--scale", type=float, default=0.3, help="λ of task arithmetic")
    ap.add_argument("--density", type=float, default=0.2, help="TIES: fraction of every tensor kept")
    ap.add_argument("--ties-scale", type=float, default=1.0, help="λ of TIES")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every process; the fastest counts")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every process of both tools")
    ap.add_argument("--only", choices=["ta", "ties"], help="run one of the two merges")
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the launcher and every process
    launcher = Launcher()  # first, while this process is small
    version, why = mergekit_version(args.mergekit_python)
    work = args.keep or Path(tempfile.mkdtemp(prefix="skillhub-mergekit-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        dirs = write_models(work / "models", args.blocks, args.finetunes)
        n = sum(math.prod(s) for s in vit_b_shapes(args.blocks).values())
        ta_ref, ties_ref, zero_sums = references(dirs[0], dirs[1:], args.scale, args.density, args.ties_scale)
        load0 = os.getloadavg()[0]
        rows = []
        ties_policy = {"scale": args.ties_scale, "zero_sign": "positive"}
        ta_policy = ["--policy", "sum", "--param", f"scale={args.scale}"]
        ties_stitch = ["--policy", "ties", "--param", f"scale={args.ties_scale}", "--param", "zero_sign=positive"]
        jobs = [("task arithmetic", "ta", ["--sparsity", "1.0"], ta_policy, ["--sparsity", "1.0", *ta_policy],
                 ("sum", {"scale": args.scale}, {"sparsity": 1.0}), "task_arithmetic", {"lambda": args.scale}, ta_ref),
                ("TIES", "ties", ["--sparsity", str(args.density), "--param", "scope=tensor"], ties_stitch,
                 ["--sparsity", str(args.density), "--scope", "tensor", *ties_stitch],
                 ("ties", ties_policy, {"sparsity": args.density, "scope": "tensor"}), "ties",
                 {"lambda": args.ties_scale, "density": args.density}, ties_ref)]
        speed = []
        for title, name, loc_args, stitch_args, merge_args, library, method, params, ref in jobs:
            if args.only and name != args.only:
                continue
            loc, st, out = skillhub_merge(launcher, work, dirs, name, loc_args, stitch_args, args.repeats)
            end = total(loc + [st])
            rows.append(row(title, f"skillhub localize ×{len(loc)} + stitch", st, end, compare(out, ref)))
            one, one_out = merge_command(launcher, work, dirs, name, merge_args, args.repeats)
            rows.append(row(title, "skillhub merge, one process", one, one, compare(one_out, ref)))
            lib, lib_out = library_merge(launcher, work, dirs, name, *library, args.repeats)
            rows.append(row(title, "skillhub library, one process", lib, lib, compare(lib_out, ref)))
            if version:
                mk, mk_out = mergekit_merge(launcher, work, dirs, name, method, params, args.mergekit_python,
                                            args.repeats)
                rows.append(row(title, f"mergekit {version}", mk, mk, compare(mk_out, ref)))
                speed.append(f"{title}: mergekit / skillhub merge wall time {mk.wall / one.wall:.2f}× (CPU time "
                             f"{mk.cpu / one.cpu:.2f}×, peak RSS skillhub merge / mergekit {one.rss / mk.rss:.2f}×); "
                             f"mergekit / skillhub {mk.wall / st.wall:.2f}× for the stitch alone, "
                             f"{mk.wall / end.wall:.2f}× for localize ×{len(loc)} + stitch, {mk.wall / lib.wall:.2f}× "
                             f"for the library in one process (CPU time {mk.cpu / st.cpu:.2f}×, {mk.cpu / end.cpu:.2f}×, "
                             f"{mk.cpu / lib.cpu:.2f}×); peak RSS skillhub / mergekit {end.rss / mk.rss:.2f}×, "
                             f"{lib.rss / mk.rss:.2f}×")
        print(f"model: {n / 1e6:.1f}M float32 parameters, {args.finetunes} finetunes; task arithmetic λ = {args.scale}; "
              f"TIES density {args.density} per tensor, λ = {args.ties_scale}; best of {args.repeats}; "
              f"threads {args.threads or 'default'}; "
              f"{os.cpu_count()} cores, load average {load0:.1f} → {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
        print()
        print("| merge | tool | merge step s | its CPU s | its peak RSS MiB | end to end s | CPU s | peak RSS MiB "
              "| max abs diff vs float64 | entries ≠ float64 | entries ≠ float64 of float32 τ |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(r)
        print()
        print("merge step: skillhub's `stitch` process alone (the masks exist); the one process of `skillhub merge`, "
              "of the library script and of mergekit. End to end: skillhub's localize processes plus its stitch, one "
              "after another; the one process otherwise. `skillhub merge`: the command, no mask files. Library: the "
              "same localization and stitch in a bare Python script (no config, no input checks, no hashes). "
              "References: float64 from the files, rounded to float32 once; the last column with τ rounded to "
              "float32 first, as a mask file stores it.")
        print(f"TIES entries whose summed value is exactly 0 (both tools elect + there, as the reference does): "
              f"{zero_sums}")
        for line in speed:
            print(line)
        if not version:
            print(f"mergekit rows skipped: {why}")
    finally:
        launcher.close()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

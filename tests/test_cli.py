"""The ``skillhub`` command, run as a real subprocess (``python -m skillhub``) against tiny files in a temp folder.

End to end: ``localize`` two finetunes, ``stitch`` them, and compare the merged weights bit for bit with an
independent float64 computation of Localize-and-Stitch written here (dense τ, a global top-k with the documented tie
rule, the average of overlapping entries). Then every content fault of FAULTS B that the CLI can meet: exit code 1, one
line on stderr naming the file and the problem, no traceback, no output file.

Starting Python with torch costs about two seconds of CPU, so the module-scoped ``world`` fixture starts every
command at once: the end-to-end chain as fresh ``python -m skillhub`` processes, the rest in a fork server (see
``FORK_SERVER``) that pays for the imports once; each test then checks its own command's outcome. Set
``SKILLHUB_TESTS_SPAWN_ALL=1`` to run every command as a fresh process (about 50 s instead of 10 s).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

SPARSITY = 0.2
FLOAT_SHAPES = {"enc.weight": (40, 30), "enc.bias": (30,), "conv.kernel": (5, 5, 3)}
BUFFER = "bn.num_batches_tracked"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")}  # no config file, no overrides


@dataclass(frozen=True)
class Run:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"skillhub {' '.join(self.args)} -> {self.returncode}\nstdout: {self.stdout}\nstderr: {self.stderr}"


def run_cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Run:
    p = subprocess.run([sys.executable, "-m", "skillhub", *args], cwd=cwd, env=ENV if env is None else env,
                       capture_output=True, text=True, timeout=300)
    return Run(tuple(args), p.returncode, p.stdout, p.stderr)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# the models


def make_base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        # values on a 1/32 grid: their task vectors are full of exact ties, across both tensors, which exercises the
        # tie rule (sorted key, then flat index) right at the k-th value
        "enc.weight": torch.round(torch.randn(40, 30, generator=g) * 32) / 32,
        "conv.kernel": torch.round(torch.randn(5, 5, 3, generator=g) * 32) / 32,
        # generic float32 values: the average of two of them rounds, so the order of the maths shows
        "enc.bias": torch.randn(30, generator=g) * 3,
        BUFFER: torch.tensor(7, dtype=torch.int64),
    }


def make_finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Changes about half the entries of every float tensor (a different half per seed, so finetunes overlap)."""
    g = torch.Generator().manual_seed(100 + seed)
    ft = {}
    for k, b in base.items():
        if not b.is_floating_point():
            ft[k] = torch.tensor(100 + seed, dtype=b.dtype)  # a finetune's buffer: the merge must keep the base's
            continue
        touched = torch.rand(b.shape, generator=g) < 0.5
        if k == "enc.bias":
            # θ·(1+u) with |u| ≤ ½ stays within a factor 2 of θ: θ_t − θ₀ is then exact in float32 (Sterbenz)
            u = torch.rand(b.shape, generator=g, dtype=torch.float64) - 0.5
            changed = (b.double() * (1 + u)).float()
        else:
            changed = b + torch.randint(-40, 41, b.shape, generator=g).float() / 32
        ft[k] = torch.where(touched, changed, b)
    return ft


def float64_task_vector(base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tau = {k: ft[k].double() - base[k].double() for k in FLOAT_SHAPES}
    for k in FLOAT_SHAPES:  # the data is built so that float32 maths is exact: the reference is then unambiguous
        assert torch.equal((ft[k] - base[k]).double(), tau[k]), k
    return tau


@dataclass(frozen=True)
class Mask:
    gamma: dict[str, torch.Tensor]
    k: int
    tie_group: int  # entries whose |τ| equals the k-th largest
    tie_taken: int  # how many of them are in the mask
    tie_keys: frozenset[str]  # tensors holding the tie group


def reference_mask(tau: dict[str, torch.Tensor], sparsity: float) -> Mask:
    """γ: the k = ⌊sparsity·N⌋ largest |τ| over all float tensors together; ties by (sorted key, flat index)."""
    keys = sorted(tau)
    flat = torch.cat([tau[k].reshape(-1) for k in keys]).abs().tolist()
    owner = [key for key in keys for _ in range(tau[key].numel())]
    n = len(flat)
    k = math.floor(sparsity * n)
    assert sum(v != 0 for v in flat) > k  # zero entries are never picked; make sure the test does not depend on it
    order = sorted(range(n), key=lambda j: (-flat[j], j))  # a global sort, position = canonical order
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[order[:k]] = True
    kth = flat[order[k - 1]]
    gamma, start = {}, 0
    for key in keys:
        m = tau[key].numel()
        gamma[key] = chosen[start:start + m].reshape(tau[key].shape)
        start += m
    return Mask(gamma, k, sum(v == kth for v in flat), sum(flat[j] == kth for j in order[:k]),
                frozenset(owner[j] for j in range(n) if flat[j] == kth))


def reference_merge(base: dict[str, torch.Tensor], taus: list[dict[str, torch.Tensor]],
                    masks: list[Mask], policy: str, scale: float = 1.0) -> dict[str, torch.Tensor]:
    out = {}
    for key in FLOAT_SHAPES:
        b = base[key].double()
        gamma = torch.stack([m.gamma[key].double() for m in masks])
        v = torch.stack([t[key] for t in taus]) * gamma  # γ_t τ_t
        if policy == "average":
            delta = v.sum(0) / torch.clamp(gamma.sum(0), min=1)
        elif policy == "sum":
            delta = scale * v.sum(0)
        else:  # ties: elected sign of Σγτ (majority of signs on an exact tie), mean of the agreeing values
            elected = torch.sign(v.sum(0))
            majority = torch.sign((v > 0).sum(0) - (v < 0).sum(0)).double()
            elected = torch.where(elected == 0, majority, elected)
            agree = (torch.sign(v) == elected) & (v != 0)
            delta = scale * (v * agree).sum(0) / torch.clamp(agree.sum(0), min=1)
        out[key] = (b + delta).float()
    return out


# --------------------------------------------------------------------------------------------------------------------
# bad inputs (FAULTS B): name -> (builder of the finetuned file, words the error line must contain)


def crafted(path: Path, header: str | bytes, data: bytes) -> None:
    hb = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def edited(ft: dict[str, torch.Tensor], **changes: torch.Tensor | None) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        t = dict(ft)
        for k, v in changes.items():
            k = k.replace("__", ".")
            if v is None:
                del t[k]
            else:
                t[k] = v
        safetensors.torch.save_file(t, path)
    return build


class Payload:
    """Unpickling this creates a folder: the proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def bad_inputs(ft: dict[str, torch.Tensor]) -> dict[str, tuple[Callable[[Path], None], tuple[str, ...]]]:
    nan = ft["enc.weight"].clone()
    nan[3, 4] = float("nan")

    def trailing(path: Path) -> None:
        safetensors.torch.save_file(ft, path)
        with open(path, "ab") as f:
            f.write(b"\0" * 8)

    return {
        # B1: not a safetensors file
        "empty": (lambda p: p.write_bytes(b""), ("empty",)),
        "git_lfs": (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:"
                                           + "ab" * 32 + "\nsize 52428800\n"), ("git-lfs",)),
        "pickle": (lambda p: p.write_bytes(pickle.dumps({"enc.weight": [[0.5] * 30] * 40}, protocol=4)),
                   ("pickle", "skillhub convert")),
        # B2: a pickle whose unpickling would run code: never unpickled
        "evil_pickle": (lambda p: p.write_bytes(pickle.dumps(Payload(p.with_suffix(".pwned")), protocol=2)),
                        ("pickle", "skillhub convert")),
        "html": (lambda p: p.write_text("<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>"),
                 ("HTML",)),
        # B3: hostile headers
        "header_bomb": (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"x" * 64), ("1000000000000", "cap")),
        "trailing_bytes": (trailing, ("8 trailing bytes",)),
        "inconsistent_shape": (lambda p: crafted(p, '{"enc.bias":{"dtype":"F32","shape":[31],"data_offsets":[0,120]}}',
                                                 bytes(120)), ("enc.bias", "needs 124 bytes", "spans 120")),
        # B4: duplicate names (the reference parser would keep the last)
        "duplicate_names": (lambda p: crafted(p, '{"enc.bias":{"dtype":"F32","shape":[30],"data_offsets":[0,120]},'
                                                 '"enc.bias":{"dtype":"F32","shape":[30],"data_offsets":[120,240]}}',
                                              bytes(240)), ("duplicate tensor name 'enc.bias'",)),
        # B5: dtypes
        "fp8": (lambda p: crafted(p, '{"enc.bias":{"dtype":"F8_E4M3","shape":[30],"data_offsets":[0,30]}}',
                                  bytes(30)), ("enc.bias", "F8_E4M3")),
        "int_for_float": (edited(ft, enc__bias=torch.arange(30)), ("enc.bias", "I64", "F32")),
        # B6: another architecture
        "missing_key": (edited(ft, conv__kernel=None), ("missing keys conv.kernel",)),
        "extra_key": (edited(ft, lora__A=torch.zeros(4, 30)), ("unexpected keys lora.A",)),
        "shape_mismatch": (edited(ft, enc__bias=torch.zeros(31)), ("shape mismatch", "enc.bias [31] vs base [30]")),
        # B8: non-finite weights
        "nan": (edited(ft, enc__weight=nan), ("'enc.weight'", "NaN")),
    }


# --------------------------------------------------------------------------------------------------------------------
# the world: files and every command, started at once

#: A fork server for the fault matrix: it imports skillhub (and torch) once, then forks one child per command; each
#: child is a real process that runs ``python -m skillhub`` (``runpy``, as ``-m`` does) with its own argv, working
#: folder, stdout and stderr files and exit code. It saves ~2 s of CPU per command; set SKILLHUB_TESTS_SPAWN_ALL=1
#: to run every command as a fresh ``python -m skillhub`` instead. ``test_the_fork_server_matches_a_fresh_process``
#: checks that both routes give the same result.
FORK_SERVER = r"""
import json, os, runpy, sys, traceback
import skillhub, skillhub.cli, skillhub.config, skillhub.log, skillhub.ops, skillhub.plugins
jobs = json.loads(sys.stdin.read())
sys.stdout.flush()
sys.stderr.flush()
children = {}
for job in jobs:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.argv = ["skillhub", *job["args"]]
            try:
                runpy.run_module("skillhub", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    children[pid] = job["name"]
codes = {}
while children:
    pid, status = os.wait()
    codes[children.pop(pid)] = os.waitstatus_to_exitcode(status)
json.dump(codes, sys.stdout)
"""
SPAWN_ALL = os.environ.get("SKILLHUB_TESTS_SPAWN_ALL") == "1"


def run_forked(cwd: Path, logs: Path, jobs: dict[str, tuple[str, ...]]) -> dict[str, Run]:
    batch = [{"name": name, "args": list(args), "cwd": str(cwd), "stdout": str(logs / f"{name}.out"),
              "stderr": str(logs / f"{name}.err")} for name, args in jobs.items()]
    p = subprocess.run([sys.executable, "-c", FORK_SERVER], input=json.dumps(batch), cwd=cwd, env=ENV,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    codes = json.loads(p.stdout)
    return {name: Run(args, codes[name], (logs / f"{name}.out").read_text(), (logs / f"{name}.err").read_text())
            for name, args in jobs.items()}


@dataclass
class World:
    dir: Path
    base: dict[str, torch.Tensor]
    fts: list[dict[str, torch.Tensor]]
    runs: dict[str, Callable[[], Run]]

    def run(self, name: str) -> Run:
        return self.runs[name]()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("cli")
    logs = tmp_path_factory.mktemp("cli-logs")
    base = make_base()
    fts = [make_finetune(base, 1), make_finetune(base, 2)]
    safetensors.torch.save_file(base, d / "base.safetensors")
    for i, ft in enumerate(fts, 1):
        safetensors.torch.save_file(ft, d / f"ft{i}.safetensors")
    other_base = dict(base, **{BUFFER: torch.tensor(8)})  # same shapes, another file: another base
    safetensors.torch.save_file(other_base, d / "other_base.safetensors")
    bad = bad_inputs(fts[0])
    for name, (build, _) in bad.items():
        build(d / f"bad_{name}.safetensors")
    (d / "base_lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")

    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1))
    runs: dict[str, Callable[[], Run]] = {}
    batches: list[dict[str, tuple[str, ...]]] = [{}, {}]  # for the fork server: independent / after localize

    def spawn(name: str, *args: str, after: tuple[str, ...] = ()) -> None:
        """A fresh ``python -m skillhub`` process, started once the commands ``after`` have finished."""
        deps = [runs[a] for a in after]  # submitted earlier, so started earlier: no deadlock

        def job() -> Run:
            for dep in deps:
                dep()
            return run_cli(d, *args)
        runs[name] = pool.submit(job).result

    def fork(name: str, *args: str, batch: int = 0) -> None:
        if SPAWN_ALL:
            spawn(name, *args, after=("localize1", "localize2") if batch else ())
        else:
            batches[batch][name] = args

    def start_batch(batch: int, after: tuple[str, ...] = ()) -> None:
        deps = [runs[a] for a in after]

        def job() -> dict[str, Run]:
            for dep in deps:
                dep()
            return run_forked(d, logs, batches[batch])
        if batches[batch]:
            fut = pool.submit(job)
            for name in batches[batch]:
                runs[name] = lambda name=name: fut.result()[name]

    # end to end: localize both finetunes and stitch them, as fresh `python -m skillhub` processes
    for i in (1, 2):
        spawn(f"localize{i}", "localize", "--base", "base.safetensors", "--finetuned", f"ft{i}.safetensors",
              "--out", f"ft{i}.mask.safetensors", "--sparsity", str(SPARSITY))
    masks = ("ft1.mask.safetensors", "ft2.mask.safetensors")
    spawn("stitch_average", "stitch", "--base", "base.safetensors", "--out", "merged.safetensors", *masks,
          after=("localize1", "localize2"))
    # one fault also as a fresh process: the control for the fork server
    spawn("fresh_bad_pickle", "localize", "--base", "base.safetensors", "--finetuned", "bad_pickle.safetensors",
          "--out", "out_pickle.mask.safetensors", "--sparsity", str(SPARSITY))

    # everything else through the fork server
    for name in bad:
        fork(f"bad_{name}", "localize", "--base", "base.safetensors", "--finetuned", f"bad_{name}.safetensors",
             "--out", f"out_{name}.mask.safetensors", "--sparsity", str(SPARSITY))
    fork("bad_base", "localize", "--base", "base_lfs.safetensors", "--finetuned", "ft1.safetensors",
         "--out", "out_bad_base.mask.safetensors")
    fork("unknown_strategy", "localize", "--base", "base.safetensors", "--finetuned", "ft1.safetensors",
         "--out", "out_unknown_strategy.mask.safetensors", "--strategy", "nosuch")
    fork("bad_sparsity", "localize", "--base", "base.safetensors", "--finetuned", "ft1.safetensors",
         "--out", "out_bad_sparsity.mask.safetensors", "--sparsity", "2")
    fork("unknown_policy", "stitch", "--base", "base.safetensors", "--out", "out_unknown_policy.safetensors",
         "--policy", "nosuch", "ft1.safetensors")
    fork("plugins", "plugins")
    fork("no_out", "localize", "--base", "base.safetensors", "--finetuned", "ft1.safetensors")
    start_batch(0)
    fork("stitch_sum", "stitch", "--base", "base.safetensors", "--out", "merged_sum.safetensors", "--policy", "sum",
         "--param", "scale=0.5", *masks, batch=1)
    fork("stitch_ties", "stitch", "--base", "base.safetensors", "--out", "merged_ties.safetensors",
         "--policy", "ties", *masks, batch=1)
    fork("stitch_other_base", "stitch", "--base", "other_base.safetensors", "--out", "merged_other.safetensors",
         *masks, batch=1)
    fork("stitch_any_base", "stitch", "--base", "other_base.safetensors", "--out", "merged_any.safetensors",
         "--any-base", *masks, batch=1)
    start_batch(1, after=("localize1", "localize2"))
    try:
        yield World(d, base, fts, runs)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def assert_ok(run: Run) -> None:
    assert run.returncode == 0, str(run)
    assert "Traceback" not in run.stderr, str(run)


def assert_one_line_error(run: Run, code: int = 1) -> str:
    assert run.returncode == code, str(run)
    assert "Traceback" not in run.stderr, str(run)
    lines = run.stderr.splitlines()
    assert len(lines) == 1, str(run)
    assert lines[0].startswith("skillhub: error: "), str(run)
    return lines[0]


def test_the_fork_server_matches_a_fresh_process(world: World) -> None:
    fresh, forked = world.run("fresh_bad_pickle"), world.run("bad_pickle")
    assert (fresh.returncode, fresh.stdout, fresh.stderr) == (forked.returncode, forked.stdout, forked.stderr)


# --------------------------------------------------------------------------------------------------------------------
# end to end: the numbers


@dataclass(frozen=True)
class Reference:
    taus: list[dict[str, torch.Tensor]]
    masks: list[Mask]
    k: int


@pytest.fixture(scope="module")
def reference(world: World) -> Reference:
    taus = [float64_task_vector(world.base, ft) for ft in world.fts]
    masks = [reference_mask(t, SPARSITY) for t in taus]
    assert masks[0].k == masks[1].k
    return Reference(taus, masks, masks[0].k)


def test_the_test_data_exercises_ties_and_overlap(reference: Reference) -> None:
    assert reference.k == math.floor(SPARSITY * sum(math.prod(s) for s in FLOAT_SHAPES.values())) == 261
    for m in reference.masks:
        # the k-th largest |τ| is shared by entries of two tensors on both sides of the cut
        assert 0 < m.tie_taken < m.tie_group
        assert m.tie_keys == {"conv.kernel", "enc.weight"}
    g1, g2 = (m.gamma for m in reference.masks)
    overlap = sum(int((g1[key] & g2[key]).sum()) for key in FLOAT_SHAPES)
    assert 10 < overlap < reference.k
    assert all(int(m.gamma["enc.bias"].sum()) > 0 for m in reference.masks)


def mask_entries(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(indices, values) per key of a mask file's tensors, read from either stored form: ``KEY::indices`` with
    ``KEY::values``, or the dense ``KEY::values`` alone (the mask is its non-zero entries)."""
    out = {}
    for name, values in tensors.items():
        if name.endswith("::values"):
            key = name[: -len("::values")]
            flat = values.reshape(-1)
            idx = tensors[f"{key}::indices"].long() if f"{key}::indices" in tensors else flat.nonzero().squeeze(1)
            out[key] = (idx, flat if f"{key}::indices" in tensors else flat[idx])
    return out


def test_localize_writes_exactly_the_global_top_k(world: World, reference: Reference) -> None:
    k = reference.k
    for i in (1, 2):
        run = world.run(f"localize{i}")
        assert_ok(run)
        assert f"{k} of 1305 entries" in run.stdout
        path = world.dir / f"ft{i}.mask.safetensors"
        with safetensors.safe_open(path, "pt") as f:
            meta = f.metadata()
            tensors = {n: f.get_tensor(n) for n in f.keys()}
        masks = mask_entries(tensors)
        assert sum(idx.numel() for idx, _ in masks.values()) == k
        assert meta["skillhub.base"] == sha256(world.dir / "base.safetensors")
        assert meta["skillhub.source"] == sha256(world.dir / f"ft{i}.safetensors")
        assert meta["skillhub.skill"] == f"ft{i}"
        assert meta["skillhub.strategy"] == "dataless"
        assert json.loads(meta["skillhub.params"]) == {"sparsity": SPARSITY}
        assert json.loads(meta["skillhub.shapes"]) == {key: list(s) for key, s in FLOAT_SHAPES.items()}
        for key in FLOAT_SHAPES:
            want = reference.masks[i - 1].gamma[key].reshape(-1).nonzero().squeeze(1)
            if want.numel() == 0:
                assert key not in masks
                continue
            if f"{key}::indices" in tensors:
                assert tensors[f"{key}::indices"].dtype == torch.int32
            idx, values = masks[key]
            assert idx.tolist() == want.tolist(), key
            assert torch.equal(values, reference.taus[i - 1][key].reshape(-1)[want].float()), key


def load_merged(world: World, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = world.dir / name
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
    return safetensors.torch.load_file(path), meta


def test_stitch_average_is_exactly_localize_and_stitch(world: World, reference: Reference) -> None:
    assert_ok(world.run("stitch_average"))
    merged, meta = load_merged(world, "merged.safetensors")
    assert set(merged) == set(world.base)
    want = reference_merge(world.base, reference.taus, reference.masks, "average")
    g1, g2 = (m.gamma for m in reference.masks)
    for key in FLOAT_SHAPES:
        assert merged[key].dtype == torch.float32
        assert torch.equal(merged[key], want[key]), key
        untouched = ~(g1[key] | g2[key])
        assert torch.equal(merged[key][untouched], world.base[key][untouched])  # exactly θ₀ outside every mask
    assert merged[BUFFER].dtype == torch.int64 and int(merged[BUFFER]) == 7  # the base's buffer, not a finetune's
    manifest = json.loads(meta["skillhub.manifest"])
    assert manifest["base"] == sha256(world.dir / "base.safetensors")
    assert manifest["policy"] == "average"
    assert {n: s["nnz"] for n, s in manifest["skills"].items()} == {"ft1": reference.k, "ft2": reference.k}


def test_stitch_sum_with_a_scale(world: World, reference: Reference) -> None:
    assert_ok(world.run("stitch_sum"))
    merged, meta = load_merged(world, "merged_sum.safetensors")
    want = reference_merge(world.base, reference.taus, reference.masks, "sum", scale=0.5)
    for key in FLOAT_SHAPES:
        torch.testing.assert_close(merged[key], want[key], atol=1e-6, rtol=0)
    assert int(merged[BUFFER]) == 7
    manifest = json.loads(meta["skillhub.manifest"])
    assert manifest["policy"] == "sum" and manifest["policy_params"] == {"scale": 0.5}


def test_stitch_ties(world: World, reference: Reference) -> None:
    assert_ok(world.run("stitch_ties"))
    merged, _ = load_merged(world, "merged_ties.safetensors")
    want = reference_merge(world.base, reference.taus, reference.masks, "ties")
    for key in FLOAT_SHAPES:
        torch.testing.assert_close(merged[key], want[key], atol=1e-6, rtol=0)
    # the policies differ where masks overlap with opposite signs, so the test would notice a swapped policy
    avg, _ = load_merged(world, "merged.safetensors")
    assert any(not torch.equal(avg[key], merged[key]) for key in FLOAT_SHAPES)


# --------------------------------------------------------------------------------------------------------------------
# masks made for another base (FAULTS B7)


def test_stitching_masks_made_for_another_base_is_refused(world: World) -> None:
    line = assert_one_line_error(world.run("stitch_other_base"))
    assert "base" in line
    assert sha256(world.dir / "base.safetensors")[:12] in line
    assert not (world.dir / "merged_other.safetensors").exists()


def test_the_refusal_names_the_mask_file(world: World) -> None:
    assert "ft1.mask.safetensors" in assert_one_line_error(world.run("stitch_other_base"))


def test_any_base_skips_the_check(world: World, reference: Reference) -> None:
    assert_ok(world.run("stitch_any_base"))
    merged, _ = load_merged(world, "merged_any.safetensors")
    want = reference_merge(world.base, reference.taus, reference.masks, "average")
    for key in FLOAT_SHAPES:
        assert torch.equal(merged[key], want[key]), key
    assert int(merged[BUFFER]) == 8


# --------------------------------------------------------------------------------------------------------------------
# content faults: one line, exit 1, nothing written


@pytest.mark.parametrize("name", list(bad_inputs(make_finetune(make_base(), 1))))
def test_a_bad_finetuned_file_is_one_clean_line(world: World, name: str) -> None:
    _, needles = bad_inputs(world.fts[0])[name]
    run = world.run(f"bad_{name}")
    line = assert_one_line_error(run)
    assert f"bad_{name}.safetensors" in line, line
    message = line.split(f"bad_{name}.safetensors", 1)[1]  # the problem, not the file's name, must say it
    for needle in needles:
        assert needle in message, (needle, line)
    assert run.stdout == ""
    assert not (world.dir / f"out_{name}.mask.safetensors").exists()
    assert not [p for p in world.dir.iterdir() if p.name.startswith(f".out_{name}.")]  # no temp debris


def test_a_pickle_is_never_unpickled(world: World) -> None:
    assert_one_line_error(world.run("bad_evil_pickle"))
    assert (world.dir / "bad_evil_pickle.safetensors").read_bytes()[:2] == b"\x80\x02"
    assert not (world.dir / "bad_evil_pickle.pwned").exists()


def test_a_bad_base_file_is_named(world: World) -> None:
    line = assert_one_line_error(world.run("bad_base"))
    assert "base_lfs.safetensors" in line and "git-lfs" in line
    assert not (world.dir / "out_bad_base.mask.safetensors").exists()


# --------------------------------------------------------------------------------------------------------------------
# usage errors and plugins


def test_a_missing_required_flag_exits_2(world: World) -> None:
    run = world.run("no_out")
    assert run.returncode == 2, str(run)
    assert "--out" in run.stderr and "Traceback" not in run.stderr


def test_an_unknown_strategy_exits_2_naming_the_available_ones(world: World) -> None:
    line = assert_one_line_error(world.run("unknown_strategy"), code=2)
    assert "'nosuch'" in line and "dataless" in line
    assert not (world.dir / "out_unknown_strategy.mask.safetensors").exists()


def test_an_unknown_policy_exits_2_naming_the_available_ones(world: World) -> None:
    line = assert_one_line_error(world.run("unknown_policy"), code=2)
    assert "'nosuch'" in line
    for name in ("average", "sum", "ties"):
        assert name in line
    assert not (world.dir / "out_unknown_policy.safetensors").exists()


def test_an_out_of_range_sparsity_is_refused_naming_it(world: World) -> None:
    run = world.run("bad_sparsity")
    line = assert_one_line_error(run, code=run.returncode)
    assert run.returncode != 0
    assert "sparsity" in line
    assert not (world.dir / "out_bad_sparsity.mask.safetensors").exists()


def test_plugins_lists_the_built_ins(world: World) -> None:
    run = world.run("plugins")
    assert_ok(run)
    names = {line.split()[2] if line.startswith(("localization", "stitch", "model")) else "" for line in
             run.stdout.splitlines()}
    for name in ("dataless", "average", "sum", "ties", "state_dict"):
        assert name in names, run.stdout

"""``skillhub merge``: every finetune localized and stitched in one process, run as a real subprocess
(``python -m skillhub merge``) on tiny seeded files.

Task arithmetic (``--sparsity 1.0 --policy sum``) and TIES (``--sparsity 0.2 --scope tensor --policy ties``) must give
bit for bit the tensors that ``skillhub localize`` per finetune followed by ``skillhub stitch`` give, and those of a
float64 reference written here (values on a 1/32 grid, so τ and its sums are exact and the reference is unambiguous;
the grid also makes ties at the k-th value common, which exercises the tie rule). The mask files ``--masks`` writes
are byte for byte those of ``skillhub localize``. A missing file or a finetune of another shape is a usage error:
exit 2 and one line naming the file, no output.

Every command starts Python with torch (about two seconds of CPU), so the module-scoped ``runs`` fixture starts them
all at once, each chain (localize ×3, then stitch) in order.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from test_cli import Run
from test_cli import run_cli as cli

SHAPES = {"enc.weight": (24, 20), "enc.bias": (20,), "conv.kernel": (5, 4, 3)}
BUFFER = "bn.num_batches_tracked"
FINETUNES = ("ft_a", "ft_b", "ft_c")
TA_SCALE = 0.3
TIES_DENSITY = 0.2
TIES_SCALE = 0.9
ENV = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")} | {"SKILLHUB_CACHE_DIR": ""}


def run_cli(cwd: Path, *args: str) -> Run:
    return cli(cwd, *args, env=ENV)  # memory-only fingerprints: every run hashes its files


def make_base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {k: torch.round(torch.randn(s, generator=g) * 32) / 32 for k, s in SHAPES.items()}
    out[BUFFER] = torch.tensor(7, dtype=torch.int64)
    return out


def make_finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """About half the entries of every float tensor moved by a multiple of 1/32 (a different half per seed)."""
    g = torch.Generator().manual_seed(100 + seed)
    ft = {}
    for k, b in base.items():
        if not b.is_floating_point():
            ft[k] = torch.tensor(100 + seed, dtype=b.dtype)  # a finetune's buffer: the merge keeps the base's
            continue
        touched = torch.rand(b.shape, generator=g) < 0.5
        ft[k] = torch.where(touched, b + torch.randint(-40, 41, b.shape, generator=g).float() / 32, b)
    return ft


# --------------------------------------------------------------------------------------------------------------------
# the float64 references


def tensor_topk(tau: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's TIES trimming as skillhub documents it: the ⌊density·numel⌋ largest |τ| of the tensor, ties at the
    k-th value to the earliest flat index, τ = 0 never."""
    flat = tau.reshape(-1).abs().tolist()
    k = math.floor(density * len(flat))
    order = sorted((j for j in range(len(flat)) if flat[j] != 0), key=lambda j: (-flat[j], j))
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.reshape(tau.shape)


def reference(base: dict[str, torch.Tensor], fts: list[dict[str, torch.Tensor]], policy: str
              ) -> dict[str, torch.Tensor]:
    out = {BUFFER: base[BUFFER]}
    for key in SHAPES:
        b = base[key].double()
        taus = torch.stack([ft[key].double() - b for ft in fts])
        assert torch.equal(torch.stack([(ft[key] - base[key]).double() for ft in fts]), taus)  # exact in float32
        if policy == "sum":
            out[key] = (b + TA_SCALE * taus.sum(0)).float()
            continue
        kept = taus * torch.stack([tensor_topk(t, TIES_DENSITY) for t in taus])
        sign = torch.sign(kept.sum(0))
        sign[sign == 0] = 1.0  # zero_sign = "positive"
        agree = ((kept > 0) & (sign > 0)) | ((kept < 0) & (sign < 0))
        mean = (kept * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[key] = (b + TIES_SCALE * mean).float()
    return out


# --------------------------------------------------------------------------------------------------------------------
# the commands, all started at once

MERGES = {
    "ta": (["--sparsity", "1.0"], ["--sparsity", "1.0"], ["--policy", "sum", "--param", f"scale={TA_SCALE}"]),
    "ties": (["--sparsity", str(TIES_DENSITY), "--scope", "tensor"],
             ["--sparsity", str(TIES_DENSITY), "--param", "scope=tensor"],
             ["--policy", "ties", "--param", f"scale={TIES_SCALE}", "--param", "zero_sign=positive"]),
}


@dataclass
class World:
    dir: Path
    base: dict[str, torch.Tensor]
    fts: list[dict[str, torch.Tensor]]
    runs: dict[str, Future[Run]]

    def run(self, name: str) -> Run:
        return self.runs[name].result()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("merge")
    base = make_base()
    fts = [make_finetune(base, i) for i in range(len(FINETUNES))]
    safetensors.torch.save_file(base, d / "base.safetensors")
    for name, ft in zip(FINETUNES, fts):
        safetensors.torch.save_file(ft, d / f"{name}.safetensors")
    wide = dict(fts[0]) | {"enc.bias": torch.zeros(21)}
    safetensors.torch.save_file(wide, d / "wide.safetensors")
    ft_files = [f"{n}.safetensors" for n in FINETUNES]

    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1))

    def submit(*args: str) -> Future[Run]:
        return pool.submit(run_cli, d, *args)

    def chain(steps: list[list[str]]) -> Future[Run]:
        def go() -> Run:
            for step in steps:
                r = run_cli(d, *step)
                if r.returncode:
                    return r
            return r
        return pool.submit(go)

    runs: dict[str, Future[Run]] = {}
    for name, (merge_args, localize_args, policy_args) in MERGES.items():
        runs[f"merge_{name}"] = submit("merge", "--base", "base.safetensors", "--out", f"{name}_merge.safetensors",
                                       *merge_args, *policy_args, "--masks", f"masks_{name}", *ft_files)
        localize = [["localize", "--base", "base.safetensors", "--finetuned", f, "--out",
                     f"{name}_{Path(f).stem}.mask.safetensors", *localize_args] for f in ft_files]
        stitch = ["stitch", "--base", "base.safetensors", "--out", f"{name}_stitch.safetensors", *policy_args,
                  *(step[6] for step in localize)]
        runs[f"stitch_{name}"] = chain([*localize, stitch])
    runs["missing"] = submit("merge", "--base", "base.safetensors", "--out", "out_missing.safetensors",
                             "ft_a.safetensors", "nosuch.safetensors")
    runs["mismatch"] = submit("merge", "--base", "base.safetensors", "--out", "out_mismatch.safetensors",
                              "ft_a.safetensors", "wide.safetensors")
    runs["missing_base"] = submit("merge", "--base", "nobase.safetensors", "--out", "out_missing_base.safetensors",
                                  "ft_a.safetensors")
    try:
        yield World(d, base, fts, runs)
    finally:
        pool.shutdown(wait=True)


def load(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, w in want.items():
        assert got[key].dtype == w.dtype and got[key].shape == w.shape, key
        differ = int((got[key] != w).sum())
        assert differ == 0, f"{key}: {differ} entries differ"


# --------------------------------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("name", list(MERGES))
def test_merge_equals_localize_then_stitch(world: World, name: str) -> None:
    merged, stitched = world.run(f"merge_{name}"), world.run(f"stitch_{name}")
    assert merged.returncode == 0, str(merged)
    assert stitched.returncode == 0, str(stitched)
    assert "3 skills" in merged.stdout, merged.stdout
    assert_same(load(world.dir / f"{name}_merge.safetensors"), load(world.dir / f"{name}_stitch.safetensors"))


@pytest.mark.parametrize("name", list(MERGES))
def test_merge_equals_the_float64_reference(world: World, name: str) -> None:
    assert world.run(f"merge_{name}").returncode == 0
    got = load(world.dir / f"{name}_merge.safetensors")
    want = reference(world.base, world.fts, "sum" if name == "ta" else "ties")
    assert_same(got, want)
    assert int(got[BUFFER]) == 7  # integer buffers keep the base's value
    if name == "ties":  # the trimming matters: TIES is not task arithmetic with another λ
        assert not torch.equal(got["enc.weight"], reference(world.base, world.fts, "sum")["enc.weight"])


@pytest.mark.parametrize("name", list(MERGES))
def test_masks_are_the_files_localize_writes(world: World, name: str) -> None:
    assert world.run(f"merge_{name}").returncode == 0
    assert world.run(f"stitch_{name}").returncode == 0
    written = sorted(p.name for p in (world.dir / f"masks_{name}").iterdir())
    assert written == [f"{n}.mask.safetensors" for n in FINETUNES]
    for n in FINETUNES:
        ours = (world.dir / f"masks_{name}" / f"{n}.mask.safetensors").read_bytes()
        theirs = (world.dir / f"{name}_{n}.mask.safetensors").read_bytes()
        assert hashlib.sha256(ours).hexdigest() == hashlib.sha256(theirs).hexdigest(), n


def assert_usage_error(run: Run, must: Callable[[str], bool]) -> str:
    assert run.returncode == 2, str(run)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("skillhub: error: "), str(run)
    assert "Traceback" not in run.stderr
    assert must(lines[0]), lines[0]
    return lines[0]


def test_a_missing_finetune_is_a_usage_error_naming_it(world: World) -> None:
    assert_usage_error(world.run("missing"), lambda line: "nosuch.safetensors" in line and "no such file" in line)
    assert not (world.dir / "out_missing.safetensors").exists()


def test_a_missing_base_is_a_usage_error_naming_it(world: World) -> None:
    assert_usage_error(world.run("missing_base"), lambda line: "nobase.safetensors" in line)
    assert not (world.dir / "out_missing_base.safetensors").exists()


def test_a_finetune_of_another_shape_is_a_usage_error_naming_it(world: World) -> None:
    line = assert_usage_error(world.run("mismatch"), lambda line: "wide.safetensors" in line)
    assert "enc.bias" in line and "shape" in line
    assert not (world.dir / "out_mismatch.safetensors").exists()
    assert not [p for p in world.dir.iterdir() if p.name.startswith(".out_mismatch")]

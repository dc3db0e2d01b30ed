"""The offline `skillhub stitch` of a big sharded model in bounded memory: peak RSS against one shard plus the masks.

Builds on disk (or takes with ``--dir`` one built by ``bench/scale.py``: a ``base/`` model folder and mask files in
``masks/``) an LLM-shaped synthetic model in bf16, Hugging Face layout: a 32k×2048 embedding and LM head, 16
blocks of attention (q, k, v, o: 2048×2048) and MLP (gate, up: 5632×2048, down: 2048×5632) weights with their
RMS norms, about 0.95B parameters in 4 shards with a ``model.safetensors.index.json`` and a ``config.json``; then
8 mask files at 1% (random sorted indices per tensor, bf16 values; the offline stitch reads masks, not finetunes, so
none is localized here). Then it runs the real command, ``python -m skillhub stitch --base base --out OUT
masks...`` (``skillhub.cli.main``), in a fresh process that reports its own high-water RSS (``VmHWM``), beside
that of an idle process that has imported what the command imports (the interpreter's and torch's own share) and
of one that imported torch alone.

    python bench/scale_offline.py [--dir DIR] [--keep] [--masks 8] [--density 0.01] [--layers 16]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import llama_shapes  # noqa: E402

from skillhub.checkpoint import open_checkpoint, write_safetensors  # noqa: E402
from skillhub.delta import Provenance, SparseDelta, index_dtype  # noqa: E402
from skillhub.fingerprints import fingerprint  # noqa: E402

VOCAB, HIDDEN, MLP = 32000, 2048, 5632


def llm_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    return llama_shapes(layers, VOCAB, HIDDEN, MLP)


def build_base(folder: Path, layers: int, shards: int = 4) -> None:
    """Write the base shard by shard (one shard's tensors in memory at a time), with an index and a config."""
    folder.mkdir(parents=True)
    shapes = llm_shapes(layers)
    total = sum(math.prod(s) for s in shapes.values())
    keys, groups, size = list(shapes), [[]], 0
    for k in keys:  # cut into `shards` runs of about equal size, in key order, as save_pretrained does
        if size >= total / shards * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(k)
        size += math.prod(shapes[k])
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.ones(shapes[k]) if k.endswith("norm.weight") else
                       torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16) for k in group}
        write_safetensors(folder / name, tensors, {"format": "pt"})
        weight_map |= {k: name for k in group}
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": MLP, "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": VOCAB, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False}, indent=2))


def build_masks(folder: Path, base_dir: Path, n: int, density: float) -> list[Path]:
    folder.mkdir(parents=True)
    base = open_checkpoint(base_dir)
    sha = fingerprint(base)
    shapes = {k: tuple(base[k].shape) for k in base}
    out = []
    for m in range(n):
        g = torch.Generator().manual_seed(1000 + m)
        indices, values = {}, {}
        for k, shape in shapes.items():
            numel = math.prod(shape)
            idx = torch.unique(torch.randint(numel, (max(1, int(numel * density)),), generator=g))
            indices[k] = idx.to(index_dtype(numel))
            values[k] = (torch.randn(idx.numel(), generator=g) * 1e-3).to(torch.bfloat16)
        d = SparseDelta(indices, values, shapes, {k: torch.bfloat16 for k in shapes},
                        Provenance(skill=f"skill{m}", base=sha, strategy="synthetic", params={"density": density}))
        out.append(folder / f"skill{m}.mask.safetensors")
        d.save(out[-1])
        del d, indices, values
    return out


#: runs the skillhub command line in this process, then reports the process's own high-water RSS (VmHWM, which
#: starts afresh at exec: a child's rusage maxrss would include the parent's size at the fork)
RUN_AND_REPORT = """
import sys
if sys.argv[2:] == ["=torch"]:  # torch alone
    import torch
    code = 0
elif len(sys.argv) > 2:
    from skillhub.cli import main
    code = main(sys.argv[2:])
else:  # idle: what the command imports before it reads anything (skillhub.offline, the config, the plugins)
    import torch, skillhub.cli, skillhub.config, skillhub.offline, skillhub.plugins
    skillhub.plugins.load_plugins(skillhub.config.load_config(None, env={}).plugins.dirs)
    code = 0
hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))
open(sys.argv[1], 'w').write(hwm.split()[1])
sys.exit(code)
"""


def peak_rss(args: list[str]) -> tuple[int, float, int]:
    """Run ``skillhub ARGS`` (no args: only import what it imports; ``["=torch"]``: import torch alone) in a fresh
    process; its peak RSS in bytes, seconds, exit code."""
    with tempfile.NamedTemporaryFile("r", suffix=".hwm") as f:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", RUN_AND_REPORT, f.name, *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - t0
        if p.returncode:
            sys.stderr.write(p.stderr)
        return int(f.read() or 0) * 1024, seconds, p.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, help="a folder with base/ and masks/ (built here when absent)")
    ap.add_argument("--keep", action="store_true", help="keep the built model and masks")
    ap.add_argument("--masks", type=int, default=8)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--layers", type=int, default=16)
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="skillhub-scale-offline-"))
    try:
        if not (root / "base").is_dir():
            t0 = time.perf_counter()
            build_base(root / "base", args.layers)
            print(f"built the base in {time.perf_counter() - t0:.0f} s")
        masks = sorted((root / "masks").glob("*.mask.safetensors"))
        if not masks:
            t0 = time.perf_counter()
            masks = build_masks(root / "masks", root / "base", args.masks, args.density)
            print(f"built {len(masks)} masks in {time.perf_counter() - t0:.0f} s")
        base = open_checkpoint(root / "base")
        params = sum(base[k].numel for k in base)
        shard_bytes = [f.header.file_size for f in base.files]
        mask_bytes = sum(m.stat().st_size for m in masks)
        shutil.rmtree(root / "out", ignore_errors=True)
        bare, _, _ = peak_rss(["=torch"])
        idle, _, _ = peak_rss([])
        rss, seconds, rc = peak_rss(["stitch", "--base", str(root / "base"), "--out", str(root / "out"),
                                     "--device", "cpu", *map(str, masks)])
        if rc:
            raise SystemExit(f"skillhub stitch failed ({rc})")
        bound = max(shard_bytes) + mask_bytes
        out = open_checkpoint(root / "out")
        assert sorted(out) == sorted(base)
        mib = 2**20
        print(f"model: {params / 1e9:.2f}B parameters bf16, {len(shard_bytes)} shards of "
              f"{', '.join(f'{b / mib:.0f}' for b in shard_bytes)} MiB; {len(masks)} masks at {args.density:.0%}, "
              f"{mask_bytes / mib:.0f} MiB in all")
        print(f"skillhub stitch: {seconds:.1f} s, {seconds / len(masks):.2f} s per skill")
        print(f"peak RSS {rss / mib:.0f} MiB; one shard + the masks = {bound / mib:.0f} MiB; "
              f"ratio {rss / bound:.2f}")
        print(f"idle interpreter (what the command imports: skillhub's CLI, the stitch, torch): {idle / mib:.0f} MiB "
              f"(import torch alone: {bare / mib:.0f} MiB); peak RSS less it {(rss - idle) / mib:.0f} MiB, ratio "
              f"{(rss - idle) / bound:.2f}")
        print(f"output: {len(list((root / 'out').glob('*.safetensors')))} shards, "
              f"index {'yes' if (root / 'out' / 'model.safetensors.index.json').is_file() else 'no'}, "
              f"config {'yes' if (root / 'out' / 'config.json').is_file() else 'no'}")
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif args.dir is None:
            print(f"kept in {root}")


if __name__ == "__main__":
    main()

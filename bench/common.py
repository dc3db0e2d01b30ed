"""Shared helpers of the benchmarks: a ViT-B/32-sized synthetic model, a process's memory from `/proc`, and a
peak-memory sampler."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from skillhub.checkpoint import write_safetensors


def vit_b_shapes(blocks: int = 12, width: int = 768) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a CLIP ViT-B/32 image tower (about 85M parameters with 12 blocks)."""
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (width, 3, 32, 32),
        "class_embedding": (width,),
        "positional_embedding": (50, width),
        "ln_pre.weight": (width,),
        "ln_pre.bias": (width,),
        "ln_post.weight": (width,),
        "ln_post.bias": (width,),
        "proj": (width, 512),
    }
    for b in range(blocks):
        p = f"transformer.resblocks.{b}."
        shapes |= {
            p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
            p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
            p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
            p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
            p + "mlp.c_fc.weight": (4 * width, width), p + "mlp.c_fc.bias": (4 * width,),
            p + "mlp.c_proj.weight": (width, 4 * width), p + "mlp.c_proj.bias": (width,),
        }
    return shapes


def llama_shapes(blocks: int, vocab: int, width: int, mlp: int) -> dict[str, tuple[int, ...]]:
    """An LLM's tensor shapes under LLaMA's names: embedding, ``blocks`` blocks of attention (q, k, v, o) and MLP
    (gate, up, down) weights with their two norms, the final norm and an untied output head."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, width)}
    for b in range(blocks):
        p = f"model.layers.{b}."
        shapes |= {p + "input_layernorm.weight": (width,), p + "post_attention_layernorm.weight": (width,)}
        shapes |= {p + f"self_attn.{n}_proj.weight": (width, width) for n in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (mlp, width), p + "mlp.up_proj.weight": (mlp, width),
                   p + "mlp.down_proj.weight": (width, mlp)}
    shapes |= {"model.norm.weight": (width,), "lm_head.weight": (vocab, width)}
    return shapes


def make_base(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


def make_finetune(base: dict[str, torch.Tensor], seed: int, scale: float = 1e-3,
                  skill_fraction: float = 0.01) -> dict[str, torch.Tensor]:
    """θ₀ + small dense noise everywhere + a larger change on a random ~``skill_fraction`` of entries (the skill)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in base.items():
        noise = torch.randn(t.shape, generator=g) * scale
        skill = (torch.rand(t.shape, generator=g) < skill_fraction) * torch.randn(t.shape, generator=g) * scale * 8
        out[k] = t + noise + skill
    return out


def write_pair(folder: Path, n_finetunes: int = 1, blocks: int = 12) -> tuple[Path, list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    base = make_base(vit_b_shapes(blocks))
    base_path = folder / "base.safetensors"
    write_safetensors(base_path, base, {})
    fts = []
    for i in range(n_finetunes):
        p = folder / f"ft{i}.safetensors"
        write_safetensors(p, make_finetune(base, seed=100 + i), {})
        fts.append(p)
    return base_path, fts


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The numeric fields of ``/proc/PID/status`` by name: sizes in KiB (``VmRSS``, ``RssAnon``, ``RssFile``) and
    counts (``Threads``). Raises ``OSError`` once the process is gone."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            first = rest.split(maxsplit=1)[:1]
            if first and first[0].isdigit():
                out[key] = int(first[0])
    return out


def _rss_anon_kib() -> int:
    return proc_status().get("RssAnon", 0)


class PeakAnon:
    """Samples the process's anonymous RSS (heap, not page cache of mapped files) every few ms; reports the peak
    above the level at entry, in MiB."""

    def __init__(self, every: float = 0.002) -> None:
        self.every = every
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakAnon:
        self.start = _rss_anon_kib()
        self.peak = self.start
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon_kib())
            time.sleep(self.every)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_anon_kib())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 1024


def best_of(fn, repeats: int = 3) -> tuple[float, object]:
    """Minimum wall time of ``repeats`` runs (the least noisy estimate on a shared 2-core machine) and the result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def until(cond, procs, timeout: float, every: float = 0.05) -> None:
    """Wait until ``cond()`` is true, asking every ``every`` seconds (an HTTP error counts as not yet); stop at once
    if one of the service processes ``procs`` exits, and after ``timeout`` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"a service exited with {proc.returncode}")
        try:
            if cond():
                return
        except httpx.HTTPError:
            pass
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout} s")

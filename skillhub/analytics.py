"""Mask analytics: where in the network each skill lives, and how much the skills collide (He et al. 2024,
arXiv 2408.13656, the paper's own figure of the share of each layer a task's mask takes and of the overlap between
tasks' masks).

Computed from a version's mask files (:mod:`skillhub.delta`) alone:

- per skill, its mask size ``nnz`` and the *share* of each tensor and of each layer that its mask takes (masked
  entries / entries of that tensor or layer);
- per pair of skills, ``both`` (entries in both masks), ``jaccard`` (both / entries in either) and
  ``sign_conflict`` (the share of the ``both`` entries where the two task vectors have opposite signs: the entries
  an averaging stitch damages most; 0 when the masks do not overlap).

A *layer* is a group of tensors by key prefix, :func:`layer_of`: the key up to and including its first all-digit
component (the block index: ``blocks.3.1.conv.weight`` → ``blocks.3``,
``transformer.resblocks.11.attn.in_proj_weight`` → ``transformer.resblocks.11``); a key with no such component is grouped by the key less its last component
(``conv_stem.weight`` → ``conv_stem``).

Cost: one pass over each mask (a dense mask is read once to find its non-zero entries) and, per pair and tensor, a
binary search of the smaller sorted index array in the larger: O(Σ mask sizes · log) per pair, never O(model).
:class:`AnalyticsCache` keeps the results per version (a version's masks never change).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skillhub.errors import RegistryError

if TYPE_CHECKING:
    import torch

    from skillhub.delta import SparseDelta

__all__ = ["LAYER_RULE", "AnalyticsCache", "analyze", "layer_of", "mask_loader", "state_analytics", "summary"]

LAYER_RULE = ("key up to its first numeric component (the block index), else the key less its last component")


def layer_of(key: str) -> str:
    """The layer of tensor ``key`` (see the module docstring for the rule)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or key


def _entries(delta: SparseDelta, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted flat indices (int64) of ``key``'s mask and τ there; a dense mask's are its non-zero values."""
    import torch

    if key in delta.indices:
        return delta.indices[key].long(), delta.values[key]
    if key in delta.values:
        flat = delta.values[key].reshape(-1)
        idx = flat.nonzero().reshape(-1)
        return idx, flat[idx]
    empty = torch.zeros(0, dtype=torch.int64)
    return empty, empty.float()


def _overlap(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, int]:
    """(entries in both masks, of them those whose τ signs are opposite) for one tensor."""
    import torch

    if not a[0].numel() or not b[0].numel():
        return 0, 0
    if a[0].numel() < b[0].numel():  # search the smaller index array in the larger one
        a, b = b, a
    (a_idx, a_val), (b_idx, b_val) = a, b
    pos = torch.searchsorted(a_idx, b_idx).clamp_(max=a_idx.numel() - 1)
    hit = a_idx[pos] == b_idx
    both = int(hit.sum())
    if not both:
        return 0, 0
    # signs, not products: a product of two small float16 values underflows to 0 and would hide a conflict
    conflicts = int((torch.sign(a_val[pos[hit]]) * torch.sign(b_val[hit]) < 0).sum())
    return both, conflicts


def analyze(masks: Mapping[str, SparseDelta], *, version: int | None = None,
            layer: Callable[[str], str] = layer_of, held: Mapping[str, object] | None = None) -> dict[str, Any]:
    """The analytics of the skills' masks ``masks`` (skill name → its delta; every delta over the same tensors).

    :param version: the version number the masks belong to (echoed in the answer).
    :param layer: the rule that groups tensor keys into layers (default :func:`layer_of`).
    :param held: skills served on their own route only (the quality gate kept them out of the merged model);
        they are analysed like the others and named under ``"held"``.
    :returns: ``{"version", "layer_rule", "tensor_sizes", "layer_sizes", "held", "skills": {NAME: {"nnz", "share",
        "tensors": {KEY: share}, "layers": {PREFIX: share}}}, "pairs": [{"a", "b", "both", "jaccard",
        "sign_conflict", "layers": {PREFIX: both}}]}``, names and keys sorted.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for name, delta in sorted(masks.items()):
        for key, shape in delta.shapes.items():
            if shapes.setdefault(key, tuple(shape)) != tuple(shape):
                raise RegistryError(f"the masks of {name!r} and another skill disagree on the shape of {key!r}",
                                    key=key, hint="they were localized against different bases")
    keys = sorted(shapes)
    tensor_sizes = {k: math.prod(shapes[k]) for k in keys}
    layer_sizes: dict[str, int] = {}
    for k in keys:
        layer_sizes[layer(k)] = layer_sizes.get(layer(k), 0) + tensor_sizes[k]
    total = sum(tensor_sizes.values())
    names = sorted(masks)
    entries = {n: {k: _entries(masks[n], k) for k in keys} for n in names}
    skills: dict[str, Any] = {}
    for n in names:
        counts = {k: int(entries[n][k][0].numel()) for k in keys}
        per_layer: dict[str, int] = {}
        for k in keys:
            per_layer[layer(k)] = per_layer.get(layer(k), 0) + counts[k]
        nnz = sum(counts.values())
        skills[n] = {"nnz": nnz, "share": nnz / max(total, 1),
                     "tensors": {k: counts[k] / max(tensor_sizes[k], 1) for k in keys},
                     "layers": {p: per_layer[p] / max(layer_sizes[p], 1) for p in sorted(layer_sizes)}}
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = conflicts = 0
            by_layer: dict[str, int] = {}
            for k in keys:
                bk, ck = _overlap(entries[a][k], entries[b][k])
                both, conflicts = both + bk, conflicts + ck
                if bk:
                    by_layer[layer(k)] = by_layer.get(layer(k), 0) + bk
            either = skills[a]["nnz"] + skills[b]["nnz"] - both
            pairs.append({"a": a, "b": b, "both": both, "jaccard": both / either if either else 0.0,
                          "sign_conflict": conflicts / both if both else 0.0, "layers": by_layer})
    return {"version": version, "layer_rule": LAYER_RULE, "parameters": total, "tensor_sizes": tensor_sizes,
            "layer_sizes": {p: layer_sizes[p] for p in sorted(layer_sizes)}, "held": sorted(held or {}),
            "skills": skills, "pairs": pairs}


def mask_loader(state_dir: str | Path) -> Callable[[str], SparseDelta]:
    """Read mask files by their sha256 straight from a state folder (``masks/<sha>.mask.safetensors``): the files
    are immutable and content-addressed, so this needs neither the registry nor its lock (the CLI, a stopped
    service)."""
    from skillhub.delta import SparseDelta
    from skillhub.statefiles import MASK_SUFFIX, SHA_RE

    masks = Path(state_dir) / "masks"

    def load(sha: str) -> SparseDelta:
        if not isinstance(sha, str) or not SHA_RE.fullmatch(sha):
            raise RegistryError(f"not a sha256 hex digest: {sha!r}")
        path = masks / f"{sha}{MASK_SUFFIX}"
        if not path.is_file():
            raise RegistryError("mask file is missing", path=path, hint="run skillhub doctor on the state folder")
        return SparseDelta.load(path)

    return load


def state_analytics(state_dir: str | Path, version: int | None = None) -> dict[str, Any]:
    """:func:`analyze` of a published version of the state folder ``state_dir`` (default: the current one), from
    its manifest and mask files alone: it works beside a running service and without one."""
    from skillhub.publish import Publisher

    models = Path(state_dir) / "models"
    manifest = Publisher.peek(models, version)
    if manifest is None:
        what = "no version is published" if version is None else f"unknown version {version}"
        raise RegistryError(f"{what} in this state folder", path=models,
                            hint="run the service and drop a skill" if version is None else
                            "older versions are pruned ([state] keep_versions); see state/models/")
    return AnalyticsCache(mask_loader(state_dir)).of(int(manifest["version"]), manifest)


class AnalyticsCache:
    """:func:`analyze` of published versions, computed once per version and kept for the ``size`` newest asked.

    :param load_mask: a mask file by its sha256 (``Registry.load_mask``, or :func:`mask_loader`).
    """

    def __init__(self, load_mask: Callable[[str], SparseDelta], size: int = 4) -> None:
        self.load_mask = load_mask
        self.size = size
        self.computed = 0  # how many analyses ran (tests count cache misses)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()

    def of(self, number: int, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """The analytics of version ``number`` with ``manifest``: its merged skills and its held ones."""
        skills = {n: e["mask"] for n, e in (manifest.get("skills") or {}).items()}
        held = {n: e["mask"] for n, e in (manifest.get("held") or {}).items() if e.get("mask") and n not in skills}
        key = (number, tuple(sorted(skills.items())), tuple(sorted(held.items())))
        with self._lock:  # one analysis at a time: a burst of dashboard polls computes it once
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            masks = {n: self.load_mask(sha) for n, sha in {**skills, **held}.items()}
            result = analyze(masks, version=number, held=held)
            self.computed += 1
            self._cache[key] = result
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
            return result


def summary(result: Mapping[str, Any], *, top_layers: int = 5) -> str:
    """A text summary of :func:`analyze`'s answer: per skill its size and densest layers, per pair its overlap."""
    lines = [f"version {result['version']}: {len(result['skills'])} skills over {result['parameters']:,} "
             f"parameters; layers: {result['layer_rule']}"]
    for name, s in result["skills"].items():
        held = " (held: own route only)" if name in result.get("held", ()) else ""
        dense = sorted(s["layers"].items(), key=lambda kv: (-kv[1], kv[0]))[:top_layers]
        lines.append(f"  {name}{held}: {s['nnz']:,} entries ({100 * s['share']:.2f}%); densest layers: "
                     + ", ".join(f"{p} {100 * v:.1f}%" for p, v in dense if v > 0))
    if result["pairs"]:
        lines.append("  overlap:")
    for p in result["pairs"]:
        lines.append(f"    {p['a']} x {p['b']}: both {p['both']:,}, jaccard {p['jaccard']:.4f}, "
                     f"sign conflict {100 * p['sign_conflict']:.1f}%")
    return "\n".join(lines)

"""One-process merge: localize every finetuned checkpoint against the base and stitch them in, without mask files.

It computes what ``skillhub localize`` once per finetune followed by ``skillhub stitch`` compute, through the same
library functions (:func:`~skillhub.ops.localize_checkpoint`, the strategies, the :class:`~skillhub.stitch.Stitcher`
and its policies), so the result is the same tensor for tensor; it just pays the start-up (``import torch``) once
and writes no mask file unless asked. Task arithmetic is ``dataless`` at sparsity 1 with the ``sum`` policy; TIES
as mergekit trims it is ``dataless`` with ``scope = "tensor"`` and the ``ties`` policy.

Every input is opened and checked against the base (header only) before any work: a missing file or a finetune of
another architecture fails in a fraction of a second, naming the file (:func:`open_inputs`). The finetunes are then
localized one at a time, each delta handed to the stitcher as soon as it exists.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skillhub.autosparsity import localize_auto, wants_auto
from skillhub.checkpoint import Checkpoint, open_checkpoint, write_safetensors
from skillhub.delta import SparseDelta
from skillhub.errors import CheckpointError, StitchError, UsageError
from skillhub.families import ModelFamily, Prepared
from skillhub.job import prepare, scorer_for
from skillhub.localize import LocalizeContext
from skillhub.ops import localize_checkpoint
from skillhub.plugins import Plugins
from skillhub.routing import SkillPatcher
from skillhub.stitch import Stitcher, StitchPolicy, resolve_device

#: Finetunes localized ahead of the one being stitched in.
AHEAD = 2


@dataclass(frozen=True)
class Inputs:
    """The base and the finetunes of one merge, opened (headers only) and checked against each other."""

    base: Checkpoint
    #: skill name → the finetune as its family prepared it (keys mapped onto the base's, validated)
    finetuned: dict[str, Prepared]


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge` did: the manifest written into the output's header, and where the time went."""

    manifest: dict[str, Any]
    #: seconds: ``localize`` (all finetunes), ``stitch`` (all adds), ``write`` (the merged tensors, the output)
    seconds: dict[str, float]


def reads_examples(plugins: Plugins, family: ModelFamily, strategy: str,
                   params: Mapping[str, Any] | None) -> dict[str, bool]:
    """:func:`open_inputs`' examples arguments: the strategy needs examples, or ``sparsity = "auto"`` scores on
    them where they exist."""
    return {"examples": plugins.localizer(strategy).needs_examples,
            "optional_examples": wants_auto(params) and family.reads_examples}


def skill_name(path: str | Path) -> str:
    """A finetune's skill name: its file stem, or the folder's name for a checkpoint folder."""
    name = Path(path).name
    return name.removesuffix(".safetensors") if name.endswith(".safetensors") else Path(path).stem


def open_inputs(base_path: str | Path, finetuned_paths: Sequence[str | Path], family: ModelFamily, *,
                examples: bool = False, optional_examples: bool = False) -> Inputs:
    """Open the base and every finetune and check each against the base (keys, shapes, float dtypes), reading
    headers only. Raises :class:`~skillhub.errors.CheckpointError` naming the first file that does not fit.

    :param examples: also read each finetune's few-shot examples (data-driven strategies).
    :param optional_examples: read them where a finetune has usable ones (``sparsity = "auto"``), without them else.
    """
    if not finetuned_paths:
        raise UsageError("no finetuned checkpoint given", hint="pass one or more finetuned checkpoints after --base")
    base = open_checkpoint(base_path)
    family.included_keys(base)  # a base with nothing to merge is refused before the finetunes are looked at
    prepared: dict[str, Prepared] = {}
    for i, path in enumerate(finetuned_paths):
        name = skill_name(path)
        if name in prepared:  # two files of the same stem: still two skills
            name = f"{name}#{i}"
        prepared[name] = prepare(family, base, open_checkpoint(path), None, needs=examples, wants=optional_examples)
        if examples and prepared[name].examples_error:
            raise CheckpointError(f"unusable few-shot examples: {prepared[name].examples_error}", path=path,
                                  hint="fix the examples, or use the dataless strategy")
    return Inputs(base, prepared)


def merge(inputs: Inputs, out: str | Path, *, plugins: Plugins, family: ModelFamily, policy: StitchPolicy,
          strategy: str = "dataless", params: Mapping[str, Any] | None = None, device: str = "cpu",
          masks: str | Path | None = None, threads: int | None = None,
          progress: Callable[[int, int], None] | None = None) -> MergeResult:
    """θ₀ with every finetune localized (``strategy``, ``params``) and stitched in (``policy``), written to ``out``
    (every tensor of the base; those not included keep the base's values).

    The finetunes are localized one after another in a worker thread, each task vector streamed from the mapped
    files, while this thread builds the stitcher and adds each delta as soon as it is ready: the two halves of the
    work overlap on two cores, and each waits for the other only once per finetune, never inside an operation.
    With ``masks`` (a folder) each skill's mask file is also written there, ``NAME.mask.safetensors``, exactly as
    ``skillhub localize`` writes it. Returns the manifest also stored in the output's header metadata
    (``skillhub.manifest``, as ``skillhub stitch`` writes it).

    :param threads: torch's intra-op threads while merging (restored after). The overlap above already keeps two
        cores busy; one thread per operation avoids torch's threads waiting on each other at every operation when
        other jobs share the cores. ``None`` leaves torch's setting alone.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _merge(inputs, out, plugins=plugins, family=family, policy=policy, strategy=strategy, params=params,
                      device=device, masks=Path(masks) if masks is not None else None, progress=progress)
    finally:
        torch.set_num_threads(before)


def _merge(inputs: Inputs, out: str | Path, *, plugins: Plugins, family: ModelFamily, policy: StitchPolicy,
           strategy: str, params: Mapping[str, Any] | None, device: str, masks: Path | None,
           progress: Callable[[int, int], None] | None) -> MergeResult:
    base = inputs.base
    needs = plugins.localizer(strategy).needs_examples
    seconds = {"localize": 0.0, "stitch": 0.0, "write": 0.0}
    if masks is not None:
        masks.mkdir(parents=True, exist_ok=True)
    base_sha: list[str] = []  # the base is hashed once, by the first localization
    patcher: list[SkillPatcher | None] = []  # θ₀ to score masks on (sparsity "auto"), built on first use

    def scorer() -> SkillPatcher | None:
        if not patcher:
            patcher.append(scorer_for(base, family, resolve_device(device)))
        return patcher[0]

    def localize(name: str, prepared: Prepared) -> SparseDelta:
        t0 = time.perf_counter()
        ctx = LocalizeContext()
        if needs:
            assert prepared.examples is not None
            ctx.examples = family.objective(base, prepared.head, prepared.examples)

        def run(p: Mapping[str, Any] | None) -> SparseDelta:
            return localize_checkpoint(base, prepared, family=family, localizer=strategy, params=p, plugins=plugins,
                                       skill=name, ctx=ctx, base_sha=base_sha[0] if base_sha else None).delta

        if wants_auto(params):  # the service's ladder, scored on each finetune's examples when it brings them
            delta, _ = localize_auto(run, lambda d: d, params or {}, prepared, scorer, skill=name)
        else:
            delta = run(params)
        base_sha[:] = [delta.provenance.base]
        seconds["localize"] += time.perf_counter() - t0
        return delta

    items = list(inputs.finetuned.items())
    skills: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="skillhub-merge") as worker:
        # Up to AHEAD localizations queued, so the worker never waits for this thread (which builds the stitcher
        # meanwhile, then adds), and no more than AHEAD finished deltas wait for their add.
        pending = deque(worker.submit(localize, *item) for item in items[:AHEAD])
        try:
            keys = family.included_keys(base)
            stitcher = Stitcher({k: base.tensor(k) for k in keys}, policy, device=device)
            for done, (name, _) in enumerate(items, start=1):
                delta = pending.popleft().result()
                if done + AHEAD <= len(items):
                    pending.append(worker.submit(localize, *items[done + AHEAD - 1]))
                t0 = time.perf_counter()
                stitcher.add(name, delta, removable=False)  # never taken out: the stitcher need not keep it
                seconds["stitch"] += time.perf_counter() - t0
                skills[name] = {"source": delta.provenance.source, "strategy": delta.provenance.strategy,
                                "nnz": delta.nnz}
                if masks is not None:
                    skills[name]["mask"] = delta.save(masks / f"{name}.mask.safetensors")
                del delta  # the stitcher keeps its accumulators only
                if progress is not None:
                    progress(done, len(items))
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    t0 = time.perf_counter()
    merged: dict[str, torch.Tensor] = {}
    for key in keys:
        t = stitcher.tensor(key)  # the live tensor: the stitcher goes away after the write, no copy is needed
        if not bool(torch.isfinite(t).all()):
            raise StitchError(f"merging produced NaN or Inf in {key!r}", key=key)
        merged[key] = t
    manifest = {
        "base": base_sha[0],
        "policy": policy.name,
        "policy_params": policy.params.model_dump(mode="json"),
        "skills": skills,
        "created": time.time(),
    }
    write_safetensors(out, {k: merged[k] if k in merged else base.tensor(k) for k in base},
                      {"skillhub.manifest": json.dumps(manifest, sort_keys=True)})
    seconds["write"] = time.perf_counter() - t0
    return MergeResult(manifest, seconds)


def merge_files(base_path: str | Path, finetuned_paths: Sequence[str | Path], out: str | Path, *,
                plugins: Plugins, family: ModelFamily, policy: StitchPolicy, strategy: str = "dataless",
                params: Mapping[str, Any] | None = None, device: str = "cpu", masks: str | Path | None = None,
                threads: int | None = None, progress: Callable[[int, int], None] | None = None) -> MergeResult:
    """:func:`open_inputs` then :func:`merge`: the whole merge from paths."""
    inputs = open_inputs(base_path, finetuned_paths, family, **reads_examples(plugins, family, strategy, params))
    return merge(inputs, out, plugins=plugins, family=family, policy=policy, strategy=strategy, params=params,
                 device=device, masks=masks, threads=threads, progress=progress)

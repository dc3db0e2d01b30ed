"""The quality gate: before a stitched version is published, every skill that brought examples is scored on it, and
a version that makes a skill worse is held back (``[publish] gate``).

For each skill with check examples (:mod:`skillhub.quality`), on every candidate version:

- ``base``: θ₀ (computed once per head and examples);
- ``skill``: the skill's own localized model θ₀ + γ⊙τ (once per mask);
- ``merged``: the candidate (every candidate);

each with the skill's head re-centred on that model's features of the fit examples, so that every accuracy is out
of sample (a drop's head is usually fitted on the very examples it carries) and the three compare like with like.
The heads re-centred for the ``skill`` and ``merged`` routes are stored (content-addressed, like every head) and
named in the version's manifest under ``quality``, so the version serves exactly what was scored; a skill the gate
holds out of the merged model is scored on its own route (:meth:`Gate.own_route`).

With ``[publish] recalibrate_statistics`` the models are first recalibrated (the family's
:func:`~skillhub.hookspecs.recalibrate_statistics`: BatchNorm running statistics re-estimated on fit examples): a
candidate on every merged skill's fit examples pooled, a skill's own model on its own. The new statistics become
the candidate's weights (so the merged route, the weights file and the download serve them) and, for the skill
route, are stored and named in the manifest beside the head (``quality.<skill>.statistics.skill``), patched in with
the skill's mask. θ₀ is scored as it is: it is the reference a skill must beat.

A candidate *fails* a skill when its merged accuracy is below the skill's ``base`` accuracy, or more than
``max_drop`` below the merged accuracy of the version served now. With ``gate = "hold"`` the skills the candidate
would newly add are *held*: left out of the merged model (a held skill is still served on its own route), and the
version is built without them; ``"warn"`` publishes and logs; ``"off"`` scores nothing. A skill without examples
passes on the smoke check alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from skillhub.head import Head
from skillhub.log import get_logger
from skillhub.quality import Score, Split, score, split
from skillhub.routing import SkillPatcher, route_key, with_statistics

if TYPE_CHECKING:
    import torch

    from skillhub.delta import SparseDelta
    from skillhub.families import Examples, Runtime
    from skillhub.publish import ModelVersion

log = get_logger("skillhub.gate")


@dataclass
class Verdict:
    """What the gate found on one candidate: per skill, accuracies and the heads to serve; the skills that fail."""

    #: skill -> {"accuracy": {"base", "skill", "merged"}, "heads": {"skill": sha, "merged": sha}, "examples": n}
    quality: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: skill -> why the candidate fails it
    failing: dict[str, str] = field(default_factory=dict)


class Gate:
    """Scores candidates on the skills' examples.

    :param runtime: builds a runnable model from a full set of tensors (the family's ``runtime``).
    :param base: θ₀'s tensors, all of them.
    :param heads: a head by its sha256.
    :param examples: a skill's stored examples by their sha256.
    :param masks: a mask file's content by its sha256.
    :param store_head: stores a head, returns its sha256.
    :param statistics: re-estimates a runnable model's normalization statistics on example images (the plugins'
        :func:`~skillhub.hookspecs.recalibrate_statistics` for the served family), or ``None``: none are.
    :param store_statistics: stores such statistics, returns their sha256.
    """

    def __init__(self, *, runtime: Callable[[Mapping[str, torch.Tensor]], Runtime | None],
                 base: Callable[[], Mapping[str, torch.Tensor]], heads: Callable[[str | None], Head | None],
                 examples: Callable[[str], Examples], masks: Callable[[str], SparseDelta],
                 store_head: Callable[[Head], str],
                 statistics: Callable[[Runtime, torch.Tensor], Mapping[str, torch.Tensor] | None] | None = None,
                 store_statistics: Callable[[Mapping[str, torch.Tensor]], str] | None = None) -> None:
        self._runtime, self._base, self._heads = runtime, base, heads
        self._examples, self._masks, self._store_head = examples, masks, store_head
        self._statistics, self._store_statistics = statistics, store_statistics
        self._patcher: SkillPatcher | None = None
        self._splits: dict[str, Split] = {}
        self._base_scores: dict[tuple[str, str], Score] = {}  # (head, examples) -> θ₀'s score
        # (mask, head, examples, recalibrated) -> own model's score
        self._skill_scores: dict[tuple[str, str, str, bool], Score] = {}
        #: the last candidate scored and its runnable model: the inference engine takes it over when that candidate
        #: is published, rather than building the same model again
        self.candidate_runtime: tuple[ModelVersion, Runtime] | None = None

    def _split(self, sha: str) -> Split:
        if sha not in self._splits:
            self._splits[sha] = split(self._examples(sha))
        return self._splits[sha]

    def _base_runtime(self) -> SkillPatcher:
        if self._patcher is None:
            rt = self._runtime(self._base())
            if rt is None:
                raise RuntimeError("the model family serves no inference: nothing to score")
            self._patcher = SkillPatcher(rt)
        return self._patcher

    def _candidate(self, candidate: ModelVersion) -> Runtime | None:
        """``candidate``'s runnable model, built once per candidate."""
        if self.candidate_runtime is None or self.candidate_runtime[0] is not candidate:
            rt = self._runtime(candidate.tensors)
            self.candidate_runtime = (candidate, rt) if rt is not None else None
        return self.candidate_runtime[1] if self.candidate_runtime is not None else None

    def probe(self, candidate: ModelVersion) -> str | None:
        """The smoke check's model part: one batch of fixed images through ``candidate``; why it fails, else None."""
        import torch

        rt = self._candidate(candidate)
        if rt is None:
            return None
        size = rt.image_size or 32
        images = torch.randint(0, 256, (2, 3, size, size), generator=torch.Generator().manual_seed(0),
                               dtype=torch.uint8)
        try:
            out = rt.embed(rt.normalise(images))
        except Exception as e:  # a model that cannot run at all fails its smoke check, whatever the error
            return f"a probe batch through the model failed: {type(e).__name__}: {e}"
        if not bool(torch.isfinite(out).all()):
            return "a probe batch through the model gives NaN/Inf outputs"
        return None

    def evaluate(self, candidate: ModelVersion, served: ModelVersion | None, *, max_drop: float,
                 statistics: bool = False) -> Verdict:
        """Score every skill of ``candidate`` that has a head and examples; name the skills it fails. With
        ``statistics``, the candidate and each skill's own model are recalibrated first (module docstring)."""
        verdict = Verdict()
        entries = {n: e for n, e in candidate.manifest["skills"].items() if e.get("head") and e.get("examples")}
        if not entries:
            return verdict
        rt = self._candidate(candidate)
        if rt is None:
            return verdict
        before = (served.manifest.get("quality") or {}) if served is not None else {}
        if statistics:
            self._recalibrate(candidate, rt, [entries[n] for n in sorted(entries)])
        for name, entry in sorted(entries.items()):
            scored = self._own(entry, statistics)
            if scored is None:
                continue
            head, ex, base, own = scored
            merged = score(rt, head, ex)
            acc = {"base": base.accuracy, "skill": own.accuracy, "merged": merged.accuracy}
            verdict.quality[name] = {"accuracy": acc, "examples": {"fit": int(ex.fit.labels.numel()),
                                                                   "check": int(ex.check.labels.numel())},
                                     "heads": {"skill": self._store_head(own.head),
                                               "merged": self._store_head(merged.head)}}
            if own.statistics is not None:
                verdict.quality[name]["statistics"] = {"skill": own.statistics}
            if merged.accuracy is None:
                continue
            if base.accuracy is not None and merged.accuracy < base.accuracy:
                verdict.failing[name] = (f"merged accuracy {merged.accuracy:.3f} is below the base model's "
                                         f"{base.accuracy:.3f} on the check examples of skill {name!r}")
            prev = (before.get(name) or {}).get("accuracy", {}).get("merged")
            if prev is not None and merged.accuracy < prev - max_drop:
                verdict.failing[name] = (f"merged accuracy {merged.accuracy:.3f} dropped more than {max_drop} "
                                         f"from {prev:.3f} in the served version on the check examples of skill "
                                         f"{name!r}")
        return verdict

    def own_route(self, entry: Mapping[str, Any], statistics: bool = False) -> dict[str, Any] | None:
        """The quality record of a skill served on its own route only (held out of the merged model): its ``base``
        and ``skill`` accuracies and its re-centred head (and recalibrated statistics) there; ``None`` without a
        head or examples."""
        scored = self._own(entry, statistics) if entry.get("head") and entry.get("examples") else None
        if scored is None:
            return None
        _, ex, base, own = scored
        record: dict[str, Any] = {
            "accuracy": {"base": base.accuracy, "skill": own.accuracy, "merged": None},
            "examples": {"fit": int(ex.fit.labels.numel()), "check": int(ex.check.labels.numel())},
            "heads": {"skill": self._store_head(own.head)}}
        if own.statistics is not None:
            record["statistics"] = {"skill": own.statistics}
        return record

    def _own(self, entry: Mapping[str, Any], statistics: bool = False) -> tuple[Head, Split, Score, Score] | None:
        """A skill's head, examples, and its scores on θ₀ and on its own model (both cached)."""
        head = self._heads(entry["head"])
        if head is None:
            return None
        ex = self._split(entry["examples"])
        base = self._base_scores.get((entry["head"], entry["examples"]))
        if base is None:
            patcher = self._base_runtime()
            patcher.restore()
            base = self._base_scores[(entry["head"], entry["examples"])] = score(patcher.runtime, head, ex)
        recalibrate = statistics and self._statistics is not None
        key = (entry["mask"], entry["head"], entry["examples"], recalibrate)
        if key not in self._skill_scores:
            self._skill_scores[key] = self._own_score(entry["mask"], head, ex, recalibrate)
        return head, ex, base, self._skill_scores[key]

    def _own_score(self, mask: str, head: Head, ex: Split, recalibrate: bool) -> Score:
        """The skill's own model θ₀ + γ⊙τ scored, recalibrated first on its fit examples when asked (the statistics
        are then stored, and the score names them: the skill route patches them in with the mask)."""
        patcher = self._base_runtime()
        delta = self._masks(mask)
        rt = patcher.use(mask, delta)
        if not recalibrate:
            return score(rt, head, ex)
        stats = self._estimate(rt, ex.fit.images)
        if not stats:
            return score(rt, head, ex)
        assert self._store_statistics is not None
        sha = self._store_statistics(stats)
        rt = patcher.use(route_key(mask, sha), with_statistics(delta, self._base(), stats))
        scored = score(rt, head, ex)
        return Score(scored.head, scored.accuracy, sha)

    def _recalibrate(self, candidate: ModelVersion, rt: Runtime, entries: list[Mapping[str, Any]]) -> None:
        """Re-estimate ``candidate``'s normalization statistics on the fit examples of ``entries`` pooled, and make
        them its weights (its runtime's, which the engine adopts, and its tensors, which a rebuild, the weights file
        and the download read); named in its manifest under ``statistics``. Once per candidate."""
        if "statistics" in candidate.manifest or self._statistics is None:
            return
        fits = [self._split(e["examples"]).fit.images for e in entries]
        stats = self._estimate(rt, _pooled([f for f in fits if f.shape[0]], rt.image_size))
        if not stats:
            return
        import torch

        live = rt.tensors()
        tensors = candidate.tensors
        assert isinstance(tensors, dict)  # a candidate's own dict, built for it and not yet shared with anyone
        with torch.no_grad():
            for key, value in stats.items():
                live[key].copy_(value)
                tensors[key] = value.to(dtype=tensors[key].dtype)
        assert self._store_statistics is not None
        candidate.manifest["statistics"] = {"merged": self._store_statistics(stats),
                                            "examples": sorted(str(e["examples"]) for e in entries)}

    def _estimate(self, rt: Runtime, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The family's recalibrated statistics for ``rt`` on ``images`` (``{}``: nothing to recalibrate), checked:
        tensors the model has, of their shape, finite."""
        import torch

        assert self._statistics is not None
        stats = dict(self._statistics(rt, images) or {})
        live = rt.tensors()
        for key, value in stats.items():
            if key not in live or tuple(value.shape) != tuple(live[key].shape):
                raise RuntimeError(f"recalibrated statistics for {key!r} do not fit the model")
            if not bool(torch.isfinite(value).all()):
                log.warning("statistics_not_finite", key=key)
                return {}
        return {k: v.detach().to(live[k].dtype).cpu() for k, v in stats.items()}


def _pooled(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """Several skills' example images as one batch: as they are when they share a size, else each resized to the
    model's input ``size`` (kept uint8 when it was: a few hundred images at 224 px stay ~100 MB)."""
    import torch

    if not images:
        return torch.zeros(0, 3, max(size, 1), max(size, 1), dtype=torch.uint8)
    if len({tuple(x.shape[1:]) for x in images}) == 1 and len({x.dtype for x in images}) == 1:
        return torch.cat(images)
    out = []
    for x in images:
        f = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        f = torch.nn.functional.interpolate(f, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
        out.append((f.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(out)

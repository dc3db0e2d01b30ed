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
from skillhub.routing import SkillPatcher

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
    """

    def __init__(self, *, runtime: Callable[[Mapping[str, torch.Tensor]], Runtime | None],
                 base: Callable[[], Mapping[str, torch.Tensor]], heads: Callable[[str | None], Head | None],
                 examples: Callable[[str], Examples], masks: Callable[[str], SparseDelta],
                 store_head: Callable[[Head], str]) -> None:
        self._runtime, self._base, self._heads = runtime, base, heads
        self._examples, self._masks, self._store_head = examples, masks, store_head
        self._patcher: SkillPatcher | None = None
        self._splits: dict[str, Split] = {}
        self._base_scores: dict[tuple[str, str], Score] = {}  # (head, examples) -> θ₀'s score
        self._skill_scores: dict[tuple[str, str, str], Score] = {}  # (mask, head, examples) -> own model's score
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

    def evaluate(self, candidate: ModelVersion, served: ModelVersion | None, *, max_drop: float) -> Verdict:
        """Score every skill of ``candidate`` that has a head and examples; name the skills it fails."""
        verdict = Verdict()
        entries = {n: e for n, e in candidate.manifest["skills"].items() if e.get("head") and e.get("examples")}
        if not entries:
            return verdict
        rt = self._candidate(candidate)
        if rt is None:
            return verdict
        before = (served.manifest.get("quality") or {}) if served is not None else {}
        for name, entry in sorted(entries.items()):
            scored = self._own(entry)
            if scored is None:
                continue
            head, ex, base, own = scored
            merged = score(rt, head, ex)
            acc = {"base": base.accuracy, "skill": own.accuracy, "merged": merged.accuracy}
            verdict.quality[name] = {"accuracy": acc, "examples": {"fit": int(ex.fit.labels.numel()),
                                                                   "check": int(ex.check.labels.numel())},
                                     "heads": {"skill": self._store_head(own.head),
                                               "merged": self._store_head(merged.head)}}
            if merged.accuracy is None:
                continue
            if base.accuracy is not None and merged.accuracy < base.accuracy:
                verdict.failing[name] = (f"merged accuracy {merged.accuracy:.3f} is below the base model's "
                                         f"{base.accuracy:.3f} on {name!r}'s check examples")
            prev = (before.get(name) or {}).get("accuracy", {}).get("merged")
            if prev is not None and merged.accuracy < prev - max_drop:
                verdict.failing[name] = (f"merged accuracy {merged.accuracy:.3f} dropped more than {max_drop} "
                                         f"from {prev:.3f} in the served version on {name!r}'s check examples")
        return verdict

    def own_route(self, entry: Mapping[str, Any]) -> dict[str, Any] | None:
        """The quality record of a skill served on its own route only (held out of the merged model): its ``base``
        and ``skill`` accuracies and its re-centred head there; ``None`` without a head or examples."""
        scored = self._own(entry) if entry.get("head") and entry.get("examples") else None
        if scored is None:
            return None
        _, ex, base, own = scored
        return {"accuracy": {"base": base.accuracy, "skill": own.accuracy, "merged": None},
                "examples": {"fit": int(ex.fit.labels.numel()), "check": int(ex.check.labels.numel())},
                "heads": {"skill": self._store_head(own.head)}}

    def _own(self, entry: Mapping[str, Any]) -> tuple[Head, Split, Score, Score] | None:
        """A skill's head, examples, and its scores on θ₀ and on its own model (both cached)."""
        head = self._heads(entry["head"])
        if head is None:
            return None
        ex = self._split(entry["examples"])
        base = self._scored(self._base_scores, (entry["head"], entry["examples"]), None, head, ex)
        own = self._scored(self._skill_scores, (entry["mask"], entry["head"], entry["examples"]), entry["mask"],
                           head, ex)
        return head, ex, base, own

    def _scored(self, cache: dict[Any, Score], key: Any, mask: str | None, head: Head, ex: Split) -> Score:
        if key not in cache:
            patcher = self._base_runtime()
            if mask is None:
                patcher.restore()
                rt = patcher.runtime
            else:
                rt = patcher.use(mask, self._masks(mask))
            cache[key] = score(rt, head, ex)
        return cache[key]

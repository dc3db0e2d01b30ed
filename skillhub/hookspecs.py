"""The plugin author's manual: every hook skillhub calls, in one place.

skillhub uses pluggy (the plugin system of pytest). A plugin is a module or object with functions named after the
hooks below and decorated with :data:`hookimpl`::

    from skillhub import hookimpl
    from skillhub.localize import Localizer

    class MyStrategy(Localizer):
        name = "mine"
        ...

    @hookimpl
    def register_localizers():
        return [MyStrategy]

Plugins are found, in this order: the built-in default plugins (the ``dataless`` strategy, the ``average``, ``sum``
and ``ties`` stitch policies, the ``state_dict`` and ``open_clip`` families, registered through these same hooks);
packages that declare an entry point in the group ``skillhub``; and every ``*.py`` file in the folders that
``config.toml``'s ``[plugins] dirs`` names (``plugins/`` by default). A function decorated with ``@hookimpl`` whose
name is not a hook below is an error at start-up (a misspelled hook never silently does nothing), and so is a
strategy, policy or family name registered twice.

Hooks come in two kinds:

- **registration hooks** (``register_*``) are called once when the plugin manager is built. Every plugin's list
  is collected; return ``[]`` or ``None`` when you register nothing of that kind.
- **model hooks** (``recalibrate_*``) are asked by the service for a result while it builds a version; the first
  plugin that answers (not ``None``) wins, so a plugin answers only for the families and models it knows.
- **event hooks** (``skill_*``, ``version_*``) are called by the service as things happen, on the thread where
  it happened: ``skill_registered`` and ``skill_failed`` on the intake's worker (or the re-localization worker, or
  the thread that called :meth:`Hub.ingest`), ``version_published`` and a stitch's ``skill_failed`` on the thread
  that reconciles (the daemon's main loop), so two events may run at once. They are notifications: their return value is ignored, they must be quick (hand long work to a thread of
  your own), and an exception they raise is logged and otherwise ignored, so a broken plugin never stops the
  service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from skillhub.families import ModelFamily, Runtime
    from skillhub.localize import Localizer
    from skillhub.stitch import StitchPolicy

PROJECT = "skillhub"
hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorate your hook implementations with this.
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- registration -------------------------------------------------------------------------------------------------


@hookspec
def register_localizers() -> list[type[Localizer]] | None:  # type: ignore[empty-body]
    """Register localization strategies.

    A strategy is a subclass of :class:`skillhub.localize.Localizer` with a unique ``name`` (what ``config.toml``'s
    ``[localize] strategy`` and ``skillhub localize --strategy`` call it), a ``Params`` pydantic model (frozen,
    ``extra="forbid"``, every field with a default) and a pure method ``localize(task, params, ctx)`` that returns a
    :class:`skillhub.delta.SparseDelta`. It must do no I/O of its own and read no config: the core validates the
    params with your ``Params`` model and hands you a :class:`skillhub.taskvector.TaskVector` that streams τ = θₜ − θ₀
    tensor by tensor. Set ``needs_examples = True`` if the strategy needs few-shot task data (``ctx.examples``).

    :return: a list of ``Localizer`` subclasses (classes, not instances), or ``None``.
    """


@hookspec
def register_stitch_policies() -> list[type[StitchPolicy]] | None:  # type: ignore[empty-body]
    """Register stitch policies: how the sparse deltas of the active skills combine into merged weights.

    A policy is a subclass of :class:`skillhub.stitch.StitchPolicy` with a unique ``name`` and a ``Params`` model.
    Every policy is incremental: it declares per-entry accumulators, updates them when one skill is added or removed
    (touching only that skill's indices), and materialises the merged delta at given indices from them. The stitcher
    keeps the per-entry mask count itself and resets an entry to exactly θ₀ when no mask covers it any more.

    :return: a list of ``StitchPolicy`` subclasses, or ``None``.
    """


@hookspec
def register_families() -> list[type[ModelFamily]] | None:  # type: ignore[empty-body]
    """Register model families: what a model *is* (DESIGN §3).

    A family (subclass of :class:`skillhub.families.ModelFamily`) decides which tensors are *included* in
    localization and stitching, how checkpoint keys are normalised, and, for families that serve inference, how to
    build a runnable model from merged weights.

    :return: a list of ``ModelFamily`` subclasses, or ``None``.
    """


# --- models -------------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def recalibrate_statistics(family: str, runtime: Runtime, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Re-estimate a served model's normalization statistics on few-shot example images.

    Merging (and localizing: θ₀ + γ⊙τ) moves the features each layer sees, while the normalization statistics
    (BatchNorm's running means and variances) stay θ₀'s; re-estimating them on data of the served skills is one of
    the post-stitch levers DESIGN §9 names. With ``[publish] recalibrate_statistics = true`` the quality gate asks
    this hook, once per candidate version (the merged route: the fit examples of every skill in it, pooled) and once
    per skill mask (the skill route: that skill's fit examples), *before* it re-centres heads and scores the check
    examples, so the accuracy it records is the recalibrated model's. The tensors you return replace the model's:
    in the version's weights (the merged route's runtime, the weights file and ``/v1/model/weights``) and, for the
    skill route, patched in with the skill's mask and written back after (θ₀'s stored weights never change).

    Rules for an implementation:

    - answer only for your family (compare ``family`` with your family's ``name``) and runtimes you know; return
      ``None`` otherwise, so that another plugin may answer;
    - leave ``runtime`` as you found it (its tensors, train/eval mode): return new tensors, do not keep them in it;
    - be deterministic: the same runtime and images give the same tensors (a restart rebuilds the same version and
      must serve the same weights); fixed batch order, no unseeded randomness;
    - return only tensors the runtime has (:meth:`~skillhub.families.Runtime.tensors` keys), each of the same shape
      and dtype, finite; return ``{}`` when the model has nothing to recalibrate.

    The built-in open_clip family re-estimates every BatchNorm layer's running mean and variance
    (:func:`skillhub.families.normstats.batchnorm_statistics`); transformers' LayerNorm keeps no statistics, so a ViT
    answers ``{}``.

    :param family: the served model family's name (``[base] family``).
    :param runtime: the runnable model to recalibrate (built by that family's ``runtime``).
    :param images: example images, uint8 [N, 3, H, W] (or float in [0, 1]), in a fixed order; normalise them with
        ``runtime.normalise``.
    :return: checkpoint key → new tensor, or ``None`` (not your family).
    """


# --- events -------------------------------------------------------------------------------------------------------


@hookspec
def skill_registered(skill: str, version: int, mask_sha: str, nnz: int, strategy: str) -> None:
    """A skill version was localized and is READY in the registry.

    :param skill: the skill's name.
    :param version: its version number (1 for a new skill; higher for a checkpoint that supersedes an older one).
    :param mask_sha: sha256 of its mask file (``state/masks/<mask_sha>.mask.safetensors``).
    :param nnz: number of entries in its mask.
    :param strategy: the localization strategy that produced it.
    """


@hookspec
def skill_failed(skill: str, reason: str) -> None:
    """A dropped checkpoint or a rebuild for ``skill`` failed; ``reason`` is the message shown to the user."""


@hookspec
def version_published(version: int, manifest: dict[str, Any]) -> None:
    """A new merged model version is being served.

    :param version: the model version number (``state/models/<version>/``).
    :param manifest: the version's manifest (skills with versions and mask hashes, base fingerprint, stitch policy,
        creation time), as written to ``manifest.json``.
    """

"""``open_clip``: a CLIP model from ``open_clip_torch`` whose image tower is finetuned per skill (the paper's setting).

- **Model**: ``[base] model`` is an open_clip model name (a built-in config), a path to a model config JSON (its
  stem becomes the model name; registered with ``open_clip.add_model_config``), or ``local-dir:FOLDER`` holding
  ``open_clip_config.json``. Weights come from ``[base] weights`` (safetensors); nothing is ever downloaded. A timm
  image tower named by ``vision_cfg.timm_model_name`` works like any other.
- **Included keys**: the image tower's float tensors (``visual.*``). The text tower and the heads are never merged.
- **Finetuned checkpoints** may hold the whole CLIP state dict or the image tower alone, with or without the
  ``visual.`` prefix (``module.``/``model.`` wrappers are stripped by the checkpoint reader).
- **Heads**: per skill, a classification head over the normalised image embedding: a tensor shipped in the drop
  (``skillhub.head.weight`` [C, D], optional ``skillhub.head.bias`` [C]; class names in the header metadata
  ``skillhub.classes`` or the sidecar's ``classes``; logit scale in ``skillhub.head_scale`` or the sidecar's
  ``head_scale``, default 1), or built from class names and prompt templates with the base's
  text tower (``open_clip.build_zero_shot_classifier``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skillhub.checkpoint import Checkpoint, validate_against
from skillhub.errors import CheckpointError, ConfigError, LocalizeError
from skillhub.families import Examples, ModelFamily, Runtime
from skillhub.families.fewshot import EX_LABELS, ImageObjective, read_examples
from skillhub.head import Head, read_drop_head
from skillhub.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch

MAX_PER_CLASS, MAX_EXAMPLES = 64, 1024
DEFAULT_TEMPLATES = ("a photo of a {}.", "an image of a {}.")
_REGISTER_LOCK = threading.Lock()


def resolve_model(model: str | None) -> tuple[str, dict[str, Any]]:
    """Register a local config when ``model`` names one; return (open_clip model name, preprocess overrides).

    A local config is a model config JSON, optionally with a top-level ``preprocess_cfg`` (mean, std, ...), or
    open_clip's hub layout ``{"model_cfg": ..., "preprocess_cfg": ...}``. It is registered directly in open_clip's
    table of model configs, because ``open_clip.add_model_config`` would pass ``preprocess_cfg`` on to the model.
    """
    import open_clip

    if not model:
        raise ConfigError("the open_clip family needs [base] model", key="base.model",
                          hint="an open_clip model name, a config .json path, or local-dir:FOLDER")
    if model.startswith("local-dir:") or model.endswith(".json"):
        path = Path(model.removeprefix("local-dir:"))
        if model.startswith("local-dir:"):
            path = path / "open_clip_config.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read model config {path} ({type(e).__name__})", key="base.model") from None
        cfg = dict(data.get("model_cfg", data))
        inline = cfg.pop("preprocess_cfg", None)
        preprocess = dict(data.get("preprocess_cfg") or inline or {})
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ConfigError(f"{path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)",
                              key="base.model")
        name = f"skillhub-local-{path.resolve().parent.name}-{path.stem}"
        with _REGISTER_LOCK:
            open_clip.factory._MODEL_CONFIGS[name] = cfg
        return name, preprocess
    if model not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model {model!r}", key="base.model",
                          hint="a name from open_clip.list_models(), a config .json path, or local-dir:FOLDER")
    return model, {}


class _NoPretrainedWeights(logging.Filter):
    """open_clip warns (on the root logger) when it loads no pretrained weights: exactly what we ask of it. A filter,
    not disabling the root logger around the call, because models are built on several threads at once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


def quiet_no_pretrained_warning() -> None:
    """Filter open_clip's "no pretrained weights" warning out of the root logger (once per process)."""
    root = logging.getLogger()
    if not any(isinstance(f, _NoPretrainedWeights) for f in root.filters):
        root.addFilter(_NoPretrainedWeights())


def create_clip(model: str | None) -> torch.nn.Module:
    """An open_clip model with random weights (no download); callers load weights into it."""
    import open_clip

    quiet_no_pretrained_warning()
    name, preprocess = resolve_model(model)
    return open_clip.create_model(name, pretrained=None, force_preprocess_cfg=preprocess or None)


class OpenClipFamily(ModelFamily):
    """A CLIP model (open_clip): merge the image tower, classify with a head per skill."""

    name = "open_clip"
    reads_examples = True

    def default_included(self, base: Checkpoint, key: str) -> bool:
        return key.startswith("visual.") and super().default_included(base, key)

    def adapt(self, base: Checkpoint, ft: Checkpoint) -> Checkpoint:
        """Map an image-tower-only checkpoint (keys without ``visual.``) onto the base's keys; drop head entries."""
        keys = [k for k in ft if not k.startswith("skillhub.")]
        if any(k.startswith("visual.") for k in keys) or not keys:
            mapping = {k: k for k in keys}
        else:
            mapping = {f"visual.{k}": k for k in keys}
        return ft.renamed(mapping)

    def validate(self, base: Checkpoint, ft: Checkpoint) -> None:
        """The image tower must match the base exactly; other keys, if present, must be the base's too."""
        validate_against(base.renamed({k: k for k in base if k.startswith("visual.") or k in ft}), ft)

    def head(self, base: Checkpoint, ft: Checkpoint, sidecar: Mapping[str, Any] | None) -> Head | None:
        head, classes = read_drop_head(ft, sidecar)
        if head is None and classes:
            templates = (sidecar or {}).get("templates") or list(DEFAULT_TEMPLATES)
            return self.zero_shot_head(base, classes, templates)
        return head

    def examples(self, ft: Checkpoint, classes: Sequence[str] | None = None) -> Examples:
        return read_examples(ft, classes)

    def zero_shot_head(self, base: Checkpoint, classes: Sequence[str], templates: Sequence[str]) -> Head:
        import open_clip
        import torch

        model = self.build({k: base.tensor(k) for k in base})
        name, _ = resolve_model(self.model)
        with torch.no_grad():
            w = open_clip.build_zero_shot_classifier(model, open_clip.get_tokenizer(name), classes, templates)
        return Head(w.T.contiguous().float(), None, list(classes), float(model.logit_scale.detach().exp()))

    def build(self, tensors: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        model = create_clip(self.model)
        missing, unexpected = model.load_state_dict(dict(tensors), strict=False)
        if missing or unexpected:
            raise CheckpointError(f"weights do not fit open_clip model {self.model!r}: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}", key="base.model")
        return model.eval()

    def runtime(self, tensors: Mapping[str, torch.Tensor]) -> Runtime:
        return ClipRuntime(self.build(tensors))

    def objective(self, base: Checkpoint, head: Head | None, examples: Examples, *,
                  max_per_class: int = MAX_PER_CLASS, seed: int = 0) -> ImageObjective:
        """Few-shot cross-entropy of the skill's head on the image tower θ₀ + σ(S)⊙τ (at most ``max_per_class``
        examples per class and 1024 in all, the first ones of each class in file order)."""
        import torch

        if head is None:
            raise LocalizeError("the trained strategy needs the skill's head (a head tensor or class names)",
                                hint="add skillhub.head.weight or `classes = [...]` to the drop")
        images, labels = examples.images, examples.labels
        n_cls = head.weight.shape[0]
        if labels.numel() == 0:
            raise LocalizeError("the examples are empty", key=EX_LABELS)
        if int(labels.min()) < 0 or int(labels.max()) >= n_cls:
            raise LocalizeError(f"example labels must lie in [0, {n_cls}) for a head of {n_cls} classes; found "
                                f"[{int(labels.min())}, {int(labels.max())}]", key=EX_LABELS)
        keep = torch.cat([(labels == c).nonzero().squeeze(1)[:max_per_class] for c in range(n_cls)]).sort().values
        keep = keep[:MAX_EXAMPLES]
        runtime = ClipRuntime(self.build({k: base.tensor(k) for k in base}))
        tower = runtime.model.visual
        assert isinstance(tower, torch.nn.Module)
        return ImageObjective(tower, head, runtime.normalise(images[keep]), labels[keep], prefix="visual.", seed=seed)


class ClipRuntime(Runtime):
    """Inference on one merged version: preprocess images, embed them, apply a skill's head."""

    def __init__(self, model: torch.nn.Module) -> None:
        import torch

        self.model = model
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.image_size = size if isinstance(size, int) else int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))).view(1, 3, 1, 1)

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images → a normalised batch [N, 3, S, S] (resize the short side, centre crop)."""
        import torch
        from torchvision.transforms import functional as F

        out = []
        for img in images:
            img = img.convert("RGB")
            img = F.center_crop(F.resize(img, self.image_size), [self.image_size, self.image_size])
            out.append(F.to_tensor(img))
        return (torch.stack(out) - self.mean) / self.std

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] (or float in [0, 1]) → resized to the model's size and normalised."""
        import torch

        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                                antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device) -> None:
        self.model.to(device)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():  # batches come and embeddings go on the CPU; the model runs where it lives
            out = torch.nn.functional.normalize(self.model.encode_image(batch.to(self.device)), dim=-1)
        return out.to("cpu")

    def tensors(self) -> Mapping[str, torch.Tensor]:
        return self.model.state_dict()  # detached tensors sharing the parameters' storage

    def pack(self) -> None:
        import torch

        with torch.no_grad():
            owned = [t for t in (*self.model.parameters(), *self.model.buffers()) if t.dtype == torch.float32]
            buffer = torch.empty(sum(t.numel() for t in owned), dtype=torch.float32, device=self.device)
            offset = 0
            for t in owned:  # each tensor's data moves into the buffer; the module keeps its Parameter objects
                n = t.numel()
                buffer[offset:offset + n].copy_(t.reshape(-1))
                t.data = buffer[offset:offset + n].view_as(t)
                offset += n


@hookimpl
def register_families() -> list[type[ModelFamily]]:
    return [OpenClipFamily]


@hookimpl
def recalibrate_statistics(family: str, runtime: Runtime, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """open_clip's answer to :func:`skillhub.hookspecs.recalibrate_statistics`: every BatchNorm layer of the image
    tower (a timm CNN tower such as EfficientNet or a ResNet has them; a ViT has none and gets ``{}``) re-estimated
    on ``images`` (:func:`~skillhub.families.normstats.batchnorm_statistics`)."""
    if family != OpenClipFamily.name or not isinstance(runtime, ClipRuntime):
        return None
    from skillhub.families.normstats import batchnorm_statistics

    model = runtime.model
    return batchnorm_statistics(model, images, lambda x: model.encode_image(runtime.normalise(x)))

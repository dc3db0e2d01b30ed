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
from typing import Any

import torch

from skillhub.checkpoint import Checkpoint, validate_against
from skillhub.errors import CheckpointError, ConfigError, LocalizeError
from skillhub.families import Head, ModelFamily, Runtime
from skillhub.hookspecs import hookimpl

HEAD_WEIGHT, HEAD_BIAS = "skillhub.head.weight", "skillhub.head.bias"
EX_IMAGES, EX_LABELS = "skillhub.examples.images", "skillhub.examples.labels"
MAX_PER_CLASS, MAX_EXAMPLES = 64, 1024
MAX_EXAMPLE_SIDE = 4096  # pixels; example images are resized to the model's input, which no CLIP has this large
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


def create_clip(model: str | None) -> torch.nn.Module:
    """An open_clip model with random weights (no download); callers load weights into it."""
    import open_clip

    root = logging.getLogger()
    if not any(isinstance(f, _NoPretrainedWeights) for f in root.filters):
        root.addFilter(_NoPretrainedWeights())
    name, preprocess = resolve_model(model)
    return open_clip.create_model(name, pretrained=None, force_preprocess_cfg=preprocess or None)


class OpenClipFamily(ModelFamily):
    """A CLIP model (open_clip): merge the image tower, classify with a head per skill."""

    name = "open_clip"

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
        side = dict(sidecar or {})
        classes = side.get("classes")
        if classes is None and "skillhub.classes" in ft.metadata:
            try:
                classes = json.loads(ft.metadata["skillhub.classes"])
            except ValueError:
                raise CheckpointError("header metadata skillhub.classes is not a JSON list", path=ft.path) from None
        if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise CheckpointError("classes must be a list of strings", path=ft.path, key="classes")
        raw_keys = {k for k in ft.raw_keys()}
        if HEAD_WEIGHT in raw_keys:
            weight = ft.raw_tensor(HEAD_WEIGHT).float().clone()
            bias = ft.raw_tensor(HEAD_BIAS).float().clone() if HEAD_BIAS in raw_keys else None
            if weight.ndim != 2 or (bias is not None and bias.shape != (weight.shape[0],)):
                raise CheckpointError(f"{HEAD_WEIGHT} must be [classes, dim] (and {HEAD_BIAS} [classes])",
                                      path=ft.path, key=HEAD_WEIGHT)
            classes = classes or [str(i) for i in range(weight.shape[0])]
            if len(classes) != weight.shape[0]:
                raise CheckpointError(f"{len(classes)} class names for a head of {weight.shape[0]} rows",
                                      path=ft.path, key="classes")
            try:
                scale = float(side.get("head_scale", ft.metadata.get("skillhub.head_scale", "1.0")))
            except ValueError:
                raise CheckpointError("head_scale must be a number", path=ft.path, key="head_scale") from None
            return Head(weight, bias, list(classes), scale)
        if classes:
            templates = side.get("templates") or list(DEFAULT_TEMPLATES)
            return self.zero_shot_head(base, classes, templates)
        return None

    def zero_shot_head(self, base: Checkpoint, classes: Sequence[str], templates: Sequence[str]) -> Head:
        import open_clip

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

    def objective(self, base: Checkpoint, ft: Checkpoint, head: Head | None, sidecar: Mapping[str, Any]) -> Any:
        """Few-shot cross-entropy of the skill's head on the image tower θ₀ + σ(S)⊙τ (at most 64 examples per class
        and 1024 in all, the first ones of each class in file order)."""
        if head is None:
            raise LocalizeError("the trained strategy needs the skill's head (a head tensor or class names)",
                                path=ft.path, hint="add skillhub.head.weight or `classes = [...]` to the drop")
        images, labels = _examples(ft)
        n_cls = head.weight.shape[0]
        if labels.numel() == 0:
            raise LocalizeError("the examples are empty", path=ft.path, key=EX_LABELS)
        if int(labels.min()) < 0 or int(labels.max()) >= n_cls:
            raise LocalizeError(f"example labels must lie in [0, {n_cls}) for a head of {n_cls} classes; found "
                                f"[{int(labels.min())}, {int(labels.max())}]", path=ft.path, key=EX_LABELS)
        per_class = int(sidecar.get("max_per_class", MAX_PER_CLASS))
        keep = torch.cat([(labels == c).nonzero().squeeze(1)[:per_class] for c in range(n_cls)]).sort().values
        keep = keep[:MAX_EXAMPLES]
        runtime = self.runtime({k: base.tensor(k) for k in base})
        assert isinstance(runtime, ClipRuntime)
        return ClipObjective(runtime, head, runtime.normalise(images[keep]), labels[keep])


class ClipRuntime(Runtime):
    """Inference on one merged version: preprocess images, embed them, apply a skill's head."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.image_size = size if isinstance(size, int) else int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))).view(1, 3, 1, 1)

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images → a normalised batch [N, 3, S, S] (resize the short side, centre crop)."""
        from torchvision.transforms import functional as F

        out = []
        for img in images:
            img = img.convert("RGB")
            img = F.center_crop(F.resize(img, self.image_size), [self.image_size, self.image_size])
            out.append(F.to_tensor(img))
        return (torch.stack(out) - self.mean) / self.std

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] (or float in [0, 1]) → resized to the model's size and normalised."""
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                                antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.model.encode_image(batch), dim=-1)


class ClipObjective:
    """:class:`~skillhub.localize.TaskObjective` over a CLIP image tower: the head's cross-entropy on few-shot
    examples, with the image tower's included tensors replaced (``torch.func.functional_call``)."""

    def __init__(self, runtime: ClipRuntime, head: Head, x: torch.Tensor, y: torch.Tensor, batch: int = 128) -> None:
        self.visual = runtime.model.visual
        self.head, self.x, self.y, self.batch = head, x, y, batch
        self.size = int(y.numel())

    def _logits(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        dev = next(iter(params.values())).device if params else x.device
        local = {k.removeprefix("visual."): v for k, v in params.items()}
        feats = torch.func.functional_call(self.visual, local, (x.to(dev),))
        head = Head(self.head.weight.to(dev), None if self.head.bias is None else self.head.bias.to(dev),
                    self.head.classes, self.head.scale)
        return head.logits(torch.nn.functional.normalize(feats, dim=-1))

    def loss(self, params: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        n = self.size
        start = (step * self.batch) % n if n > self.batch else 0
        idx = torch.arange(start, start + min(self.batch, n)) % n
        logits = self._logits(params, self.x[idx])
        return torch.nn.functional.cross_entropy(logits, self.y[idx].to(logits.device))

    @torch.no_grad()
    def accuracy(self, params: Mapping[str, torch.Tensor]) -> float:
        right = 0
        for i in range(0, self.size, self.batch):
            pred = self._logits(params, self.x[i:i + self.batch]).argmax(-1).cpu()
            right += int((pred == self.y[i:i + self.batch]).sum())
        return right / max(self.size, 1)


def _examples(ft: Checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """Few-shot examples shipped in the drop: tensors in the checkpoint, or ``examples.safetensors`` in a folder."""
    from skillhub.checkpoint import read_tensors

    raw = set(ft.raw_keys())
    if EX_IMAGES in raw and EX_LABELS in raw:
        images, labels = ft.raw_tensor(EX_IMAGES).clone(), ft.raw_tensor(EX_LABELS).clone()
    elif ft.path.is_dir() and (ft.path / "examples.safetensors").is_file():
        tensors, _ = read_tensors(ft.path / "examples.safetensors")
        if "images" not in tensors or "labels" not in tensors:
            raise LocalizeError("examples.safetensors needs tensors 'images' and 'labels'", path=ft.path)
        images, labels = tensors["images"], tensors["labels"]
    else:
        raise LocalizeError("no few-shot examples in the drop", path=ft.path,
                            hint=f"add tensors {EX_IMAGES} [N,3,H,W] and {EX_LABELS} [N], or examples.safetensors "
                                 "to a folder drop; or use the dataless strategy")
    if images.ndim != 4 or images.shape[1] != 3 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise LocalizeError(f"examples must be images [N,3,H,W] and labels [N]; got {list(images.shape)} and "
                            f"{list(labels.shape)}", path=ft.path, key=EX_IMAGES)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise LocalizeError("example labels must be integers", path=ft.path, key=EX_LABELS)
    if images.shape[0] and not (0 < min(images.shape[-2:]) and max(images.shape[-2:]) <= MAX_EXAMPLE_SIDE):
        # Other sizes are resized to the model's input; these cannot be (empty) or should not be (memory).
        raise LocalizeError(f"example images are {images.shape[-2]}x{images.shape[-1]} pixels; each side must be "
                            f"1 to {MAX_EXAMPLE_SIDE}", path=ft.path, key=EX_IMAGES,
                            hint="they are resized to the model's input size; store them at about that size")
    return images, labels.long()


@hookimpl
def register_families() -> list[type[ModelFamily]]:
    return [OpenClipFamily]

"""A skill's classification head, how it is written to the state folder and read back, and the cache of heads a
service holds.

A head maps normalised image embeddings to class logits (``scale · x @ weightᵀ + bias``). It arrives with a drop
(a tensor, or class names the family turns into a zero-shot head), is stored content-addressed by the registry
(``heads/<sha256>.safetensors``: tensors ``weight`` and optional ``bias``, metadata ``skillhub.classes`` (JSON list)
and ``skillhub.scale``), and is named by its sha256 in every manifest that serves it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from skillhub.checkpoint import Checkpoint
from skillhub.errors import CheckpointError, RegistryError

if TYPE_CHECKING:
    import torch

#: header metadata of a stored head file
CLASSES_KEY, SCALE_KEY = "skillhub.classes", "skillhub.scale"


@dataclass(frozen=True)
class Head:
    """A skill's classification head over normalised embeddings: logits = scale · x @ weight.T (+ bias)."""

    weight: torch.Tensor  # [classes, dim]
    bias: torch.Tensor | None
    classes: list[str]
    #: logit scale (CLIP's zero-shot heads use the model's, about 100; a trained linear head uses 1)
    scale: float = 1.0

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        out = self.scale * (embeddings @ self.weight.T.to(embeddings.dtype))
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def top_k(self, embeddings: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        """Per embedding, the ``k`` most probable classes as ``{"label", "index", "score", "logit"}`` (softmax
        scores, and the logits they come from)."""
        logits = self.logits(embeddings)
        scores, idx = logits.softmax(-1).topk(min(k, len(self.classes)), dim=-1)
        return [[{"label": self.classes[int(i)], "index": int(i), "score": float(x), "logit": float(lrow[i])}
                 for x, i in zip(srow, irow)] for srow, irow, lrow in zip(scores, idx, logits)]

    def to(self, device: torch.device | str) -> Head:
        """The same head with its tensors on ``device``."""
        return Head(self.weight.to(device), None if self.bias is None else self.bias.to(device), self.classes,
                    self.scale)

    def encode(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and header metadata of the head's file (:meth:`decode` reads them back)."""
        tensors = {"weight": self.weight}
        if self.bias is not None:
            tensors["bias"] = self.bias
        return tensors, {CLASSES_KEY: json.dumps(self.classes), SCALE_KEY: repr(float(self.scale))}

    @classmethod
    def decode(cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Head:
        """A head from the tensors and metadata :meth:`encode` wrote."""
        return cls(tensors["weight"], tensors.get("bias"), list(json.loads(metadata[CLASSES_KEY])),
                   float(metadata.get(SCALE_KEY, "1.0")))


class HeadStore:
    """Heads by content hash, read once from the state folder and kept (they are immutable and small).

    :param load: reads a stored head's tensors and metadata by sha256 (the registry's ``load_head``).
    """

    def __init__(self, load: Callable[[str], tuple[dict[str, torch.Tensor], dict[str, str]]]) -> None:
        self._load = load
        self._heads: dict[str, Head] = {}
        self._lock = threading.Lock()

    def get(self, sha: str | None) -> Head | None:
        """The head with this sha256; ``None`` when ``sha`` is empty (the skill has no head)."""
        if not sha:
            return None
        with self._lock:
            head = self._heads.get(sha)
        if head is None:
            try:
                head = Head.decode(*self._load(sha))
            except (KeyError, ValueError) as e:
                raise RegistryError(f"head {sha[:12]}… is unreadable ({type(e).__name__}: {e})", key=sha,
                                    hint="drop the skill again") from None
            with self._lock:
                self._heads[sha] = head
        return head

    def forget(self, keep: set[str]) -> None:
        """Drop cached heads whose sha is not in ``keep`` (after skills were removed)."""
        with self._lock:
            for sha in set(self._heads) - keep:
                del self._heads[sha]


# --- a head as a drop carries it ------------------------------------------------------------------------------------

#: tensors and header metadata of a drop that carries its head (README "A drop for an open_clip base")
DROP_WEIGHT, DROP_BIAS = "skillhub.head.weight", "skillhub.head.bias"
DROP_CLASSES, DROP_SCALE = "skillhub.classes", "skillhub.head_scale"


def read_drop_head(ft: Checkpoint, sidecar: Mapping[str, Any] | None) -> tuple[Head | None, list[str] | None]:
    """The head a drop carries, and its class names: ``(head, classes)``.

    The head is the tensor ``skillhub.head.weight`` [classes, dim] (optional ``skillhub.head.bias`` [classes]),
    with the sidecar's ``head_scale`` or the header's ``skillhub.head_scale`` (default 1). Class names come from the
    sidecar's ``classes``, else the header's ``skillhub.classes`` (JSON list), else ``"0".."C-1"`` for a tensor
    head. Without a head tensor the head is ``None`` and the family may build one from the class names.
    """
    side = dict(sidecar or {})
    classes = side.get("classes")
    if classes is None and DROP_CLASSES in ft.metadata:
        try:
            classes = json.loads(ft.metadata[DROP_CLASSES])
        except ValueError:
            raise CheckpointError(f"header metadata {DROP_CLASSES} is not a JSON list", path=ft.path) from None
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise CheckpointError("classes must be a list of strings", path=ft.path, key="classes")
    raw = set(ft.raw_keys())
    if DROP_WEIGHT not in raw:
        return None, classes
    weight = ft.raw_tensor(DROP_WEIGHT).float().clone()
    bias = ft.raw_tensor(DROP_BIAS).float().clone() if DROP_BIAS in raw else None
    if weight.ndim != 2 or (bias is not None and bias.shape != (weight.shape[0],)):
        raise CheckpointError(f"{DROP_WEIGHT} must be [classes, dim] (and {DROP_BIAS} [classes])", path=ft.path,
                              key=DROP_WEIGHT)
    classes = classes or [str(i) for i in range(weight.shape[0])]
    if len(classes) != weight.shape[0]:
        raise CheckpointError(f"{len(classes)} class names for a head of {weight.shape[0]} rows", path=ft.path,
                              key="classes")
    try:
        scale = float(side.get("head_scale", ft.metadata.get(DROP_SCALE, "1.0")))
    except (TypeError, ValueError):
        raise CheckpointError("head_scale must be a number", path=ft.path, key="head_scale") from None
    return Head(weight, bias, list(classes), scale), list(classes)


def drop_head_tensors(head: Head) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata that carry ``head`` in a drop (what :func:`read_drop_head` reads)."""
    tensors = {DROP_WEIGHT: head.weight}
    if head.bias is not None:
        tensors[DROP_BIAS] = head.bias
    return tensors, {DROP_CLASSES: json.dumps(head.classes), DROP_SCALE: repr(float(head.scale))}

"""Few-shot examples for image skills: reading them from a drop, and the task objective that data-driven
localization (the ``trained`` strategy) minimises on them.

A drop brings its examples in one of three ways (README "A drop for an open_clip base"):

- tensors in the checkpoint: ``skillhub.examples.images`` [N, 3, H, W] uint8 and ``skillhub.examples.labels`` [N];
- a folder drop's ``examples.safetensors`` with tensors ``images`` and ``labels``;
- a folder drop's ``examples/<class>/*.png|jpg|jpeg``, one folder per class name of the skill's head (each image is
  resized, short side first, and centre-cropped to ``FOLDER_IMAGE_SIZE``; the family resizes again to its input).

:class:`ImageObjective` is the one objective of image families: the service's ``trained`` strategy, ``skillhub
localize`` and ``bench/quality.py`` all localize through it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from skillhub.checkpoint import EXAMPLES_FILE, Checkpoint, read_tensors
from skillhub.errors import LocalizeError
from skillhub.families import Examples
from skillhub.head import Head

if TYPE_CHECKING:
    import torch
    from torch import nn

EX_IMAGES, EX_LABELS = "skillhub.examples.images", "skillhub.examples.labels"
MAX_EXAMPLE_SIDE = 4096  # pixels; example images are resized to the model's input, which no CLIP has this large
FOLDER_IMAGE_SIZE = 256  # pixels; images from an examples/<class>/ folder are brought to this square first
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_FOLDER_IMAGES = 64 * 1024  # more than any few-shot set; refuses a folder that would take the memory


def read_examples(ft: Checkpoint, classes: Sequence[str] | None = None) -> Examples:
    """The few-shot examples that came with the drop ``ft`` (see the module docstring).

    :param classes: the head's class names, which ``examples/<class>/`` folders are matched against.
    """
    import torch

    raw = set(ft.raw_keys())
    folder = ft.path if ft.path.is_dir() else None
    if EX_IMAGES in raw and EX_LABELS in raw:
        images, labels = ft.raw_tensor(EX_IMAGES).clone(), ft.raw_tensor(EX_LABELS).clone()
    elif folder is not None and (folder / EXAMPLES_FILE).is_file():
        tensors, _ = read_tensors(folder / EXAMPLES_FILE)
        if "images" not in tensors or "labels" not in tensors:
            raise LocalizeError(f"{EXAMPLES_FILE} needs tensors 'images' and 'labels'", path=folder / EXAMPLES_FILE)
        images, labels = tensors["images"], tensors["labels"]
    elif folder is not None and (folder / "examples").is_dir():
        images, labels = _image_folders(folder / "examples", classes)
    else:
        raise LocalizeError("no few-shot examples in the drop", path=ft.path,
                            hint=f"add tensors {EX_IMAGES} [N,3,H,W] and {EX_LABELS} [N], or examples.safetensors "
                                 "or examples/<class>/*.png to a folder drop; or use the dataless strategy")
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
    return Examples(images, labels.long())


def _image_folders(root: Path, classes: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``root/<class>/*.png|jpg``: uint8 images [N, 3, S, S] and labels (the class's index in ``classes``)."""
    import torch
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as F

    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        raise LocalizeError("examples/<class>/ folders need the skill's class names to number the classes",
                            path=root, hint="give the drop `classes = [...]` in its sidecar or a head with "
                                            "skillhub.classes")
    index = {name: i for i, name in enumerate(classes)}
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        raise LocalizeError(f"example folder {unknown[0]!r} is not a class of the skill", path=root / unknown[0],
                            hint=f"name each folder after one of the classes: {', '.join(list(classes)[:10])}")
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for folder in folders:
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            if len(images) >= MAX_FOLDER_IMAGES:
                raise LocalizeError(f"more than {MAX_FOLDER_IMAGES} example images", path=root,
                                    hint="a few dozen per class is what few-shot localization uses")
            try:
                with Image.open(path) as raw:
                    rgb = raw.convert("RGB")
                square = F.center_crop(F.resize(rgb, FOLDER_IMAGE_SIZE), [FOLDER_IMAGE_SIZE, FOLDER_IMAGE_SIZE])
                images.append(F.pil_to_tensor(square))
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
                raise LocalizeError(f"not a readable image ({type(e).__name__})", path=path) from None
            labels.append(index[folder.name])
    if not images:
        raise LocalizeError("the examples folder holds no .png/.jpg images", path=root)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


class ImageObjective:
    """:class:`~skillhub.localize.TaskObjective` over an image tower: the cross-entropy of a skill's (frozen) head
    on few-shot examples, with the tower's included tensors replaced (``torch.func.functional_call``).

    The tower runs in eval mode (BatchNorm keeps θ₀'s running statistics) with its own parameters frozen, so only
    the strategy's tensors take gradients. Batches: the whole set when it has at most ``batch_size`` examples, else
    consecutive slices of a fresh seeded permutation per pass (a ragged tail is left out of a pass; the next pass
    reshuffles).

    :param tower: the image tower (a CLIP model's ``visual``); it is not modified.
    :param prefix: the included keys' prefix that the tower's own state dict lacks (``"visual."`` for CLIP).
    :param x: normalised images [N, 3, S, S] at the tower's input size; ``y``: labels [N].
    """

    def __init__(self, tower: nn.Module, head: Head, x: torch.Tensor, y: torch.Tensor, *, prefix: str = "",
                 batch_size: int = 64, seed: int = 0) -> None:
        self.tower = tower.eval()
        for p in self.tower.parameters():
            p.requires_grad_(False)
        self.head, self.x, self.y = head, x, y
        self.prefix, self.batch_size, self.seed = prefix, batch_size, seed
        self.size = int(y.numel())
        self._own = set(self.tower.state_dict())
        self._perm: tuple[int, torch.Tensor] | None = None

    def _batch(self, step: int) -> torch.Tensor:
        import torch

        if self.size <= self.batch_size:
            return torch.arange(self.size)
        per_pass = self.size // self.batch_size
        epoch, i = divmod(step, per_pass)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)))
        return self._perm[1][i * self.batch_size:(i + 1) * self.batch_size]

    def _logits(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        import torch

        dev = next(iter(params.values())).device if params else x.device
        local = {k.removeprefix(self.prefix): v for k, v in params.items()}
        stray = next((k for k in local if k not in self._own), None)
        if stray is not None:
            raise LocalizeError(f"tensor {self.prefix + stray!r} is not a tensor of the image tower", key=stray)
        feats = torch.func.functional_call(self.tower, local, (x.to(dev),))
        return self.head.to(dev).logits(torch.nn.functional.normalize(feats, dim=-1))

    def loss(self, params: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        import torch

        b = self._batch(step)
        logits = self._logits(params, self.x[b])
        return torch.nn.functional.cross_entropy(logits, self.y[b].to(logits.device))

    def accuracy(self, params: Mapping[str, torch.Tensor]) -> float:
        import torch

        right = 0
        with torch.no_grad():
            for i in range(0, self.size, 256):
                pred = self._logits(params, self.x[i:i + 256]).argmax(-1).cpu()
                right += int((pred == self.y[i:i + 256]).sum())
        return right / max(self.size, 1)

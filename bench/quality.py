"""Merge quality on a real pretrained image tower: Localize-and-Stitch against task arithmetic, TIES and DARE.

    .venv/bin/python bench/quality.py [--seed 0] [--out bench/out/quality] [--quick]

The base is the ImageNet EfficientNet-Lite0 tower that ships with an installed package; the skills are copies of it
finetuned (SGD) on small image tasks made from shipped or rendered data, each with a frozen few-shot prototype
head (``skillhub.demo``; DESIGN §9 explains the regime). Every merge goes through skillhub's own localization
strategies and stitch policies, exactly as the daemon would run them:

- task arithmetic = ``dataless`` at sparsity 1 (a dense mask) + ``sum``; λ chosen on the validation split;
- TIES = ``dataless`` top 20% + ``ties``; λ chosen on the validation split;
- DARE = the ``dare`` plugin (p = 0.9, rescaled) + ``sum``; λ chosen on the validation split;
- Localize-and-Stitch = ``dataless`` at 1%, 5%, 10%, or ``trained`` on few-shot training examples, + ``average``
  (no λ, nothing tuned);
- "+ re-centred heads": after stitching, each skill's prototype head is recomputed on the *merged* tower's features
  of the same few-shot examples that defined it (a post-stitch recalibration any method can use; shown for the best
  baseline too, so that the comparison stays fair).

Accuracies are on the test split; normalized accuracy = merged / individually finetuned, per task, then averaged.
Outputs (in ``--out``): ``results.json``, ``quality.png``, ``quality.md`` (a snippet for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skillhub.checkpoint import write_safetensors  # noqa: E402
from skillhub.delta import Provenance, SparseDelta  # noqa: E402
from skillhub.demo import finetune as T  # noqa: E402
from skillhub.demo import tasks as D  # noqa: E402
from skillhub.demo import tower as V  # noqa: E402
from skillhub.families.fewshot import ImageObjective  # noqa: E402
from skillhub.head import Head  # noqa: E402
from skillhub.ingest import skill_seed  # noqa: E402
from skillhub.localize import LocalizeContext, run_localizer  # noqa: E402
from skillhub.plugins import Plugins, load_plugins  # noqa: E402
from skillhub.stitch import Stitcher, stitch  # noqa: E402
from skillhub.taskvector import TaskVector  # noqa: E402

FULL: dict[str, Any] = {
    "image_size": 64,
    "tasks": D.available_tasks(),  # the default tasks whose data is on this machine
    "sizes": [400, 200, 400],  # train, val, test per task
    "head_shots": 16,  # examples per class behind each frozen prototype head
    "finetune": {"epochs": 8, "lr": 0.05, "momentum": 0.9, "clip": 1.0, "batch_size": 32, "bn": "frozen"},
    "lambdas": {"task arithmetic": [0.1, 0.15, 0.2, 0.3, 0.5], "TIES": [0.5, 0.7, 1.0, 1.3],
                "DARE": [0.1, 0.15, 0.2, 0.3, 0.5]},
    "ties_sparsity": 0.2,
    "dare_drop": 0.9,
    "sparsities": [0.01, 0.05, 0.1, 0.2],
    # lr·steps = 12 ≥ 2·init_logit, so any logit can cross (the strategy's own rule); l1 is its default
    "trained": {"steps": 40, "lr": 0.3, "l1": 1.0, "init_sparsity": 0.01},
    "trained_shots": 64,  # few-shot examples per class from the train split for the data-driven mask (≤ 1024 in all)
    "trained_batch": 32,
}
QUICK: dict[str, Any] = FULL | {
    "image_size": 32,
    "tasks": ["digits", "shapes"],
    "sizes": [40, 20, 40],
    "head_shots": 2,
    "finetune": FULL["finetune"] | {"epochs": 1, "batch_size": 20},
    "lambdas": {"task arithmetic": [0.5], "TIES": [1.0], "DARE": [0.5]},
    "sparsities": [0.01, 0.05],
    "trained": FULL["trained"] | {"steps": 2},
    "trained_shots": 4,
    "trained_batch": 8,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    """Tasks, base tower, finetuned skills and their task vectors; evaluation of merged included tensors."""

    def __init__(self, cfg: Mapping[str, Any], seed: int, plugins: Plugins) -> None:
        self.cfg, self.seed, self.plugins = cfg, seed, plugins
        t = time.perf_counter()
        self.tasks = D.make_tasks(cfg["image_size"], seed, names=cfg["tasks"], sizes=tuple(cfg["sizes"]))
        log(f"{len(self.tasks)} tasks built in {time.perf_counter() - t:.1f}s: {', '.join(x.name for x in self.tasks)}")
        self.tower = V.image_tower()
        self.base = {k: v.clone() for k, v in self.tower.state_dict().items()}
        self.keys = V.included_keys(self.tower)
        self.base_included = {k: self.base[k] for k in self.keys}
        self.heads = {x.name: V.prototype_head(self.tower, *x.train, cfg["head_shots"]) for x in self.tasks}
        self.work = V.image_tower()  # evaluation tower: included tensors swapped in, buffers stay θ₀'s
        self.finetuned: dict[str, dict[str, torch.Tensor]] = {}
        self.finetune_seconds: dict[str, float] = {}

    def finetune_all(self) -> None:
        for i, task in enumerate(self.tasks):
            t = time.perf_counter()
            self.finetuned[task.name] = T.finetune(self.tower, task, self.heads[task.name], seed=self.seed + i,
                                                   **self.cfg["finetune"])
            self.finetune_seconds[task.name] = time.perf_counter() - t
            log(f"finetuned {task.name} in {self.finetune_seconds[task.name]:.1f}s")
        self.task_vectors = {n: TaskVector.from_state_dicts(self.base, ft, self.keys)
                             for n, ft in self.finetuned.items()}

    def evaluate(self, merged: Mapping[str, torch.Tensor], split: str = "test", names: list[str] | None = None,
                 recentre: bool = False) -> dict[str, float]:
        """Accuracy per task of the tower with the included tensors ``merged``; ``recentre`` recomputes each head on
        the merged features of the examples that defined it."""
        V.load_included(self.work, merged)
        out = {}
        for task in self.tasks:
            if names is not None and task.name not in names:
                continue
            head = (V.prototype_head(self.work, *task.train, self.cfg["head_shots"]) if recentre
                    else self.heads[task.name])
            out[task.name] = V.evaluate(self.work, head, *getattr(task, split))
        return out

    def localize(self, strategy: str, params: Mapping[str, Any],
                 examples: Callable[[str], Any] | None = None) -> dict[str, SparseDelta]:
        loc = self.plugins.localizer(strategy)
        # each skill its own seed, as the service derives it from a checkpoint's hash (skillhub.ingest.skill_seed)
        seeds = {name: skill_seed(hashlib.sha256(f"{self.seed}/{name}".encode()).hexdigest())
                 for name in self.task_vectors}
        return {name: run_localizer(loc, tv, params, LocalizeContext(seed=seeds[name],
                                                                   examples=examples(name) if examples else None),
                                    Provenance(skill=name))
                for name, tv in self.task_vectors.items()}

    def objective(self, name: str) -> ImageObjective:
        """The service's own objective (what the open_clip family hands the ``trained`` strategy), on the bare
        tower: its keys have no ``visual.`` prefix here."""
        task = next(x for x in self.tasks if x.name == name)
        x, y = task.train
        pick = V.few_shot(y, self.cfg["trained_shots"])[:1024]
        head = Head(self.heads[name], None, task.classes, V.LOGIT_SCALE)
        return ImageObjective(V.image_tower(), head, x[pick], y[pick], batch_size=self.cfg["trained_batch"],
                              seed=self.seed)


def mean(d: Mapping[str, float]) -> float:
    return sum(d.values()) / max(len(d), 1)


def run(cfg: Mapping[str, Any], seed: int, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(seed)
    plugins = load_plugins([ROOT / "plugins"])
    b = Bench(cfg, seed, plugins)
    names = [t.name for t in b.tasks]

    pretrained = b.evaluate(b.base_included)
    b.finetune_all()
    individual = {}
    for name, ft in b.finetuned.items():
        individual[name] = b.evaluate({k: ft[k] for k in b.keys}, names=[name])[name]
    log(f"pretrained {mean(pretrained):.3f}, individual {mean(individual):.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "finetuned.safetensors"
        write_safetensors(ckpt, b.finetuned[names[0]], {})
        checkpoint_bytes = ckpt.stat().st_size

        def storage(deltas: Mapping[str, SparseDelta]) -> dict[str, float]:
            sizes = []
            for name, d in deltas.items():
                p = Path(tmp) / f"{name}.mask.safetensors"
                d.save(p)
                sizes.append(p.stat().st_size)
            return {"mask_bytes": sum(sizes) / len(sizes), "fraction": sum(sizes) / len(sizes) / checkpoint_bytes,
                    "density": sum(d.density for d in deltas.values()) / len(deltas)}

        rows: list[dict[str, Any]] = [
            {"method": "pretrained (θ₀)", "test": pretrained},
            {"method": "individual finetuned", "test": individual},
        ]

        def tuned(method: str, deltas: dict[str, SparseDelta], policy: str, loc_s: float,
                  extra: dict[str, Any]) -> dict[str, Any]:
            t = time.perf_counter()
            grid: dict[float, float] = {}
            lambdas = cfg["lambdas"][method]
            for lam in lambdas if len(lambdas) > 1 else []:  # a one-point grid needs no search
                merged = stitch(b.base_included, deltas, plugins.make_policy(policy, {"scale": lam}))
                grid[lam] = mean(b.evaluate(merged, "val"))
            lam = max(grid, key=lambda k: grid[k]) if grid else lambdas[0]  # first best on ties (increasing grid)
            select_s = time.perf_counter() - t
            t = time.perf_counter()
            merged = stitch(b.base_included, deltas, plugins.make_policy(policy, {"scale": lam}))
            stitch_s = time.perf_counter() - t
            row = {"method": method, "test": b.evaluate(merged), "lambda": lam, "val_grid": grid,
                   "storage": storage(deltas),
                   "seconds": {"localize": loc_s, "stitch": stitch_s, "select_lambda": select_s},
                   **extra}
            log(f"{method}: λ={lam} (val {grid.get(lam, math.nan):.3f}) test {mean(row['test']):.3f}")
            return row | {"_merged": merged}

        def timed_localize(strategy: str, params: Mapping[str, Any],
                           examples: Callable[[str], Any] | None = None) -> tuple[dict[str, SparseDelta], float]:
            t = time.perf_counter()
            d = b.localize(strategy, params, examples)
            return d, time.perf_counter() - t

        # --- global baselines (λ tuned on val)
        dense, s = timed_localize("dataless", {"sparsity": 1.0})
        ta = tuned("task arithmetic", dense, "sum", s, {"recipe": "dataless sparsity 1.0 + sum"})
        rows.append(ta)
        del dense
        top, s = timed_localize("dataless", {"sparsity": cfg["ties_sparsity"]})
        rows.append(tuned("TIES", top, "ties", s, {"recipe": f"dataless sparsity {cfg['ties_sparsity']} + ties"}))
        del top
        dare, s = timed_localize("dare", {"drop_rate": cfg["dare_drop"]})
        rows.append(tuned("DARE", dare, "sum", s, {"recipe": f"dare p={cfg['dare_drop']} + sum"}))
        del dare

        # --- Localize-and-Stitch (average policy, nothing tuned)
        ls_deltas: dict[float, dict[str, SparseDelta]] = {}
        ls_val: dict[float, float] = {}
        for sp in cfg["sparsities"]:
            deltas, s = timed_localize("dataless", {"sparsity": sp})
            t = time.perf_counter()
            merged = stitch(b.base_included, deltas, plugins.make_policy("average"))
            stitch_s = time.perf_counter() - t
            ls_val[sp] = mean(b.evaluate(merged, "val"))
            row = {"method": f"L&S dataless {sp:.0%}", "test": b.evaluate(merged), "val_avg": ls_val[sp],
                   "recipe": f"dataless sparsity {sp} + average", "storage": storage(deltas),
                   "seconds": {"localize": s, "stitch": stitch_s}, "_merged": merged}
            rows.append(row)
            ls_deltas[sp] = deltas
            log(f"{row['method']}: test {mean(row['test']):.3f} (val {ls_val[sp]:.3f})")
        best_sp = max(ls_val, key=lambda k: ls_val[k])

        deltas, s = timed_localize("trained", cfg["trained"], b.objective)
        t = time.perf_counter()
        merged = stitch(b.base_included, deltas, plugins.make_policy("average"))
        trained_row = {"method": "L&S trained", "test": b.evaluate(merged), "storage": storage(deltas),
                       "recipe": f"trained {json.dumps(cfg['trained'])} on ≤{cfg['trained_shots']}/class train "
                                 "examples + average",
                       "seconds": {"localize": s, "stitch": time.perf_counter() - t}, "_merged": merged}
        rows.append(trained_row)
        log(f"L&S trained: density {trained_row['storage']['density']:.4f} test {mean(trained_row['test']):.3f}")

        # --- post-stitch head re-centring (a separate, clearly labelled lever)
        best_ls = next(r for r in rows if r["method"] == f"L&S dataless {best_sp:.0%}")
        # the baseline best on val (its tuned λ's val score), so that no choice here looks at the test split
        best_base = max((r for r in rows if "lambda" in r), key=lambda r: r["val_grid"].get(r["lambda"], 0.0))
        for src in (best_base, best_ls, trained_row):
            t = time.perf_counter()
            acc = b.evaluate(src["_merged"], recentre=True)
            rows.append({"method": f"{src['method']} + re-centred heads", "test": acc, "recentred": True,
                         "seconds": {"recentre_and_eval": time.perf_counter() - t},
                         **{k: src[k] for k in ("lambda", "storage", "recipe") if k in src}})
            log(f"{src['method']} + re-centred heads: test {mean(acc):.3f}")

        # --- incremental: add skills one at a time, then remove the first one
        incremental = incremental_story(b, ls_deltas[best_sp], plugins)
        incremental["sparsity"] = best_sp

    for r in rows:
        r.pop("_merged", None)
        r["avg"] = mean(r["test"])
        r["normalized"] = {n: r["test"][n] / max(individual[n], 1e-9) for n in r["test"]}
        r["avg_normalized"] = mean(r["normalized"])
        # share of the finetuning gain (individual − pretrained, on average accuracy) that the merge keeps
        r["gain_kept"] = (r["avg"] - mean(pretrained)) / max(mean(individual) - mean(pretrained), 1e-9)
    runtime = time.perf_counter() - started
    return {
        "command": "bench/quality.py" + (" --quick" if cfg is QUICK else "") + f" --seed {seed}",
        "seed": seed, "config": cfg, "runtime_seconds": runtime, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "tasks": {
            t.name: {"classes": t.classes, "sizes": [len(t.train[1]), len(t.val[1]), len(t.test[1])]} for t in b.tasks},
        "included": {"tensors": len(b.keys), "parameters": sum(b.base[k].numel() for k in b.keys)},
        "checkpoint_bytes": checkpoint_bytes, "finetune_seconds": b.finetune_seconds,
        "ls_best_sparsity_on_val": best_sp, "rows": rows, "incremental": incremental,
    }


def incremental_story(b: Bench, deltas: Mapping[str, SparseDelta], plugins: Plugins) -> dict[str, Any]:
    """Stitcher.add one skill at a time (accuracy of every active skill after each step), then Stitcher.remove the
    first; check each state against a stitch from scratch of the active set."""
    st = Stitcher(b.base_included, plugins.make_policy("average"), device="cpu")
    steps = []
    order = list(deltas)

    def record(action: str, skill: str, seconds: float) -> None:
        active = st.active
        snap = st.snapshot()
        ref = stitch(b.base_included, {n: deltas[n] for n in active}, plugins.make_policy("average"))
        diff = max(float((snap[k] - ref[k]).abs().max()) for k in snap)
        acc = b.evaluate(snap, names=active)
        steps.append({"action": action, "skill": skill, "active": active, "test": acc, "avg": mean(acc),
                      "seconds": seconds, "max_abs_diff_vs_scratch": diff})
        log(f"incremental {action} {skill}: {seconds * 1e3:.1f} ms, avg over {len(active)} active {mean(acc):.3f}")

    for name in order:
        t = time.perf_counter()
        st.add(name, deltas[name])
        record("add", name, time.perf_counter() - t)
    t = time.perf_counter()
    st.remove(order[0])
    record("remove", order[0], time.perf_counter() - t)
    return {"order": order, "steps": steps}


# ---------------------------------------------------------------------------------------------------- reporting

def table(res: Mapping[str, Any]) -> str:
    names = list(res["tasks"])
    head = ["method", *names, "avg acc", "avg norm.", "gain kept", "mask / ckpt", "λ", "time s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in res["rows"]:
        sto = f"{r['storage']['fraction']:.1%}" if "storage" in r else "—"
        secs = sum(r.get("seconds", {}).values())
        cells = [r["method"], *(f"{100 * r['test'][n]:.1f}" for n in names), f"{100 * r['avg']:.1f}",
                 f"{100 * r['avg_normalized']:.1f}", f"{round(100 * r['gain_kept']) + 0:d}%", sto,
                 str(r.get("lambda", "—")), f"{secs:.1f}" if secs else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def incremental_table(res: Mapping[str, Any]) -> str:
    inc = res["incremental"]
    names = list(res["tasks"])
    lines = ["| step | " + " | ".join(names) + " | avg (active) | ms | max diff vs scratch |",
             "|---|" + "---:|" * (len(names) + 3)]
    for s in inc["steps"]:
        cells = [f"{s['action']} {s['skill']}",
                 *(f"{100 * s['test'][n]:.1f}" if n in s["test"] else "·" for n in names),
                 f"{100 * s['avg']:.1f}", f"{s['seconds'] * 1e3:.1f}", f"{s['max_abs_diff_vs_scratch']:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(res: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.5, 1]})
    labels = [r["method"] for r in rows]
    vals = [100 * r["avg_normalized"] for r in rows]
    colours = ["#999999" if "pretrained" in lab or "individual" in lab else
               "#1f77b4" if lab.startswith("L&S") else "#ff7f0e" for lab in labels]
    hatch = ["//" if r.get("recentred") else "" for r in rows]
    y = range(len(rows))[::-1]
    for yi, v, c, h in zip(y, vals, colours, hatch):
        ax.barh(yi, v, color=c, hatch=h, edgecolor="white")
        ax.text(v + 0.5, yi, f"{v:.1f}", va="center", fontsize=8)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.set_xlabel("average normalized accuracy, % (merged / individual, test split)")
    ax.set_xlim(0, 110)
    ax.set_title(f"{len(res['tasks'])} tasks, EfficientNet-Lite0, seed {res['seed']}", fontsize=10)
    inc = res["incremental"]
    xs = list(range(1, len(inc["steps"]) + 1))
    for name in res["tasks"]:
        pts = [(x, 100 * s["test"][name]) for x, s in zip(xs, inc["steps"]) if name in s["test"]]
        ax2.plot(*zip(*pts), marker=".", lw=1, alpha=0.7, label=name)
    ax2.plot(xs, [100 * s["avg"] for s in inc["steps"]], marker="o", lw=2.5, color="black", label="average")
    ax2.legend(fontsize=7, ncol=2)
    ax2.set_xticks(xs, [("+" if s["action"] == "add" else "−") + s["skill"] for s in inc["steps"]], rotation=45,
                   fontsize=8, ha="right")
    ax2.set_ylabel("accuracy of each active skill, % (test)")
    ax2.set_title(f"incremental Stitcher, L&S dataless {inc['sparsity']:.0%}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(res: Mapping[str, Any]) -> str:
    cfg = res["config"]
    mins = res["runtime_seconds"] / 60
    return f"""### Merge quality: {len(res['tasks'])} small image tasks on a pretrained EfficientNet-Lite0

`.venv/bin/python {res['command']}` — {mins:.1f} min on this machine ({res['threads']} torch threads, CPU,
torch {res['torch']}); seed {res['seed']}; everything (weights, data) from installed packages or rendered locally.

Base: ImageNet EfficientNet-Lite0 (timm `tf_efficientnet_lite0`), {res['included']['parameters'] / 1e6:.2f}M included
parameters ({res['included']['tensors']} tensors: conv weights and BN affine; BN statistics stay θ₀'s). Skills:
the tower finetuned with SGD ({cfg['finetune']['epochs']} epochs, lr {cfg['finetune']['lr']}, clip
{cfg['finetune']['clip']}, BN frozen) on {cfg['sizes'][0]} images per task at {cfg['image_size']}px, against a frozen
head of pretrained-feature class means from {cfg['head_shots']} examples per class. Test split: {cfg['sizes'][2]}
images per task. λ of task arithmetic, TIES and DARE is chosen on the validation split ({cfg['sizes'][1]} per task);
Localize-and-Stitch has no λ. Normalized = merged / individual accuracy per task, averaged; "gain kept" = (merged −
pretrained) / (individual − pretrained) on the average accuracy. "mask / ckpt" = mask
file bytes (`SparseDelta.save`) per skill over the finetuned checkpoint's bytes. Time = localization of all skills
+ stitch (+ λ search on val where there is one; + re-centring and evaluation for the re-centred rows).

{table(res)}

{reading(res)}

Incremental `Stitcher` (L&S dataless {res['incremental']['sparsity']:.0%}, the sparsity best on val): every active
skill's test accuracy after each add, then after removing the first skill.

{incremental_table(res)}

![merge quality](quality.png)
"""


def reading(res: Mapping[str, Any]) -> str:
    """Factual comparisons computed from the rows (no adjectives that the numbers do not carry)."""
    rows = {r["method"]: r for r in res["rows"]}
    base = [r for r in res["rows"] if "lambda" in r and not r.get("recentred")]
    best_base = max(base, key=lambda r: r["avg_normalized"])
    ls = [r for r in res["rows"] if r["method"].startswith("L&S") and not r.get("recentred")]
    best_ls = max(ls, key=lambda r: r["avg_normalized"])
    sp = f"L&S dataless {res['ls_best_sparsity_on_val']:.0%}"

    def pct(r: Mapping[str, Any]) -> str:
        return f"{100 * r['avg_normalized']:.1f}%"

    lines = [
        f"- Best global baseline (λ tuned on val): {best_base['method']} at {pct(best_base)} normalized, "
        f"{100 * best_base['storage']['fraction']:.0f}% of a checkpoint per skill.",
        f"- Best Localize-and-Stitch row (nothing tuned): {best_ls['method']} at {pct(best_ls)}, "
        f"{100 * best_ls['storage']['fraction']:.1f}% of a checkpoint per skill; {sp} (the sparsity best on val) "
        f"at {pct(rows[sp])}; trained masks at {pct(rows['L&S trained'])} "
        f"(density {100 * rows['L&S trained']['storage']['density']:.2f}%).",
    ]
    rc = [r for r in res["rows"] if r.get("recentred")]
    if rc:
        lines.append("- With heads re-centred on the merged features: "
                     + "; ".join(f"{r['method'].removesuffix(' + re-centred heads')} {pct(r)}" for r in rc) + ".")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "quality")
    ap.add_argument("--quick", action="store_true", help="a tiny, fast configuration (used by the test suite)")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    res = run(cfg, args.seed, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    plot(res, args.out / "quality.png")
    md = markdown(res)
    (args.out / "quality.md").write_text(md)
    print(table(res))
    print()
    print(incremental_table(res))
    print(f"\nruntime {res['runtime_seconds'] / 60:.1f} min; outputs in {args.out}")


if __name__ == "__main__":
    main()

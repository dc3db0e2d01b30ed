"""Served quality: test accuracy of every skill as the *service* answers it, per route, stitch policy and quality gate,
and in the continual (one skill at a time) protocol.

    .venv/bin/python bench/served_quality.py [--seed 0] [--orders 3] [--out bench/out/served_quality] [--quick]
        [--setups "L&S 1%,TIES"] [--gates hold,hold+stats]

(``bench/served_quality_seeds.py`` takes the ``results.json`` of several seeds and prints the mean over seeds.)

Unlike ``bench/quality.py`` (library level: localizers and policies called directly, heads re-centred by the
benchmark), everything measured here goes through the service's own code: a :class:`skillhub.Hub` runs in-process on
a real state folder with a real ``config.toml``; skills arrive as drop files (``Hub.ingest``, then
``Hub.reconcile``: localization, stitching, the quality gate and publication are the service's); test images are
normalised by the family's runtime and embedded by the Hub's inference engine (``hub.engine.embed(version, batch,
mask=...)``, the skill route's mask from ``engine.route_mask``), and scored with the head the served version uses on
that route (``hub.engine.head(version, skill, route)``: the gate's re-centred head when it chose one). So what is
scored is what a request gets.

The world (base and drops) is built the way :func:`skillhub.demo.make_demo` builds the demo: an open_clip model whose
image tower is the pretrained EfficientNet-Lite0, and one drop per task: the tower finetuned (SGD, BN frozen)
against a frozen prototype head, carrying its head (``skillhub.head.*``) and few-shot examples
(``skillhub.examples.images``/``labels``, which the quality gate splits into fit and check parts). It is cached in
``--out`` (keyed by its settings), so a second run skips the finetuning.

Rows (normalized = served accuracy / the skill's own finetune's accuracy, same test split, per task then averaged):

1. ``route=skill`` (the skill's own θ₀ + γ⊙τ) with the service defaults (dataless, ``sparsity = "auto"``: the config
   writes no ``[localize.params]``; gate ``hold``), and at 1% and 5%;
2. ``route=merged`` L&S (``average``) at 1% and 5%, gate ``hold`` (re-centred heads) and ``off`` (original heads);
3. TIES (dataless 20% + ``ties``, λ = the policy's default 1.0) and task arithmetic (dataless 100% + ``sum``,
   λ = 0.3) merged, gate ``hold`` and ``off``;
4. ``sparsity = "auto"`` (gate ``hold``), and every setup again with ``[publish] recalibrate_statistics = true``
   (gate ``hold+stats``: BatchNorm statistics re-estimated on the fit examples before heads are re-centred), with
   each skill's mask size and the ingest and reconcile times per Hub;
5. the gate's decisions: skills held out of the merged model (a merged request for one is answered 409; its cell
   then shows the ``route=skill`` accuracy, marked †, which is what the 409's hint sends the client to).

Continual protocol (FusionBench / OPCM / MINGLE style): for each policy, a fresh Hub per order; skills are dropped
one at a time (ingest, reconcile) in ``--orders`` seeded random orders; after each add every skill added so far is
tested on both routes. ACC = mean accuracy over all tasks after the last add; BWT = mean over tasks of (final
accuracy − accuracy right after that task was added; 0 for the last one). Mean ± sample std over orders.

Outputs in ``--out``: ``results.json``, ``served_quality.md`` (the tables printed on stdout). Progress goes to
stderr with timestamps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skillhub.checkpoint import open_checkpoint, read_tensors, write_safetensors
from skillhub.config import load_config
from skillhub.demo import finetune as T
from skillhub.demo import tasks as D
from skillhub.demo import tower as V
from skillhub.families.fewshot import EX_IMAGES, EX_LABELS
from skillhub.families.open_clip import OpenClipFamily
from skillhub.head import Head, drop_head_tensors, read_drop_head
from skillhub.hub import Hub
from skillhub.inference import HeldOut

FULL: dict[str, Any] = {
    "image_size": 64,  # the demo's
    "tasks": D.available_tasks(),  # every default task whose data is on this machine
    "sizes": [400, 100, 400],  # train, val (unused), test per task: the demo's
    "examples_per_class": 16,  # the demo's: behind each prototype head and carried in the drop
    "finetune": {"epochs": 8, "lr": 0.05, "batch_size": 32},  # the demo's
    "eval_batch": 200,
}
QUICK: dict[str, Any] = FULL | {
    "image_size": 32,
    "tasks": ["digits", "shapes"],
    "sizes": [40, 8, 40],
    "examples_per_class": 4,
    "finetune": {"epochs": 1, "lr": 0.05, "batch_size": 20},
}

#: (localize strategy, its params, stitch policy, its params) per setup
#: (params None: no ``[localize.params]`` table is written, so the service's own default applies: sparsity "auto")
SETUPS: dict[str, tuple[str, dict[str, Any] | None, str, dict[str, Any]]] = {
    "L&S 1%": ("dataless", {"sparsity": 0.01}, "average", {}),
    "L&S 5%": ("dataless", {"sparsity": 0.05}, "average", {}),
    "L&S auto": ("dataless", None, "average", {}),
    "TIES": ("dataless", {"sparsity": 0.2}, "ties", {}),
    "TA": ("dataless", {"sparsity": 1.0}, "sum", {"scale": 0.3}),
}
RECIPES = {"L&S 1%": "dataless 1% + average", "L&S 5%": "dataless 5% + average",
           "L&S auto": "dataless auto + average",
           "TIES": "dataless 20% + ties (λ 1.0)", "TA": "dataless 100% + sum (λ 0.3)"}
#: the Hubs of the static table: (setup, gate) where gate "hold+stats" is gate hold with
#: [publish] recalibrate_statistics = true (BatchNorm statistics re-estimated on the fit examples)
HUBS: list[tuple[str, str]] = [(s, g) for s in SETUPS for g in ("hold", "off") if (s, g) != ("L&S auto", "off")] + [
    (s, "hold+stats") for s in SETUPS]
#: the static table: (label, setup, route, gate)
ROWS: list[tuple[str, str, str, str]] = [
    ("route=skill, service defaults (L&S auto, gate hold)", "L&S auto", "skill", "hold"),
    ("route=skill, L&S 1%, gate hold", "L&S 1%", "skill", "hold"),
    ("route=skill, L&S 5%, gate hold", "L&S 5%", "skill", "hold"),
    ("route=skill, L&S 1% + BN statistics", "L&S 1%", "skill", "hold+stats"),
    ("route=skill, L&S 5% + BN statistics", "L&S 5%", "skill", "hold+stats"),
    ("route=skill, L&S auto + BN statistics", "L&S auto", "skill", "hold+stats"),
    ("route=skill, L&S 1%, gate off (original heads)", "L&S 1%", "skill", "off"),
    ("route=skill, L&S 5%, gate off (original heads)", "L&S 5%", "skill", "off"),
    ("merged L&S 1% + recalibration (gate hold)", "L&S 1%", "merged", "hold"),
    ("merged L&S 1%, gate off", "L&S 1%", "merged", "off"),
    ("merged L&S 5% + recalibration (gate hold)", "L&S 5%", "merged", "hold"),
    ("merged L&S 5%, gate off", "L&S 5%", "merged", "off"),
    ("merged L&S auto (service defaults) + recalibration (gate hold)", "L&S auto", "merged", "hold"),
    ("merged L&S 1% + recalibration + BN statistics", "L&S 1%", "merged", "hold+stats"),
    ("merged L&S 5% + recalibration + BN statistics", "L&S 5%", "merged", "hold+stats"),
    ("merged L&S auto + recalibration + BN statistics", "L&S auto", "merged", "hold+stats"),
    ("merged TIES + recalibration (gate hold)", "TIES", "merged", "hold"),
    ("merged TIES, gate off", "TIES", "merged", "off"),
    ("merged TA + recalibration (gate hold)", "TA", "merged", "hold"),
    ("merged TA, gate off", "TA", "merged", "off"),
    ("merged TIES + recalibration + BN statistics", "TIES", "merged", "hold+stats"),
    ("merged TA + recalibration + BN statistics", "TA", "merged", "hold+stats"),
]
CONTINUAL = ("L&S auto", "L&S 1%", "TA", "TIES")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / max(len(xs), 1)


# ------------------------------------------------------------------------------------------- the world: drops

class World:
    """The base checkpoint, its open_clip model config, one drop per task, the test splits (pixels in [0, 1]) and
    every skill's original head. Built the way ``make_demo`` builds the demo; cached in ``folder``."""

    def __init__(self, cfg: Mapping[str, Any], seed: int, folder: Path) -> None:
        self.cfg, self.seed = cfg, seed
        key = hashlib.sha256(json.dumps({"cfg": cfg, "seed": seed}, sort_keys=True).encode()).hexdigest()[:12]
        self.folder = folder / f"world-{key}"
        self.folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        self.tasks = D.make_tasks(cfg["image_size"], seed, names=cfg["tasks"], sizes=tuple(cfg["sizes"]))
        self.names = [x.name for x in self.tasks]
        log(f"{len(self.tasks)} tasks built in {time.perf_counter() - t:.1f}s: {', '.join(self.names)}")
        mean_, std = torch.tensor(V.MEAN).view(1, 3, 1, 1), torch.tensor(V.STD).view(1, 3, 1, 1)
        # the tasks' images are ImageNet-normalised pixels that were clamped to [0, 1]: undo the normalisation, so
        # that the served model's own runtime normalises them as it does every request's
        self.test = {x.name: ((x.test[0] * std + mean_).clamp(0, 1), x.test[1]) for x in self.tasks}
        self.base = self.folder / "base.safetensors"
        self.model_cfg = self.folder / "model.json"
        self.drops = {n: self.folder / "skills" / f"{n}.safetensors" for n in self.names}
        self.finetune_seconds: dict[str, float] = {}
        if not (self.base.exists() and all(p.exists() for p in self.drops.values())):
            self._build()  # (drops an earlier, stopped build finished are kept: each task's finetune is seeded)
        else:
            log(f"reusing the base and drops in {self.folder}")
        # the drop's own head, as the service reads it
        self.heads = {n: _drop_head(self.drops[n]) for n in self.names}

    def _build(self) -> None:
        cfg, seed = self.cfg, self.seed
        model_cfg = V.clip_config(cfg["image_size"])
        model_cfg["preprocess_cfg"] = {"mean": list(V.MEAN), "std": list(V.STD)}
        self.model_cfg.write_text(json.dumps(model_cfg, indent=2))
        clip = V.build_clip(cfg["image_size"], seed=seed)
        base_sd = {k: v.detach().clone() for k, v in clip.state_dict().items()}
        tower = V.image_tower()
        (self.folder / "skills").mkdir(exist_ok=True)
        shots = cfg["examples_per_class"]
        for i, task in enumerate(self.tasks):
            if self.drops[task.name].exists():
                log(f"reusing the drop of {task.name}")
                continue
            x, y = task.train
            head = V.prototype_head(tower, x, y, shots)
            t = time.perf_counter()
            tuned = T.finetune(tower, task, head, seed=seed + i, **cfg["finetune"])
            self.finetune_seconds[task.name] = time.perf_counter() - t
            log(f"finetuned {task.name} ({len(task.classes)} classes, {len(y)} images) in "
                f"{self.finetune_seconds[task.name]:.1f}s")
            sd = dict(base_sd)
            sd.update({f"visual.trunk.{k}": v for k, v in tuned.items() if f"visual.trunk.{k}" in base_sd})
            pick = V.few_shot(y, shots)
            head_tensors, head_meta = drop_head_tensors(Head(head, None, task.classes, V.LOGIT_SCALE))
            sd.update(head_tensors)
            mean_, std = torch.tensor(V.MEAN).view(1, 3, 1, 1), torch.tensor(V.STD).view(1, 3, 1, 1)
            sd[EX_IMAGES] = ((x[pick] * std + mean_).clamp(0, 1) * 255).round().to(torch.uint8)
            sd[EX_LABELS] = y[pick]
            tmp = self.drops[task.name].with_suffix(".part")
            write_safetensors(tmp, sd, {"skillhub.skill": task.name, **head_meta})
            tmp.rename(self.drops[task.name])  # complete or absent: a stopped build leaves no half drop
        write_safetensors(self.base, base_sd, {"skillhub.demo": "base"})  # last: marks the world complete


def _drop_head(drop: Path) -> Head:
    head, _ = read_drop_head(open_checkpoint(drop), None)
    if head is None:
        raise ValueError(f"{drop}: the drop carries no head")
    return head


def reference_accuracies(world: World) -> tuple[dict[str, float], dict[str, float]]:
    """θ₀ and each skill's own finetune (the whole drop), each with the skill's original head, through the open_clip
    family's runtime: the denominators of normalized accuracy."""
    family = OpenClipFamily(model=str(world.model_cfg))
    base_t, _ = read_tensors(world.base)
    base_rt = family.runtime(base_t)
    pre, ind = {}, {}
    for n in world.names:
        x, y = world.test[n]
        pre[n] = _acc(base_rt.embed(base_rt.normalise(x)), world.heads[n], y)
        ft, _ = read_tensors(world.drops[n])
        rt = family.runtime({k: ft[k] for k in base_t})
        ind[n] = _acc(rt.embed(rt.normalise(x)), world.heads[n], y)
        log(f"{n}: pretrained {pre[n]:.3f}, finetuned {ind[n]:.3f}")
    return pre, ind


def _acc(emb: torch.Tensor, head: Head, y: torch.Tensor) -> float:
    return float((head.logits(emb).argmax(-1) == y).float().mean())


# ------------------------------------------------------------------------------------------------- the service

def toml_table(d: Mapping[str, Any]) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())


def make_hub(root: Path, world: World, setup: str, gate: str) -> Hub:
    """A fresh Hub on a fresh state folder, configured like a user would: open_clip on the world's base, the setup's
    ``[localize]`` and ``[stitch]``, ``[publish] gate`` (``"hold+stats"``: ``hold`` with ``recalibrate_statistics =
    true``). Everything else is the service's default, except that no weights file is written per version (disk
    only; nothing served depends on it)."""
    strategy, params, policy, pparams = SETUPS[setup]
    gate, stats = gate.removesuffix("+stats"), gate.endswith("+stats")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / "config.toml").write_text(
        f'device = "cpu"\n[base]\nfamily = "open_clip"\nweights = "{world.base}"\nmodel = "{world.model_cfg}"\n'
        f'[state]\ndir = "state"\nwrite_weights = false\n[plugins]\ndirs = []\n'
        f'[localize]\nstrategy = "{strategy}"\n'
        + ("" if params is None else f'[localize.params]\n{toml_table(params)}')
        + f'[stitch]\npolicy = "{policy}"\n[stitch.params]\n{toml_table(pparams)}'
        f'[publish]\ngate = "{gate}"\nrecalibrate_statistics = {"true" if stats else "false"}\n')
    hub = Hub(load_config(root / "config.toml", env={}))
    hub.start()
    return hub


class Served:
    """Scores skills on a Hub's served version, through its inference engine, as requests are answered."""

    def __init__(self, hub: Hub, world: World, batch: int) -> None:
        self.hub, self.world, self.batch = hub, world, batch
        self._x: dict[str, torch.Tensor] = {}

    def accuracy(self, skill: str, route: str) -> tuple[float, bool]:
        """(test accuracy of ``skill`` on ``route`` in the served version, held): a skill the gate held out of the
        merged model is scored on route=skill, where the service sends it (HTTP 409 on merged)."""
        version = self.hub.current
        assert version is not None
        eng = self.hub.engine
        held = False
        try:
            mask = eng.route_mask(version, skill, route)
        except HeldOut:
            held, route = True, "skill"
            mask = eng.route_mask(version, skill, route)
        head = eng.head(version, skill, route)
        if skill not in self._x:  # the family runtime's normalisation, as for example images and requests
            self._x[skill] = eng.runtime(version).normalise(self.world.test[skill][0])
        x, y = self._x[skill], self.world.test[skill][1]
        emb = torch.cat([eng.embed(version, x[i:i + self.batch], mask=mask) for i in range(0, len(x), self.batch)])
        return _acc(emb, head, y), held


def static_rows(world: World, work: Path, batch: int, hubs: Sequence[tuple[str, str]] = tuple(HUBS),
                done: Any = None) -> dict[str, dict[str, Any]]:
    """One Hub per (setup, gate) of ``hubs``: every skill dropped, one reconcile (a burst), both routes scored.
    ``done(out)`` is called after each Hub (the run saves what it has so far)."""
    out: dict[str, dict[str, Any]] = {}
    for setup, gate in hubs:
        if True:
            t = time.perf_counter()
            hub = make_hub(work / "hub", world, setup, gate)
            try:
                for n in world.names:
                    hub.ingest(world.drops[n])
                t_ingest = time.perf_counter() - t
                hub.reconcile()
                version = hub.current
                assert version is not None
                t_reconcile = time.perf_counter() - t - t_ingest
                s = Served(hub, world, batch)
                res: dict[str, Any] = {"setup": setup, "gate": gate, "version": version.number}
                for route in ("skill", "merged"):
                    res[route] = {}
                    res[route + "_held"] = []
                    for n in world.names:
                        acc, held = s.accuracy(n, route)
                        res[route][n] = acc
                        if held:
                            res[route + "_held"].append(n)
                res["held"] = {n: h.get("reason") for n, h in (version.manifest.get("held") or {}).items()}
                # each skill's mask: its size as a share of the included parameters (what sparsity "auto" chose)
                included = sum(math.prod(hub.base[k].shape) for k in hub.included)
                res["density"] = {r.skill: (r.nnz or 0) / included for r in _ready_rows(hub)}
                res["gate_check"] = {n: q.get("accuracy") for n, q in (version.manifest.get("quality") or {}).items()}
                res["recentred"] = {n: {r: q.get("heads", {}).get(r) != version.manifest["skills"].get(n, {}).get("head")
                                        for r in ("skill", "merged")}
                                    for n, q in (version.manifest.get("quality") or {}).items()}
                res["seconds"] = {"ingest": t_ingest, "reconcile": t_reconcile,
                                  "score": time.perf_counter() - t - t_ingest - t_reconcile}
                out[f"{setup}|{gate}"] = res
                if done is not None:
                    done(out)
                log(f"{setup}, gate {gate}: skill {mean(list(res['skill'].values())):.3f}, merged "
                    f"{mean(list(res['merged'].values())):.3f}, held {sorted(res['held']) or '-'} "
                    f"(ingest {t_ingest:.1f}s, reconcile {t_reconcile:.1f}s, score {res['seconds']['score']:.1f}s)")
            finally:
                hub.close()
    return out


def _ready_rows(hub: Hub) -> list[Any]:
    """The newest READY version row of every skill (held skills too: their manifest entry carries no nnz)."""
    rows = []
    for state in hub.registry.skills():
        ready = [v for v in state.versions if v.status == "READY"]
        if ready:
            rows.append(max(ready, key=lambda v: v.version))
    return rows


def continual(world: World, work: Path, setup: str, order: list[str], gate: str, batch: int) -> dict[str, Any]:
    """Drop the skills one at a time in ``order`` (ingest, reconcile); after each, score every skill added so far on
    both routes."""
    hub = make_hub(work / "hub", world, setup, gate)
    steps = []
    try:
        s = Served(hub, world, batch)
        for k, name in enumerate(order):
            t = time.perf_counter()
            hub.ingest(world.drops[name])
            hub.reconcile()
            t_add = time.perf_counter() - t
            version = hub.current
            assert version is not None
            step: dict[str, Any] = {"added": name, "merged": {}, "skill": {}, "held": sorted(
                version.manifest.get("held") or {}), "seconds": {"add": t_add}}
            for n in order[:k + 1]:
                step["merged"][n], _ = s.accuracy(n, "merged")
                step["skill"][n], _ = s.accuracy(n, "skill")
            step["seconds"]["score"] = time.perf_counter() - t - t_add
            steps.append(step)
            log(f"  {setup} +{name}: merged {mean(list(step['merged'].values())):.3f}, routed "
                f"{mean(list(step['skill'].values())):.3f} over {k + 1} (add {t_add:.1f}s, score "
                f"{step['seconds']['score']:.1f}s){' held ' + ','.join(step['held']) if step['held'] else ''}")
    finally:
        hub.close()
    return {"order": order, "steps": steps}


def draw_orders(names: Sequence[str], n: int, seed: int) -> list[list[str]]:
    """``n`` distinct seeded random orders of ``names`` (all of them when there are fewer than ``n``)."""
    rng = random.Random(seed)
    n = min(n, math.factorial(len(names)))
    out: list[list[str]] = []
    while len(out) < n:
        o = list(names)
        rng.shuffle(o)
        if o not in out:
            out.append(o)
    return out


def protocol_metrics(run: Mapping[str, Any], individual: Mapping[str, float], route: str) -> dict[str, float]:
    order, steps = run["order"], run["steps"]
    final = steps[-1][route]
    at_add = {n: steps[i][route][n] for i, n in enumerate(order)}
    bwt = [final[n] - at_add[n] for n in order]
    return {"acc": mean([final[n] for n in order]),
            "acc_normalized": mean([final[n] / max(individual[n], 1e-9) for n in order]),
            "bwt": mean(bwt),
            "bwt_excl_last": mean(bwt[:-1]) if len(bwt) > 1 else 0.0,  # the 1/(T−1) convention
            "bwt_normalized": mean([(final[n] - at_add[n]) / max(individual[n], 1e-9) for n in order])}


# ----------------------------------------------------------------------------------------------------- reporting

def _pm(xs: Sequence[float], scale: float = 100.0) -> str:
    m = mean(xs) * scale
    sd = statistics.stdev(xs) * scale if len(xs) > 1 else 0.0
    return f"{m:.1f} ± {sd:.1f}"


def static_table(res: Mapping[str, Any]) -> str:
    names, ind, pre = res["tasks"], res["individual"], res["pretrained"]
    head = ["row", "recipe", *names, "mean acc", "mean norm.", "norm. (merged skills only)", "held by gate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 3) + ["---"]) + "|"]

    def line(label: str, recipe: str, acc: Mapping[str, float], held: Sequence[str], gate_col: str) -> None:
        norm = [acc[n] / max(ind[n], 1e-9) for n in names]
        kept = [acc[n] / max(ind[n], 1e-9) for n in names if n not in held]
        cells = [label, recipe, *(f"{100 * acc[n]:.1f}{'†' if n in held else ''}" for n in names),
                 f"{100 * mean([acc[n] for n in names]):.1f}", f"{100 * mean(norm):.1f}",
                 f"{100 * mean(kept):.1f}" if kept else "—", gate_col]
        lines.append("| " + " | ".join(cells) + " |")

    line("pretrained θ₀ (original heads)", "—", pre, [], "—")
    line("individual finetuned (original heads)", "the whole drop", ind, [], "—")
    for label, setup, route, gate in ROWS:
        r = res["static"].get(f"{setup}|{gate}")
        if r is None:  # a Hub this run left out (--setups, --gates)
            continue
        held = r[route + "_held"]
        gate_col = ("—" if gate == "off" else ", ".join(sorted(r["held"])) or "none")
        line(label, RECIPES[setup], r[route], held, gate_col)
    return "\n".join(lines)


def continual_table(res: Mapping[str, Any]) -> str:
    lines = ["| method | route | ACC % | ACC norm. % | BWT (pts) | BWT norm. (pts) | held at the end (per order) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for setup in res["continual"]:
        runs = res["continual"][setup]
        for route in ("merged", "skill"):
            ms = [protocol_metrics(r, res["individual"], route) for r in runs]
            held = "; ".join(",".join(r["steps"][-1]["held"]) or "none" for r in runs) if route == "merged" else "—"
            lines.append(f"| {RECIPES[setup]} | {route} | {_pm([m['acc'] for m in ms])} | "
                         f"{_pm([m['acc_normalized'] for m in ms])} | {_pm([m['bwt'] for m in ms])} | "
                         f"{_pm([m['bwt_normalized'] for m in ms])} | {held} |")
    return "\n".join(lines)


def continual_curve(res: Mapping[str, Any]) -> str:
    """Mean (over orders) of the average merged accuracy over the skills added so far, after k adds."""
    t = len(res["tasks"])
    lines = ["| method | route | " + " | ".join(f"after {k}" for k in range(1, t + 1)) + " |",
             "|---|---|" + "---:|" * t]
    for setup in res["continual"]:
        for route in ("merged", "skill"):
            cells = []
            for k in range(t):
                cells.append(f"{100 * mean([mean(list(r['steps'][k][route].values())) for r in res['continual'][setup]]):.1f}")
            lines.append(f"| {RECIPES[setup]} | {route} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gate_table(res: Mapping[str, Any]) -> str:
    """What the gate compared (accuracy on each skill's check examples) beside the test accuracy of the same model
    and head, per Hub with the gate on."""
    names = res["tasks"]
    lines = ["| setup | skill | base: check / test | route=skill: check / test | merged: check / test | held |",
             "|---|---|---:|---:|---:|---|"]
    for setup in SETUPS:
        r = res["static"].get(f"{setup}|hold")
        if r is None:
            continue
        for n in names:
            q = r["gate_check"].get(n) or {}

            def pct(v: float | None) -> str:
                return "—" if v is None else f"{100 * v:.1f}"

            merged_test = "held" if n in r["merged_held"] else pct(r["merged"][n])
            lines.append(f"| {RECIPES[setup]} | {n} | {pct(q.get('base'))} / {pct(res['pretrained'][n])} | "
                         f"{pct(q.get('skill'))} / {pct(r['skill'][n])} | {pct(q.get('merged'))} / {merged_test} | "
                         f"{'yes' if n in r['held'] else ''} |")
    return "\n".join(lines)


def cost_table(res: Mapping[str, Any]) -> str:
    """Per Hub with the gate on: each skill's mask size (share of the included parameters; what ``auto`` chose) and
    the time to ingest every drop (localization; ``auto`` localizes and scores each rung it tries) and to
    reconcile (stitch, recalibrate, score, publish)."""
    names = res["tasks"]
    lines = ["| setup | gate | " + " | ".join(f"{n} mask %" for n in names) + " | mean mask % | ingest s | "
             "reconcile s |", "|---|---|" + "---:|" * (len(names) + 3)]
    for setup, gate in HUBS:
        r = res["static"].get(f"{setup}|{gate}")
        if gate == "off" or r is None:
            continue
        d = r.get("density") or {}
        cells = [f"{100 * d[n]:.2f}" if n in d else "—" for n in names]
        lines.append(f"| {RECIPES[setup]} | {gate} | " + " | ".join(cells) +
                     f" | {100 * mean([d[n] for n in names if n in d]):.2f} | {r['seconds']['ingest']:.1f} | "
                     f"{r['seconds']['reconcile']:.1f} |")
    return "\n".join(lines)


def markdown(res: Mapping[str, Any]) -> str:
    cfg = res["config"]
    orders = "; ".join(" → ".join(o) for o in res["orders"])
    continual_part = "" if not res["continual"] else f"""
Continual protocol: one fresh Hub per policy and order; skills dropped one at a time (ingest → reconcile), gate
`{res['continual_gate']}`, {len(res['orders'])} seeded orders ({orders}). ACC = mean accuracy over all tasks after the
last add; BWT = mean over tasks of (final − right after that task was added), the last task counting 0 (×
T/(T−1) = {len(res['tasks'])}/{len(res['tasks']) - 1} for the 1/(T−1) convention); mean ± sample std over orders.

{continual_table(res)}

Average accuracy (%) over the skills added so far, after each add (mean over orders):

{continual_curve(res)}
"""
    return f"""### Served quality (through the service)

`.venv/bin/python {res['command']}`: {res['runtime_seconds'] / 60:.1f} min on this machine ({res['threads']} torch
threads, CPU, torch {res['torch']}), {res['date']}; seed {res['seed']}.

World: {len(res['tasks'])} tasks ({', '.join(res['tasks'])}), {cfg['image_size']}px; drops made as `make_demo` makes
them (open_clip, pretrained EfficientNet-Lite0 tower finetuned {cfg['finetune']['epochs']} epochs SGD lr
{cfg['finetune']['lr']} on {cfg['sizes'][0]} images per task; the drop carries its prototype head and
{cfg['examples_per_class']} examples per class); test split {cfg['sizes'][2]} images per task. Every number comes
from a `Hub` on a real state folder (ingest, reconcile, quality gate, publish) and its inference engine: test images
normalised by the family runtime, embedded by `hub.engine.embed(version, batch, mask=...)`, classified with
`hub.engine.head(version, skill, route)`. Normalized = served / the skill's own finetune (whole drop, original head).
† = held out of the merged model by the gate (a merged request is answered 409): the cell is its route=skill
accuracy, where the 409 sends the client; "norm. (merged skills only)" leaves those skills out. "+ BN statistics" =
gate hold with `[publish] recalibrate_statistics = true` (each BatchNorm layer's running statistics re-estimated on
the fit examples: a version on every merged skill's pooled, a skill's own route on its own; heads re-centred after).
"auto" = `sparsity = "auto"` (the smallest of 1, 2, 5, 10, 20 % keeping 99 % of the finetune's fit accuracy).

{static_table(res)}

Mask size per skill (% of the included parameters) and the time each Hub took to ingest the {len(res['tasks'])} drops
and to reconcile them into one version:

{cost_table(res)}

The quality gate's view (gate `hold` Hubs): accuracy on the check examples (a quarter of the examples each drop
carries) that the gate compares, beside test accuracy. The gate scores every model with the skill's head re-centred
on that model's fit examples (base: θ₀; route=skill and merged: the head the version serves there); the base test
column is θ₀ with the drop's original head, the check column θ₀ with the re-centred one. "—": no score.

{gate_table(res)}
{continual_part}"""


# ------------------------------------------------------------------------------------------------------ the run

def run(cfg: Mapping[str, Any], seed: int, orders: int, out: Path, continual_gate: str, command: str,
        hubs: Sequence[tuple[str, str]] = tuple(HUBS)) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(seed)
    world = World(cfg, seed, out)
    pre, ind = reference_accuracies(world)
    work = out / "work"
    t = time.perf_counter()
    partial = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seed": seed,
               "config": dict(cfg), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "tasks": world.names, "pretrained": pre, "individual": ind, "orders": [], "continual": {},
               "continual_gate": continual_gate, "partial": True}

    def save(static: dict[str, Any]) -> None:  # a long run that is stopped keeps the Hubs it finished
        partial["static"], partial["runtime_seconds"] = static, time.perf_counter() - started
        (out / "results.partial.json").write_text(json.dumps(partial, indent=2, default=str))

    static = static_rows(world, work, cfg["eval_batch"], hubs, save)
    static_s = time.perf_counter() - t
    order_list = draw_orders(world.names, orders, seed) if orders else []
    cont: dict[str, list[dict[str, Any]]] = {}
    t = time.perf_counter()
    for setup in CONTINUAL if orders else ():
        cont[setup] = []
        for i, order in enumerate(order_list):
            log(f"continual {setup}, order {i + 1}/{orders}: {' → '.join(order)}")
            cont[setup].append(continual(world, work, setup, order, continual_gate, cfg["eval_batch"]))
    continual_s = time.perf_counter() - t
    shutil.rmtree(work, ignore_errors=True)
    return {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seed": seed,
            "config": dict(cfg), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "tasks": world.names, "pretrained": pre, "individual": ind,
            "finetune_seconds": world.finetune_seconds, "static": static, "orders": order_list,
            "continual_gate": continual_gate, "continual": cont,
            "continual_metrics": {s: {route: [protocol_metrics(r, ind, route) for r in cont[s]]
                                      for route in ("merged", "skill")} for s in cont},
            "seconds": {"static": static_s, "continual": continual_s},
            "runtime_seconds": time.perf_counter() - started}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--orders", type=int, default=3, help="random orders of the continual protocol (0: no continual "
                                                           "protocol, the static rows only)")
    ap.add_argument("--setups", help=f"comma-separated setups of the static rows (default all: {', '.join(SETUPS)})")
    ap.add_argument("--gates", help="comma-separated gates of the static rows: hold, off, hold+stats (default all)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "served_quality")
    ap.add_argument("--quick", action="store_true", help="2 tasks, tiny sizes: a smoke run of a minute or two")
    ap.add_argument("--tasks", help="comma-separated task names (default: every available task; quick: 2)")
    ap.add_argument("--sizes", help="train,val,test images per task (default 400,100,400)")
    ap.add_argument("--epochs", type=int, help="finetuning epochs (default 8)")
    ap.add_argument("--continual-gate", default="warn", choices=("hold", "warn", "off"),
                    help="[publish] gate of the continual protocol's Hubs (default warn: heads re-centred as with "
                         "hold, but no skill held out, so merged numbers are the merged model's)")
    ap.add_argument("--report", type=Path, metavar="RESULTS_JSON",
                    help="only print (and write next to it) the tables of an earlier run's results.json")
    args = ap.parse_args(argv)
    if args.report is not None:
        md = markdown(json.loads(args.report.read_text()))
        (args.report.parent / "served_quality.md").write_text(md)
        print(md)
        return 0
    if args.orders < 0:
        ap.error("--orders must be 0 or more")
    setups = [x.strip() for x in args.setups.split(",")] if args.setups else list(SETUPS)
    gates = [x.strip() for x in args.gates.split(",")] if args.gates else ["hold", "off", "hold+stats"]
    unknown = [x for x in setups if x not in SETUPS] + [g for g in gates if g not in ("hold", "off", "hold+stats")]
    if unknown:
        ap.error(f"unknown setup or gate {unknown[0]!r}")
    hubs = [(s, g) for s in setups for g in gates if (s, g) in HUBS]  # in the order asked: the first run first
    cfg = dict(QUICK if args.quick else FULL)
    if args.tasks:
        cfg["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.sizes:
        cfg["sizes"] = [int(v) for v in args.sizes.split(",")]
    if args.epochs:
        cfg["finetune"] = cfg["finetune"] | {"epochs": args.epochs}
    command = "bench/served_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out = args.out.resolve()  # the Hubs' config.toml names the base by absolute path
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"served quality: {command.strip()} → {args.out}")
    res = run(cfg, args.seed, args.orders, args.out, args.continual_gate, command.strip(), hubs)
    md = markdown(res)
    (args.out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    (args.out / "served_quality.md").write_text(md)
    print(md)
    log(f"done in {res['runtime_seconds'] / 60:.1f} min: {args.out / 'results.json'}, {args.out / 'served_quality.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

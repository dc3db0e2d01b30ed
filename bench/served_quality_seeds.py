"""Served quality over seeds: the mean (± sample std) over several ``bench/served_quality.py`` runs, one per seed,
of every row's mean accuracy and mean normalized accuracy, and of the continual protocol's ACC and BWT; the goals of
issue #10 are judged on these means.

    .venv/bin/python bench/served_quality_seeds.py bench/out/served_quality_s0/results.json \\
        bench/out/served_quality_s1/results.json

Each ``results.json`` is what ``bench/served_quality.py --seed N --out DIR`` wrote (a different world per seed:
tasks, finetunes, drops and orders all drawn from the seed). Prints one markdown block (and writes it beside the
first results file as ``served_quality_seeds.md``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from served_quality import CONTINUAL, RECIPES, ROWS, mean, protocol_metrics  # noqa: E402


def _pm(xs: Sequence[float]) -> str:
    m = 100 * mean(xs)
    sd = 100 * statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.1f} ± {sd:.1f}"


def row_means(res: Mapping[str, Any], setup: str, route: str, gate: str) -> tuple[float, float] | None:
    """(mean accuracy, mean normalized accuracy) of one row of one run; ``None`` when the run lacks that Hub."""
    r = res["static"].get(f"{setup}|{gate}")
    if r is None:
        return None
    names, ind = res["tasks"], res["individual"]
    acc = r[route]
    return mean([acc[n] for n in names]), mean([acc[n] / max(ind[n], 1e-9) for n in names])


def reference(res: Mapping[str, Any], which: str) -> tuple[float, float]:
    names, ind = res["tasks"], res["individual"]
    acc = res[which]
    return mean([acc[n] for n in names]), mean([acc[n] / max(ind[n], 1e-9) for n in names])


def table(runs: Sequence[Mapping[str, Any]]) -> str:
    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines = [f"| row | recipe | mean acc % (seeds {seeds}) | mean norm. % | norm. per seed % |",
             "|---|---|---:|---:|---|"]

    def line(label: str, recipe: str, vals: Sequence[tuple[float, float]]) -> None:
        per_seed = " / ".join(f"{100 * v[1]:.1f}" for v in vals)
        lines.append(f"| {label} | {recipe} | {_pm([v[0] for v in vals])} | {_pm([v[1] for v in vals])} | "
                     f"{per_seed} |")

    line("pretrained θ₀ (original heads)", "—", [reference(r, "pretrained") for r in runs])
    line("individual finetuned (original heads)", "the whole drop", [reference(r, "individual") for r in runs])
    for label, setup, route, gate in ROWS:
        vals = [row_means(r, setup, route, gate) for r in runs]
        if any(v is None for v in vals):
            continue
        line(label, RECIPES[setup], [v for v in vals if v is not None])
    return "\n".join(lines)


def continual_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """ACC and BWT per method and route: each seed's mean over its orders, then mean ± std over seeds."""
    lines = ["| method | route | ACC % | ACC norm. % | BWT (pts) | BWT norm. (pts) |", "|---|---|---:|---:|---:|---:|"]
    for setup in [s for s in CONTINUAL if all(r["continual"].get(s) for r in runs)]:
        for route in ("merged", "skill"):
            per_seed: dict[str, list[float]] = {"acc": [], "acc_normalized": [], "bwt": [], "bwt_normalized": []}
            for res in runs:
                ms = [protocol_metrics(o, res["individual"], route) for o in res["continual"][setup]]
                for k in per_seed:
                    per_seed[k].append(mean([m[k] for m in ms]))
            lines.append(f"| {RECIPES[setup]} | {route} | {_pm(per_seed['acc'])} | {_pm(per_seed['acc_normalized'])} "
                         f"| {_pm(per_seed['bwt'])} | {_pm(per_seed['bwt_normalized'])} |")
    return "\n".join(lines)


def markdown(runs: Sequence[Mapping[str, Any]], paths: Sequence[Path]) -> str:
    cmd = "bench/served_quality_seeds.py " + " ".join(str(p) for p in paths)
    runs_line = "; ".join(f"seed {r['seed']}: `{r['command']}`, {r['date']}, {r['runtime_seconds'] / 60:.1f} min"
                          for r in runs)
    cont = continual_table(runs)
    continual = f"\nContinual protocol over seeds:\n\n{cont}\n" if cont.count("\n") > 1 else ""
    return f"""### Served quality, mean over seeds

`.venv/bin/python {cmd}` over {len(runs)} runs ({runs_line}). Mean ± sample std over seeds of each row's mean
(over tasks) accuracy and normalized accuracy; the continual protocol's ACC and BWT are each seed's mean over its
orders, then mean ± std over seeds.

{table(runs)}
{continual}"""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="results.json of bench/served_quality.py, one per seed")
    args = ap.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in args.results]
    if len({r["seed"] for r in runs}) != len(runs):
        ap.error("give one results.json per seed (two runs share a seed)")
    md = markdown(runs, args.results)
    (args.results[0].parent / "served_quality_seeds.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

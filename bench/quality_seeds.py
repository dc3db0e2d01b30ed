"""The seed spread of ``bench/quality.py``: runs it for several seeds (or reads runs already made) and writes the
table of avg normalized accuracy per method and seed, mean ± sd, and the paired differences that the reading of
BENCHMARKS.md rests on.

    .venv/bin/python bench/quality_seeds.py [--seeds 0 1 2] [--out bench/out/quality/seeds] [--reuse]

Each seed runs as its own process (``bench/quality.py --seed S --out OUT/S``), one after the other; ``--reuse``
reads ``OUT/S/results.json`` where it exists instead of running that seed again. Writes ``OUT/quality-seeds.md``
and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: the comparisons BENCHMARKS.md's reading draws: (a, b) → a − b per seed
PAIRS = (("L&S dataless 10%", "TIES"), ("L&S dataless 20%", "TIES"), ("L&S dataless 1%", "TIES"),
         ("L&S trained", "L&S dataless 5%"), ("L&S trained + re-centred heads", "TIES + re-centred heads"),
         ("L&S dataless 20% + re-centred heads", "TIES + re-centred heads"))


def run_seed(seed: int, out: Path, reuse: bool) -> dict[str, Any]:
    results = out / str(seed) / "results.json"
    if not (reuse and results.is_file()):
        cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "--seed", str(seed), "--out", str(out / str(seed))]
        print(f"running {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(results.read_text())


def markdown(runs: Mapping[int, Mapping[str, Any]], command: str) -> str:
    seeds = sorted(runs)
    by_seed = {s: {r["method"]: r for r in runs[s]["rows"]} for s in seeds}
    methods = [r["method"] for r in runs[seeds[0]]["rows"]]
    lines = ["### Seed spread of bench/quality.py (avg normalized accuracy, %)", "",
             f"`{command}` — each seed changes the task images and the order of finetuning batches.", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd (avg norm. %) | mean avg acc % |",
             "|---|" + "---:|" * (len(seeds) + 2)]
    for m in methods:
        norm = [100 * by_seed[s][m]["avg_normalized"] for s in seeds]
        acc = [100 * by_seed[s][m]["avg"] for s in seeds]
        sd = statistics.stdev(norm) if len(norm) > 1 else 0.0
        lines.append(f"| {m} | " + " | ".join(f"{v:.1f}" for v in norm)
                     + f" | {statistics.mean(norm):.1f} ± {sd:.1f} | {statistics.mean(acc):.1f} |")
    lines += ["", f"- best sparsity on val per seed: {[runs[s]['ls_best_sparsity_on_val'] for s in seeds]}",
              "", "Paired differences per seed (same tasks, same finetunes), points of avg normalized accuracy:", ""]
    for a, b in PAIRS:
        if all(a in by_seed[s] and b in by_seed[s] for s in seeds):
            diffs = [100 * (by_seed[s][a]["avg_normalized"] - by_seed[s][b]["avg_normalized"]) for s in seeds]
            lines.append(f"- {a} − {b}: " + ", ".join(f"{d:+.1f}" for d in diffs))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "quality" / "seeds")
    ap.add_argument("--reuse", action="store_true", help="read OUT/S/results.json where it exists")
    args = ap.parse_args(argv)
    runs = {s: run_seed(s, args.out, args.reuse) for s in args.seeds}
    command = ".venv/bin/python bench/quality_seeds.py --seeds " + " ".join(map(str, args.seeds))
    md = markdown(runs, command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality-seeds.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

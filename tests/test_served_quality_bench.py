"""bench/served_quality.py --quick end to end: a real Hub per row, its tables and results.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# About a minute and a half on an idle 2-core machine (16 Hubs: 8 rows, 2 orders × 3 policies); several times that
# when the machine is shared, hence more than the suite's default 300 s.
@pytest.mark.timeout(900)
def test_quick_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "served_quality.py"), "--quick", "--orders", "2",
                           "--out", str(out)], check=False, capture_output=True, text=True, timeout=840,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    md = (out / "served_quality.md").read_text()
    assert md.strip() in proc.stdout
    tasks = res["tasks"]
    assert tasks == ["digits", "shapes"]
    assert set(res["individual"]) == set(tasks) and set(res["pretrained"]) == set(tasks)

    # every (setup, gate) Hub scored every skill on both routes, and recorded the gate's decisions
    setups = ("L&S 1%", "L&S 5%", "L&S auto", "TIES", "TA")
    assert set(res["static"]) == ({f"{s}|{g}" for s in setups for g in ("hold", "off", "hold+stats")}
                                  - {"L&S auto|off"})
    for key, row in res["static"].items():
        for route in ("skill", "merged"):
            assert set(row[route]) == set(tasks), key
            assert all(0.0 <= a <= 1.0 for a in row[route].values()), key
        assert isinstance(row["held"], dict)
        if key.endswith("|off"):
            assert row["held"] == {} and row["gate_check"] == {}
        assert set(row["density"]) == set(tasks) and all(0 < d <= 1 for d in row["density"].values()), key
        assert row["seconds"]["ingest"] > 0 and row["seconds"]["reconcile"] > 0
    for s in ("L&S 1%", "L&S 5%", "TIES"):  # fixed sparsities are what the masks hold
        want = {"L&S 1%": 0.01, "L&S 5%": 0.05, "TIES": 0.2}[s]
        assert all(abs(d - want) < 1e-3 for d in res["static"][f"{s}|hold"]["density"].values()), s
    assert all(any(abs(d - r) < 1e-3 for r in (0.01, 0.02, 0.05, 0.1, 0.2))  # a rung of the ladder
               for d in res["static"]["L&S auto|hold"]["density"].values())
    for label in ("route=skill, service defaults (L&S auto, gate hold)", "route=skill, L&S 1%, gate hold",
                  "route=skill, L&S 5%, gate hold",
                  "merged L&S 1% + recalibration (gate hold)", "merged L&S 1%, gate off",
                  "merged L&S 5% + recalibration (gate hold)", "merged L&S 5%, gate off",
                  "merged TIES + recalibration (gate hold)", "merged TIES, gate off",
                  "merged TA + recalibration (gate hold)", "merged TA, gate off", "individual finetuned",
                  "merged L&S auto (service defaults) + recalibration (gate hold)",
                  "route=skill, L&S 1% + BN statistics", "merged L&S 1% + recalibration + BN statistics",
                  "merged TIES + recalibration + BN statistics", "merged TA + recalibration + BN statistics"):
        assert f"| {label}" in md, label

    # the skill route with the gate off serves θ₀ + τ with the drop's own head: at 100% density that is the finetune
    # (up to float32 rounding of θ₀ + (θ − θ₀), which may flip an image: at most one of 40)
    for n in tasks:
        assert abs(res["static"]["TA|off"]["skill"][n] - res["individual"][n]) <= 1 / 40 + 1e-6

    # continual protocol: two distinct orders per policy, every skill added so far scored after each add
    assert len(res["orders"]) == 2 and res["orders"][0] != res["orders"][1]
    assert set(res["continual"]) == {"L&S auto", "L&S 1%", "TA", "TIES"}
    for setup in ("L&S auto", "L&S 1%", "TA", "TIES"):
        runs = res["continual"][setup]
        assert [r["order"] for r in runs] == res["orders"]
        for r in runs:
            assert [list(s["merged"]) for s in r["steps"]] == [r["order"][:k + 1] for k in range(len(tasks))]
        for route in ("merged", "skill"):
            ms = res["continual_metrics"][setup][route]
            assert len(ms) == 2 and all({"acc", "bwt", "acc_normalized"} <= set(m) for m in ms)
        # route=skill answers from the skill's own θ₀ + γ⊙τ: adding other skills cannot change it
        assert all(m["bwt"] == 0.0 for m in res["continual_metrics"][setup]["skill"])
    assert "ACC %" in md and "BWT" in md and "mean mask %" in md


def _run(seed: int, skill: float, merged: float) -> dict:
    """A results.json as bench/served_quality.py writes it, reduced to what the seeds script reads."""
    tasks = ["a", "b"]
    static = {f"{s}|{g}": {"skill": {"a": skill, "b": skill / 2}, "merged": {"a": merged, "b": merged / 2}}
              for s in ("L&S 1%", "TIES") for g in ("hold", "hold+stats")}
    steps = [{"merged": {"a": merged}, "skill": {"a": skill}},
             {"merged": {"a": merged - 0.1, "b": merged / 2}, "skill": {"a": skill, "b": skill / 2}}]
    return {"seed": seed, "command": f"bench/served_quality.py --seed {seed}", "date": "today", "runtime_seconds": 60,
            "tasks": tasks, "pretrained": {"a": 0.1, "b": 0.1}, "individual": {"a": 0.8, "b": 0.4},
            "static": static, "continual": {"L&S 1%": [{"order": ["a", "b"], "steps": steps}]}}


def test_seeds_script_prints_the_mean_and_spread_over_seeds(tmp_path: Path) -> None:
    paths = []
    for seed, (skill, merged) in enumerate(((0.8, 0.6), (0.6, 0.4))):
        (tmp_path / f"s{seed}").mkdir()
        paths.append(tmp_path / f"s{seed}" / "results.json")
        paths[-1].write_text(json.dumps(_run(seed, skill, merged)))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "served_quality_seeds.py"), *map(str, paths)],
                          check=True, capture_output=True, text=True, timeout=120)
    md = proc.stdout
    assert (tmp_path / "s0" / "served_quality_seeds.md").read_text().strip() == md.strip()
    # seed 0 skill route: acc (0.8 + 0.4)/2, normalized 100 %; seed 1: 0.45, 75 %; sample std = |difference| / √2
    row = next(line for line in md.splitlines() if line.startswith("| route=skill, L&S 1%, gate hold"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "52.5 ± 10.6" and cells[3] == "87.5 ± 17.7" and cells[4] == "100.0 / 75.0"
    assert "| merged TIES + recalibration + BN statistics |" in md
    assert "| route=skill, L&S 5%" not in md  # a Hub the runs did not have is left out, not invented
    # the continual protocol: ACC of the final step, per seed then over seeds: ((0.5+0.3)/2, (0.3+0.2)/2)
    cont = next(line for line in md.splitlines() if line.startswith("| dataless 1% + average | merged"))
    assert [c.strip() for c in cont.strip("|").split("|")][2] == "32.5 ± 10.6"
    dup = subprocess.run([sys.executable, str(ROOT / "bench" / "served_quality_seeds.py"), str(paths[0]),
                          str(paths[0])], capture_output=True, text=True, timeout=120)
    assert dup.returncode != 0 and "share a seed" in dup.stderr

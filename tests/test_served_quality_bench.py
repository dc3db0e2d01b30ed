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
    assert set(res["static"]) == {f"{s}|{g}" for s in ("L&S 1%", "L&S 5%", "TIES", "TA") for g in ("hold", "off")}
    for key, row in res["static"].items():
        for route in ("skill", "merged"):
            assert set(row[route]) == set(tasks), key
            assert all(0.0 <= a <= 1.0 for a in row[route].values()), key
        assert isinstance(row["held"], dict)
        if key.endswith("|off"):
            assert row["held"] == {} and row["gate_check"] == {}
    for label in ("route=skill, service defaults (L&S 1%, gate hold)", "route=skill, L&S 5%, gate hold",
                  "merged L&S 1% + recalibration (gate hold)", "merged L&S 1%, gate off",
                  "merged L&S 5% + recalibration (gate hold)", "merged L&S 5%, gate off",
                  "merged TIES + recalibration (gate hold)", "merged TIES, gate off",
                  "merged TA + recalibration (gate hold)", "merged TA, gate off", "individual finetuned"):
        assert f"| {label}" in md, label

    # the skill route with the gate off serves θ₀ + τ with the drop's own head: at 100% density that is the finetune
    # (up to float32 rounding of θ₀ + (θ − θ₀), which may flip an image: at most one of 40)
    for n in tasks:
        assert abs(res["static"]["TA|off"]["skill"][n] - res["individual"][n]) <= 1 / 40 + 1e-6

    # continual protocol: two distinct orders per policy, every skill added so far scored after each add
    assert len(res["orders"]) == 2 and res["orders"][0] != res["orders"][1]
    for setup in ("L&S 1%", "TA", "TIES"):
        runs = res["continual"][setup]
        assert [r["order"] for r in runs] == res["orders"]
        for r in runs:
            assert [list(s["merged"]) for s in r["steps"]] == [r["order"][:k + 1] for k in range(len(tasks))]
        for route in ("merged", "skill"):
            ms = res["continual_metrics"][setup][route]
            assert len(ms) == 2 and all({"acc", "bwt", "acc_normalized"} <= set(m) for m in ms)
        # route=skill answers from the skill's own θ₀ + γ⊙τ: adding other skills cannot change it
        assert all(m["bwt"] == 0.0 for m in res["continual_metrics"][setup]["skill"])
    assert "ACC %" in md and "BWT" in md

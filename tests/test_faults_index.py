"""Every case of FAULTS.md (A1-A12, B1-B12, C1-C11, D1-D2) has at least one test carrying its id in its name
(``test_c1_kill_during_mask_write``); this keeps it so when tests are renamed or removed."""

from __future__ import annotations

import re
from pathlib import Path

CASES = [f"a{i}" for i in range(1, 13)] + [f"b{i}" for i in range(1, 13)] + [f"c{i}" for i in range(1, 12)] + \
    ["d1", "d2"]


def test_every_faults_case_has_a_named_test() -> None:
    names = set()
    for path in Path(__file__).parent.glob("test_*.py"):
        names |= set(re.findall(r"^(?:async )?def (test_[a-z]\d+)_", path.read_text(), flags=re.M))
    missing = [case for case in CASES if f"test_{case}" not in names]
    assert not missing, f"FAULTS cases without a test named test_<id>_…: {missing}"

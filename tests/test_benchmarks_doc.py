"""BENCHMARKS.md keeps its promise: every table and every printed block in it comes from a script in bench/, named
by the command above it (the nearest `.venv/bin/python bench/NAME.py ...` before it), and that script exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"\.venv/bin/python (bench/[\w/]+\.py)")


def blocks(text: str) -> list[tuple[int, str]]:
    """(line number, kind) of every table and fenced block, each counted once."""
    out, fenced, in_table = [], False, False
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if not fenced:
                out.append((n, "block"))
            fenced = not fenced
            continue
        table_row = not fenced and line.startswith("|")
        if table_row and not in_table:
            out.append((n, "table"))
        in_table = table_row
    return out


def test_every_table_and_block_names_the_bench_script_that_printed_it() -> None:
    text = (ROOT / "BENCHMARKS.md").read_text()
    lines = text.splitlines()
    found = blocks(text)
    assert len(found) >= 5
    for n, kind in found:
        before = "\n".join(lines[:n - 1])
        commands = COMMAND.findall(before)
        assert commands, f"BENCHMARKS.md line {n}: a {kind} with no bench/ command above it"
        script = ROOT / commands[-1]
        assert script.is_file(), f"BENCHMARKS.md line {n}: {commands[-1]} does not exist"

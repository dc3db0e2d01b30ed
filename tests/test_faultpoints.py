"""The fault points the crash tests arm: inert by default, each action does what it says, bad specs are refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROGRAM = """
import sys
from skillhub import faultpoints
for _ in range(3):
    try:
        faultpoints.reach("mask_write")
        print("passed")
    except BaseException as e:
        print(type(e).__name__, getattr(e, "errno", ""), e)
"""


def run(spec: str | None, tmp_path: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")}
    if spec is not None:
        env |= {"SKILLHUB_FAULTPOINT": spec, "SKILLHUB_FAULTPOINT_FILE": str(tmp_path / "marker")}
    return subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=timeout)


def test_unarmed_points_do_nothing(tmp_path: Path) -> None:
    assert run(None, tmp_path).stdout.split() == ["passed"] * 3


def test_enospc_and_oom_fire_once_on_the_nth_pass(tmp_path: Path) -> None:
    out = run("enospc:mask_write*2", tmp_path).stdout.splitlines()
    assert out[0] == "passed" and out[1].startswith("OSError 28 ") and out[2] == "passed"
    out = run("oom:mask_write", tmp_path).stdout.splitlines()
    assert out[0].startswith("OutOfMemoryError") and out[1:] == ["passed", "passed"]
    assert run("enospc:stitch", tmp_path).stdout.split() == ["passed"] * 3  # another point: untouched


def test_stop_writes_the_marker_then_stops_the_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")} | {
        "SKILLHUB_FAULTPOINT": "stop:mask_write", "SKILLHUB_FAULTPOINT_FILE": str(tmp_path / "marker")}
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM], env=env, stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            if (tmp_path / "marker").exists():
                break
            proc.wait(0.1) if proc.poll() is not None else __import__("time").sleep(0.1)
        assert (tmp_path / "marker").read_text() == "mask_write"
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state == "T"  # stopped, not running on
    finally:
        proc.kill()
        out, _ = proc.communicate(timeout=30)
    assert "passed" not in out  # nothing after the point ever ran


def test_a_bad_spec_is_refused_naming_the_points(tmp_path: Path) -> None:
    r = run("stop:nowhere", tmp_path)
    assert r.returncode != 0 and "SKILLHUB_FAULTPOINT='stop:nowhere'" in r.stderr and "mask_write" in r.stderr

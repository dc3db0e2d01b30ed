"""`skillhub convert`: pickles become safetensors only through weights_only loading in a child process; a
malicious pickle's payload never runs (FAULTS B2)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skillhub.checkpoint import read_tensors
from skillhub.convert import convert
from skillhub.errors import CheckpointError


def test_state_dict_round_trip(tmp_path: Path) -> None:
    sd = {"w": torch.randn(3, 4), "b": torch.arange(3)}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "m.pt")
    assert convert(tmp_path / "m.pt", tmp_path / "m.safetensors") == 2
    got, meta = read_tensors(tmp_path / "m.safetensors")
    assert torch.equal(got["w"], sd["w"]) and torch.equal(got["b"], sd["b"])
    assert meta["skillhub.converted_from"] == "m.pt"


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"w": Payload(str(marker))}, f)
    with pytest.raises(CheckpointError, match="not converted"):
        convert(tmp_path / "evil.pt", tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_convert_and_refusals(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "a.bin")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "skillhub", *a], cwd=tmp_path, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    ok = run("convert", "a.bin", "--out", "a.safetensors")
    assert ok.returncode == 0, ok.stderr
    again = run("convert", "a.bin", "--out", "a.safetensors")
    assert again.returncode == 1 and "not overwriting" in again.stderr
    torch.save(torch.ones(2), tmp_path / "t.pt")
    bad = run("convert", "t.pt", "--out", "t.safetensors")
    assert bad.returncode == 1 and "not a state dict" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

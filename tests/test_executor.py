"""skillhub.executor: the seam between ingest and localization; the local executor, the config, and Ray staying an
optional import (the Ray executor itself: tests/test_rayexec.py)."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skillhub.checkpoint import write_safetensors
from skillhub.config import ExecutorSection, load_config
from skillhub.errors import ConfigError, ExecutorError, SkillhubError
from skillhub.executor import LocalExecutor, make_executor
from skillhub.hub import Hub
from skillhub.job import LocalizeJob

REPO = Path(__file__).resolve().parents[1]


def make_hub(root: Path, extra: str = "") -> Hub:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g)}
    write_safetensors(root / "base.safetensors", base, {})
    for i in range(2):
        write_safetensors(root / f"s{i}.safetensors",
                          {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}, {})
    (root / "config.toml").write_text(f'[base]\nweights = "base.safetensors"\n[state]\ndir = "state"\n'
                                      f'[localize.params]\nsparsity = 0.1\n{extra}')
    hub = Hub(load_config(root / "config.toml", env={}))
    hub.start()
    return hub


def test_the_local_executor_is_the_default_and_runs_each_job_within_submit(tmp_path: Path) -> None:
    hub = make_hub(tmp_path)
    try:
        assert isinstance(hub.executor, LocalExecutor)
        job = LocalizeJob(path=tmp_path / "s0.safetensors", skill="s0", version_id=0, source_sha="ab" * 32,
                          strategy="dataless", params={"sparsity": 0.1})
        future = hub.executor.submit(job)
        assert future.done()
        out = future.result()
        assert 0 < out.delta.nnz < 16 * 8 + 8 and out.worker == ""
        # offer() with the local executor registers within the first call: behaviour as without the seam
        row = hub.offer(tmp_path / "s1.safetensors", skill="s1")
        assert row is not None and row.status == "READY" and hub.localizing() == 0
    finally:
        hub.close()


def test_a_job_s_error_comes_back_through_its_future(tmp_path: Path) -> None:
    hub = make_hub(tmp_path)
    try:
        write_safetensors(tmp_path / "bad.safetensors", {"w": torch.zeros(3)}, {})
        job = LocalizeJob(path=tmp_path / "bad.safetensors", skill="bad", version_id=0, source_sha="",
                          strategy="dataless", params={})
        with pytest.raises(SkillhubError, match="bad.safetensors"):
            assert hub.executor is not None
            hub.executor.submit(job).result()
    finally:
        hub.close()


def test_executor_config_defaults_and_validation(tmp_path: Path) -> None:
    cfg = load_config(None, env={})
    assert cfg.executor == ExecutorSection() and cfg.executor.kind == "local" and cfg.executor.address == "local"
    with pytest.raises(ConfigError, match="executor.kind"):
        load_config(None, env={"SKILLHUB_EXECUTOR__KIND": "dask"})
    with pytest.raises(ConfigError, match="executor.num_cpus"):
        load_config(None, env={"SKILLHUB_EXECUTOR__NUM_CPUS": "0"})
    assert load_config(None, env={"SKILLHUB_EXECUTOR__KIND": "ray"}).executor.kind == "ray"


def test_without_ray_installed_kind_ray_is_a_config_error_or_the_configured_fall_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = make_hub(tmp_path)
    real_import = builtins.__import__

    def no_ray(name: str, *args: object, **kw: object) -> object:
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kw)

    monkeypatch.delitem(sys.modules, "skillhub.rayexec", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    try:
        assert isinstance(hub.executor, LocalExecutor)
        spec = None  # never reached: the import fails first
        with pytest.raises(ExecutorError, match=r'pip install -e "\.\[ray\]"') as e:
            make_executor(ExecutorSection(kind="ray"), hub.executor.workspace, spec)  # type: ignore[arg-type]
        assert e.value.key == "executor.kind" and e.value.exit_code == 2
        fallback = make_executor(ExecutorSection(kind="ray", on_unreachable="local"), hub.executor.workspace,
                                 spec)  # type: ignore[arg-type]
        assert isinstance(fallback, LocalExecutor)
    finally:
        hub.close()


def test_skillhub_and_the_local_service_never_import_ray(tmp_path: Path) -> None:
    code = """
import sys
from pathlib import Path
import torch
import skillhub
from skillhub.checkpoint import write_safetensors
from skillhub.config import load_config
from skillhub.daemon import Daemon
from skillhub.hub import Hub
root = Path(sys.argv[1])
base = torch.randn(400)
write_safetensors(root / "base.safetensors", {"w": base}, {})
write_safetensors(root / "ft.safetensors", {"w": base + 0.01 * torch.randn(400)}, {})
(root / "config.toml").write_text('[base]\\nweights = "base.safetensors"\\n[state]\\ndir = "state"\\n'
                                  '[localize.params]\\nsparsity = 0.1\\n')
hub = Hub(load_config(root / "config.toml", env={}))
hub.start()
hub.ingest(root / "ft.safetensors")
hub.reconcile()
hub.close()
print("ray" in sys.modules, "skillhub.rayexec" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].split() == ["False", "False"]

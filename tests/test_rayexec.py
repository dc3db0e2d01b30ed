"""skillhub.rayexec: localization jobs on a real local Ray (``[executor] kind = "ray"``).

- three drops localized through Ray give mask files byte-identical to the local executor's;
- a Ray worker killed in the middle of a job (a real daemon, its own Ray): the drop stays pending, is localized
  again, and is registered once;
- Ray unreachable at start-up: `skillhub run` refuses to start naming ``[executor] address`` (exit 2), or, when the
  config asks for it, falls back to the local executor.

One Ray session (``ray.init(num_cpus=2)``) is shared by the in-process tests: starting Ray costs seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from harness import assert_weights_equal, drop, make_world, reference, rows
from skillhub.checkpoint import write_safetensors
from skillhub.config import load_config
from skillhub.hub import Hub
from skillhub.job import LocalizeJob

ray = pytest.importorskip("ray", reason="Ray is not installed (the `ray` extra: pip install -e \".[ray]\")")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


def write_drops(root: Path, n: int = 3) -> list[Path]:
    g = torch.Generator().manual_seed(7)
    base = {"enc.weight": torch.randn(32, 16, generator=g), "enc.bias": torch.randn(32, generator=g),
            "head.weight": torch.randn(4, 32, generator=g)}
    write_safetensors(root / "base.safetensors", base, {})
    paths = []
    for i in range(n):
        p = root / f"skill{i}.safetensors"
        write_safetensors(p, {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}, {})
        paths.append(p)
    return paths


def start_hub(root: Path, state: str, kind: str) -> Hub:
    (root / f"{state}.toml").write_text(f'[base]\nweights = "base.safetensors"\n[state]\ndir = "{state}"\n'
                                        f'[localize.params]\nsparsity = 0.05\n[executor]\nkind = "{kind}"\n')
    hub = Hub(load_config(root / f"{state}.toml", env={}))
    hub.start()
    return hub


def test_three_drops_through_ray_give_the_local_executor_s_masks_byte_for_byte(tmp_path: Path,
                                                                                ray_session: None) -> None:
    paths = write_drops(tmp_path)
    local = start_hub(tmp_path, "state-local", "local")
    try:
        want = {p.stem: local.ingest(p, skill=p.stem) for p in paths}
    finally:
        local.close()
    hub = start_hub(tmp_path, "state-ray", "ray")
    try:
        assert hub.executor is not None and hub.executor.kind == "ray"
        # all three submitted before any is registered: offer() does not wait for the job
        done = {p.stem: threading.Event() for p in paths}
        assert all(hub.offer(p, skill=p.stem, on_done=done[p.stem].set) is None for p in paths)
        assert hub.localizing() == 3
        got = {}
        for p in paths:
            assert done[p.stem].wait(120), f"{p.stem}'s job never finished"
            row = hub.offer(p, skill=p.stem)
            assert row is not None and row.status == "READY"
            got[p.stem] = row
        assert hub.localizing() == 0
        for name, row in got.items():
            assert row.mask_sha == want[name].mask_sha and row.nnz == want[name].nnz
            mine = (tmp_path / "state-ray/masks" / f"{row.mask_sha}.mask.safetensors").read_bytes()
            theirs = (tmp_path / "state-local/masks" / f"{row.mask_sha}.mask.safetensors").read_bytes()
            assert mine == theirs
        # the job really ran in a Ray worker, not in this process
        job = LocalizeJob(path=paths[0], skill="skill0", version_id=0, source_sha=got["skill0"].source_sha,
                          strategy="dataless", params={"sparsity": 0.05})
        out = hub.executor.submit(job).result(timeout=120)
        assert out.worker and int(out.worker.split("@")[0]) != os.getpid()
        # the same content offered again is not localized again
        assert hub.offer(paths[1], skill="skill1") == got["skill1"]
    finally:
        hub.close()
    assert ray.is_initialized()  # the hub did not shut down a session it did not start


def test_a_job_error_from_a_ray_worker_is_the_drop_s_error_with_its_path(tmp_path: Path, ray_session: None) -> None:
    write_drops(tmp_path, 0)
    hub = start_hub(tmp_path, "state", "ray")
    try:
        write_safetensors(tmp_path / "wrong.safetensors", {"enc.weight": torch.zeros(3, 3)}, {})
        with pytest.raises(Exception) as e:
            hub.ingest(tmp_path / "wrong.safetensors", skill="wrong")
        assert type(e.value).__name__ == "CheckpointError" and e.value.path == tmp_path / "wrong.safetensors"
        (row,) = hub.registry.versions("wrong")
        assert row.status == "FAILED" and "wrong.safetensors" in (row.reason or "")
    finally:
        hub.close()


def test_a_worker_killed_mid_job_leaves_the_drop_pending_and_it_is_registered_once(tmp_path: Path) -> None:
    root, base, fts, svc = make_world(tmp_path, '[executor]\nkind = "ray"\naddress = "local"\n')
    try:
        # every Ray worker inherits the armed point; the first to reach it (creating the marker) dies by SIGKILL
        svc.start(env=svc.arm("kill:localize_job"))
        for name in fts:
            assert drop(root, name, "rename").wait(30) == 0
        svc.wait(lambda: set(svc.model().get("skills") or {}) == set(fts), "a, b, c served", timeout=180)
        assert svc.marker.read_text() == "localize_job"  # a worker did die in a job
        log = svc.log.read_text(errors="replace")
        assert log.count('"localize_job_lost"') == 1 and '"losses": 1' in log
        registry = rows(root / "state")
        assert sorted(s for s, _, _, _ in registry) == ["a", "b", "c"]  # one row each: never registered twice
        assert all(status == "READY" for _, _, status, _ in registry)
        _, weights = svc.weights()
        assert_weights_equal(weights, reference(base, list(fts.values())))
        assert not any((root / "inbox").glob("*.safetensors"))  # every drop consumed
        assert svc.stop() == 0
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()


def run_service(root: Path, timeout: float = 120, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")} | {"SKILLHUB_TOKEN": "t"} | (env or {})
    return subprocess.run([sys.executable, "-m", "skillhub", "run", "--config", str(root / "config.toml")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket is closed


def test_ray_unreachable_at_start_up_is_a_config_error_naming_executor_address(tmp_path: Path) -> None:
    root, _, _, _ = make_world(tmp_path, f'[executor]\nkind = "ray"\naddress = "127.0.0.1:{closed_port()}"\n')
    out = run_service(root)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "[executor] address" in last and "on_unreachable" in last, last


def test_a_start_up_that_fails_while_numba_first_compiles_exits_with_its_own_code(tmp_path: Path) -> None:
    # An empty numba cache: the workspace's warm-up compiles (seconds) while the start-up fails at once. A process
    # exiting under a daemon thread inside LLVM was aborted ("terminate called without an active exception", -6).
    root, _, _, _ = make_world(tmp_path, f'[executor]\nkind = "ray"\naddress = "127.0.0.1:{closed_port()}"\n')
    out = run_service(root, env={"NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "terminate called" not in out.stderr


def test_ray_unreachable_falls_back_to_local_when_the_config_asks_for_it(tmp_path: Path) -> None:
    root, base, fts, svc = make_world(tmp_path, f'[executor]\nkind = "ray"\naddress = "127.0.0.1:{closed_port()}"\n'
                                                'on_unreachable = "local"\n')
    try:
        svc.start()
        assert drop(root, "a", "rename").wait(30) == 0
        svc.wait(lambda: "a" in (svc.model().get("skills") or {}), "a served")
        log = svc.log.read_text(errors="replace")
        assert '"executor_unreachable"' in log and '"executor": "local"' in log
        assert svc.stop() == 0
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()

"""FAULTS B1-B6, B8, B10, B11 against the real service: `skillhub run` as a subprocess, bad checkpoints and config
edits written by this (other) process into its inbox and config file, its real SQLite registry and HTTP port.

Every case checks the promise of FAULTS.md: a clear error naming the problem and the fix (the drop's
``inbox/.rejected/NAME.reason.txt``, or the daemon's JSON log for a config edit), nothing already stored is lost
(earlier READY rows and their mask files), and the served model keeps being served (``/readyz``, the same version
and weights, equal to an independent float64 stitch). One service is shared by the module; the cases are
independent (each uses its own skill names and compares against a snapshot taken when it starts). B8's rebuild case
needs a world of its own (a float16 base stitched with ``sum``): its service is spawned when the module starts, so
that the two start-ups overlap.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from skillhub.convert import convert as skillhub_convert

from harness import (SHAPES, Service, World, assert_kept, assert_weights_equal, drop, free_port, integrity,
                     make_world, model, reference, rows, serving_a, snapshot)

# A localization strategy that returns NaN values, loaded from the world's plugins/ folder exactly as a user's own
# plugin would be: the only honest way to make *localization* produce NaN in a real service (FAULTS B8).
NAN_PLUGIN = '''
from skillhub import hookimpl
from skillhub.strategies.dataless import Dataless


class NaNStrategy(Dataless):
    name = "nan_test"

    def localize(self, task, params, ctx):
        delta = super().localize(task, params, ctx)
        for values in delta.values.values():
            values.fill_(float("nan"))
        return delta


@hookimpl
def register_localizers():
    return [NaNStrategy]
'''


def skill_rows(w: World, skill: str) -> list[tuple]:
    return [r for r in rows(w.state) if r[0] == skill]


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def raw_st(header: str | dict, data: bytes = b"", *, claimed: int | None = None) -> bytes:
    """A safetensors-shaped file crafted byte by byte: 8-byte little-endian header size, header, data."""
    hb = (header if isinstance(header, str) else json.dumps(header)).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb) if claimed is None else claimed) + hb + data


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory, f16):
    root, base, fts, svc = make_world(tmp_path_factory.mktemp("content"))
    (root / "plugins").mkdir()
    (root / "plugins" / "nan_strategy.py").write_text(NAN_PLUGIN)
    yield from serving_a(World(root, base, svc), fts)


# --- B1 ------------------------------------------------------------------------------------------------------------


def test_b1_impostor_files_rejected_with_a_specific_message(w: World) -> None:
    before = snapshot(w)
    zip_bytes = io.BytesIO()
    torch.save({"enc.weight": torch.zeros(2)}, zip_bytes)
    impostors = {
        "pickled.safetensors": pickle.dumps({"enc.weight": [0.0] * 4}, protocol=4),
        "lfs.safetensors": b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 1234\n",
        "page.safetensors": b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n",
        "json.safetensors": b'{"enc.weight": [0.1, 0.2, 0.3]}\n',
        "torchsave.safetensors": zip_bytes.getvalue(),
        "empty.safetensors": b"",
    }
    for name, data in impostors.items():
        w.put(name, data)
    want = {
        "pickled.safetensors": ["Python pickle", "skillhub convert"],
        "lfs.safetensors": ["this is a git-lfs pointer", "git lfs pull", "fetch the real file"],
        "page.safetensors": ["HTML/XML document"],
        "json.safetensors": ["JSON/text file, not a safetensors file"],
        "torchsave.safetensors": ["zip archive", "skillhub convert"],
        # A zero-byte file may be a copy that has not started writing: it is given the truncation grace period.
        "empty.safetensors": ["truncated (only 0 bytes)", "drop the complete file again"],
    }
    for name, needles in want.items():
        reason = w.reason(name)
        assert reason.startswith(f"{name}: "), reason
        for needle in needles:
            assert needle in reason, (name, reason)
        assert "What to do" in reason
    assert not [r for r in rows(w.state) if r[0] in {n.removesuffix(".safetensors") for n in impostors}]
    assert_kept(w, before)
    # every refusal is counted where an operator looks (the module's service is shared: at least these six)
    metrics = w.svc.get("/metrics").text
    count = next(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("skillhub_drops_rejected_total "))
    assert count >= len(impostors), metrics


# --- B2 ------------------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this object calls ``os.mkdir(marker)``: proof that a pickle ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_b2_malicious_pickle_never_unpickled_and_convert_is_the_explicit_route(w: World) -> None:
    before = snapshot(w)
    marker = w.root / "PWNED"
    evil = {"enc.weight": Payload(str(marker))}
    zipped = io.BytesIO()
    torch.save(evil, zipped)
    # `skillhub convert` is the explicit route (weights_only, in a child process). Started first, as a user following
    # the rejection's hint would run it: it must refuse the evil pickle without running it. (Its start-up, a torch
    # import or two, overlaps the inbox part below.)
    (w.root / "evil.pt").write_bytes(zipped.getvalue())
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLHUB_")}
    cli = subprocess.Popen([sys.executable, "-m", "skillhub", "convert", "evil.pt", "--out",
                            "evil-converted.safetensors"], cwd=w.root, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        # on the watched path a pickle is never opened (by its name), or only sniffed (under a safetensors name)
        w.put("evil.pt", zipped.getvalue())
        w.put("evil.bin", pickle.dumps(evil, protocol=4))
        w.put("evil.safetensors", pickle.dumps(evil, protocol=4))
        for name in ("evil.pt", "evil.bin"):
            reason = w.reason(name)
            assert "pickle checkpoints are never opened on the watched path" in reason, reason
            assert "skillhub convert" in reason
        reason = w.reason("evil.safetensors")
        assert "this is a Python pickle" in reason and "skillhub convert" in reason, reason
        assert not marker.exists()
        assert_kept(w, before)
        # the same route turns a plain state-dict pickle into a file the service takes
        good = model(200, w.base)
        torch.save(good, w.root / "good.pt")
        assert skillhub_convert(w.root / "good.pt", w.root / "good-converted.safetensors") == len(good)
    finally:
        _, err = cli.communicate(timeout=120)
    assert cli.returncode == 1 and "not converted" in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists() and not (w.root / "evil-converted.safetensors").exists()
    os.rename(w.root / "good-converted.safetensors", w.inbox / "good.safetensors")
    w.svc.wait(lambda: "good" in w.svc.model().get("skills", {}), "converted skill served")
    w.served["good"] = good
    _, weights = w.svc.weights()
    assert_weights_equal(weights, w.expected())
    assert not marker.exists()


# --- B3, B4 --------------------------------------------------------------------------------------------------------


def test_b3_hostile_headers_rejected_before_any_large_allocation(w: World) -> None:
    before = snapshot(w)
    assert w.svc.proc is not None
    rss0 = peak_rss(w.svc.proc.pid)
    f32 = lambda b, e, shape=None: {"dtype": "F32", "shape": shape or [(e - b) // 4], "data_offsets": [b, e]}  # noqa
    good = save_safetensors(model(300, w.base))
    files = {
        # 1 TiB header size announced right before a '{': a header bomb, refused before reading it
        "bomb.safetensors": (raw_st({"x": f32(0, 16)}, bytes(16), claimed=1 << 40),
                             ["header claims 1099511627776 bytes", "header bomb"]),
        "overlap.safetensors": (raw_st({"x": f32(0, 16), "y": f32(8, 24)}, bytes(24)),
                                ["overlaps the previous tensor's bytes"]),
        "outside.safetensors": (raw_st({"x": f32(-8, 8, [4])}, bytes(16)),
                                ["offsets [-8, 8] outside the 16-byte data section"]),
        "trailing.safetensors": (good + b"\0\0\0\0", ["4 trailing bytes after the last tensor"]),
        "inconsistent.safetensors": (raw_st({"x": f32(0, 8, [4])}, bytes(8)),
                                     ["shape [4] of F32 needs 16 bytes but spans 8"]),
    }
    for name, (data, _) in files.items():
        w.put(name, data)
    for name, (_, needles) in files.items():
        reason = w.reason(name)
        for needle in needles:
            assert needle in reason, (name, reason)
    assert peak_rss(w.svc.proc.pid) - rss0 < 64 << 20
    assert_kept(w, before)


def test_b4_duplicate_tensor_names_rejected_by_our_header_check(w: World) -> None:
    before = snapshot(w)
    # The reference safetensors parser would silently keep the second "enc.bias"; our pre-check refuses the file.
    ft = model(400, w.base)
    blob = save_safetensors(ft)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    entries = [f'"{k}": {json.dumps(v)}' for k, v in header.items()]
    entries.append(f'"enc.bias": {json.dumps(header["enc.bias"])}')
    w.put("dupnames.safetensors", raw_st("{" + ", ".join(entries) + "}", blob[8 + n:]))
    reason = w.reason("dupnames.safetensors")
    assert "duplicate tensor name 'enc.bias' in the header" in reason and "re-export it" in reason, reason
    assert skill_rows(w, "dupnames") == []
    assert_kept(w, before)


# --- B5 ------------------------------------------------------------------------------------------------------------


def test_b5_unsupported_dtypes_named_half_precision_cast_to_fp32_maths(w: World) -> None:
    before = snapshot(w)
    ft = model(500, w.base)
    fp8 = dict(ft, **{"enc.weight": ft["enc.weight"].to(torch.float8_e4m3fn)})
    ints = dict(ft, **{"enc.weight": (ft["enc.weight"] * 100).to(torch.int32)})
    bools = dict(ft, **{"enc.bias": ft["enc.bias"] > 0})
    quant = dict(ft, **{"enc.weight": (ft["enc.weight"] * 64).to(torch.int8), "enc.weight_scale": torch.tensor(64.)})
    cases = {
        "fp8.safetensors": (fp8, ["tensor 'enc.weight' has unsupported dtype F8_E4M3", "float32, float16 or bfloat16"]),
        "ints.safetensors": (ints, ["dtype mismatch: enc.weight I32 vs base F32"]),
        "bools.safetensors": (bools, ["dtype mismatch: enc.bias BOOL vs base F32"]),
        "quant.safetensors": (quant, ["unexpected keys enc.weight_scale", "dtype mismatch: enc.weight I8 vs base F32"]),
    }
    for name, (tensors, _) in cases.items():
        w.put(name, save_safetensors(tensors))
    for name, (_, needles) in cases.items():
        reason = w.reason(name)
        for needle in needles:
            assert needle in reason, (name, reason)
        assert not [r for r in skill_rows(w, name.removesuffix(".safetensors")) if r[2] == "READY"]
    assert_kept(w, before)

    # The documented cast: a bf16/fp16 (mixed) finetune is accepted, τ is computed in fp32 against the fp32 base.
    mixed = {"enc.weight": ft["enc.weight"].bfloat16(), "enc.bias": ft["enc.bias"].half(),
             "head.weight": ft["head.weight"]}
    w.serve_new("mixed", mixed)
    w.served["mixed"] = {k: v.float() for k, v in mixed.items()}
    _, weights = w.svc.weights()
    assert_weights_equal(weights, w.expected())
    assert {k: v.dtype for k, v in weights.items()} == dict.fromkeys(SHAPES, torch.float32)


# --- B6 ------------------------------------------------------------------------------------------------------------


def test_b6_wrong_architecture_rejected_listing_first_mismatches(w: World) -> None:
    before = snapshot(w)
    ft = model(600, w.base)
    missing = {k: v for k, v in ft.items() if k != "head.weight"}
    extra = dict(ft, **{f"lora.{i}.weight": torch.zeros(2) for i in range(7)})
    shape = dict(ft, **{"enc.bias": torch.zeros(25)})
    cases = {
        "missing.safetensors": (missing, ["does not match the base model: missing keys head.weight"]),
        # the first five are named, the rest counted
        "extra.safetensors": (extra, ["unexpected keys lora.0.weight, lora.1.weight, lora.2.weight, "
                                      "lora.3.weight, lora.4.weight (+2 more)"]),
        "reshaped.safetensors": (shape, ["shape mismatch: enc.bias [25] vs base [24]"]),
    }
    for name, (tensors, _) in cases.items():
        w.put(name, save_safetensors(tensors))
    for name, (_, needles) in cases.items():
        reason = w.reason(name)
        for needle in needles:
            assert needle in reason, (name, reason)
        assert "Hint: drop a finetune of the configured base model" in reason
        # never a partial load: no READY version, nothing of it in the served model
        assert not [r for r in skill_rows(w, name.removesuffix(".safetensors")) if r[2] == "READY"]
    assert not set(w.svc.model()["skills"]) & {"missing", "extra", "reshaped"}
    assert_kept(w, before)


# --- B8 ------------------------------------------------------------------------------------------------------------


def test_b8_nan_or_inf_in_weights_or_from_localization_never_reach_the_registry(w: World) -> None:
    before = snapshot(w)
    nan = model(800, w.base)
    nan["enc.weight"][3, 4] = float("nan")
    inf = model(801, w.base)
    inf["head.weight"][0, 0] = float("inf")
    w.put("nan.safetensors", save_safetensors(nan))
    w.put("inf.safetensors", save_safetensors(inf))
    # a clean finetune whose localization (a plugin strategy chosen in its sidecar) produces NaN values
    (w.inbox / "nanloc.toml").write_text('strategy = "nan_test"\n')
    w.put("nanloc.safetensors", save_safetensors(model(802, w.base)))
    assert "tensor 'enc.weight' holds NaN or Inf" in w.reason("nan.safetensors")
    assert "tensor 'head.weight' holds NaN or Inf" in w.reason("inf.safetensors")
    reason = w.reason("nanloc.safetensors")
    assert "strategy 'nan_test' produced NaN or Inf values" in reason, reason
    assert (w.inbox / ".rejected" / "nanloc.toml").is_file()
    for skill in ("nan", "inf", "nanloc"):
        assert not [r for r in skill_rows(w, skill) if r[2] == "READY"]
    assert_kept(w, before)


F16_WORLD = """
[base]
weights = "base.safetensors"
[watch]
dir = "inbox"
stable_seconds = 0.3
rescan_seconds = 2
[state]
dir = "state"
[localize.params]
sparsity = 0.1
[stitch]
policy = "sum"
[stitch.params]
scale = 1.0
[serve]
port = {port}
"""


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory):
    """A second service for B8's rebuild case: a float16 base stitched with ``sum`` (task arithmetic), where two
    finite finetunes can add up past float16's range. Spawned without waiting, before the shared one (``w`` asks
    for this fixture), so that the two start-ups overlap."""
    root = tmp_path_factory.mktemp("f16")
    g = torch.Generator().manual_seed(0)
    base = {k: (30000 + 100 * torch.randn(s, generator=g)).half() for k, s in SHAPES.items()}
    (root / "base.safetensors").write_bytes(save_safetensors(base))
    port = free_port()
    (root / "config.toml").write_text(F16_WORLD.format(port=port))
    (root / "inbox").mkdir()
    svc = Service(root, port)
    svc.spawn()
    yield root, base, svc
    if svc.proc is not None and svc.proc.poll() is None:
        svc.proc.kill()
        svc.proc.wait()


def test_b8_rebuild_producing_inf_is_abandoned_and_the_old_version_kept(f16) -> None:
    """Two finite float16 finetunes whose task-arithmetic sum overflows float16 at one entry: the rebuild that
    adds the second is abandoned, the skill is marked FAILED with the reason, the first keeps being served."""
    root, base, svc = f16

    def put(name: str, seed: int) -> None:
        gg = torch.Generator().manual_seed(seed)
        ft = {k: (v.float() + 50 * torch.randn(v.shape, generator=gg)).half() for k, v in base.items()}
        ft["enc.weight"][0, 0] = base["enc.weight"][0, 0].float() + 20000  # finite alone, inf when two are summed
        (root / "inbox" / f".{name}.part").write_bytes(save_safetensors(ft))
        os.rename(root / "inbox" / f".{name}.part", root / "inbox" / f"{name}.safetensors")

    svc.wait(lambda: svc.get("/readyz").status_code == 200, "f16 service ready")
    put("x", 1)
    svc.wait(lambda: "x" in svc.model().get("skills", {}), "x served")
    v1, w1 = svc.weights()
    assert w1["enc.weight"].dtype == torch.float16 and bool(torch.isfinite(w1["enc.weight"]).all())
    put("y", 2)
    svc.wait(lambda: any(r[0] == "y" and r[2] == "FAILED" for r in rows(root / "state")), "y failed")
    y = svc.skills()["y"]["versions"][0]
    assert y["status"] == "FAILED" and "merged weights hold NaN/Inf in 'enc.weight'" in y["reason"], y
    assert svc.get("/readyz").status_code == 200
    v2, w2 = svc.weights()
    assert v2 == v1 and set(svc.model()["skills"]) == {"x"}
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    assert [r[:3] for r in rows(root / "state") if r[0] == "x"] == [("x", 1, "READY")]
    assert integrity(root / "state") == [("ok",)]


# --- B10 -----------------------------------------------------------------------------------------------------------


def test_b10_enormous_file_or_header_rejected_by_the_size_cap_before_copying(w: World) -> None:
    before = snapshot(w)
    assert w.svc.proc is not None
    rss0 = peak_rss(w.svc.proc.pid)
    sparse = w.inbox / ".huge.incoming"
    with open(sparse, "wb") as f:
        f.write(struct.pack("<Q", 64) + b"{")
        f.truncate(200 << 30)  # a sparse 200 GiB file: no disk used
    os.rename(sparse, w.inbox / "huge.safetensors")
    # a million tiny tensors: a 55 MB header, under the 100 MiB header cap but far over the drop cap
    entry = '"t{}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    header = "{" + ",".join(entry.format(i) for i in range(1_000_000)) + "}"
    w.put("many.safetensors", raw_st(header))
    cap = 1 << 20  # the service's cap for this tiny base: max(4 × base bytes, 1 MiB)
    for name in ("huge.safetensors", "many.safetensors"):
        reason = w.reason(name)
        assert f"larger than the cap of {cap} bytes" in reason, reason
        assert "Hint: drop a finetune of the configured base model" in reason
    assert (w.inbox / ".rejected" / "huge.safetensors").stat().st_size == 200 << 30
    staged = [p for p in (w.state / "staging").rglob("*") if p.is_file()]
    assert all(p.stat().st_size <= cap for p in staged)  # nothing was copied
    assert peak_rss(w.svc.proc.pid) - rss0 < 64 << 20  # and the 55 MB header was never parsed
    assert_kept(w, before)
    for name in ("huge.safetensors", "many.safetensors"):  # not worth keeping in the test's temp folder
        (w.inbox / ".rejected" / name).unlink()


# --- B11 -----------------------------------------------------------------------------------------------------------


def config_events(w: World, event: str) -> list[dict]:
    out = []
    for line in w.svc.log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


def edit(w: World, text: str) -> tuple[str, str | None]:
    """Write ``text`` as config.toml and wait for the daemon to take it up: ("rejected", the logged error) or
    ("applied", None)."""
    seen = {e: len(config_events(w, e)) for e in ("config_rejected", "config_applied")}
    (w.root / "config.toml").write_text(text)
    w.svc.wait(lambda: any(len(config_events(w, e)) > n for e, n in seen.items()), "config edit taken up", 10)
    rejected = config_events(w, "config_rejected")
    return ("rejected", rejected[-1]["error"]) if len(rejected) > seen["config_rejected"] else ("applied", None)


BAD_EDITS = {
    "unknown key": (lambda g: 'devcie = "cpu"\n' + g, ["devcie", "Hint", "device"]),
    "bad value": (lambda g: g + '\n[skills]\ndisabled = "a"\n', ["skills.disabled", "should be a valid list"]),
    "unknown strategy": (lambda g: g.replace('strategy = "dataless"', 'strategy = "datales"'),
                         ["datales", "Hint", "dataless"]),
    "not TOML": (lambda g: g + "\n[skills\n", ["config.toml", "line"]),
    "restart-only field": (lambda g: g.replace("stable_seconds = 0.3", "stable_seconds = 0.5"),
                           ["[watch]", "restart"]),
}


def test_b11_invalid_config_edits_rejected_old_config_stays_daemon_keeps_running(w: World) -> None:
    before = snapshot(w)
    good = (w.root / "config.toml").read_text()
    try:
        for case, (make, needles) in BAD_EDITS.items():  # one after the other: the first config stays in force
            outcome, error = edit(w, make(good))
            assert outcome == "rejected" and error is not None, case
            for needle in needles:
                assert needle in error, (case, error)
            assert_kept(w, before)
        # reloads still work: a valid edit applies without a restart, and undoing it brings the same weights back
        assert edit(w, good + '\n[skills]\ndisabled = ["a"]\n') == ("applied", None)
        w.svc.wait(lambda: "a" not in w.svc.model()["skills"], "valid edit applied")
    finally:
        edit(w, good)
    w.svc.wait(lambda: "a" in w.svc.model()["skills"], "a back")
    _, weights = w.svc.weights()
    assert_weights_equal(weights, w.expected())


def test_b11_config_edit_naming_an_unknown_skill_rejected(w: World) -> None:
    before = snapshot(w)
    cfg = w.root / "config.toml"
    good = cfg.read_text()
    try:
        outcome, error = edit(w, good + '\n[skills]\ndisabled = ["no_such_skill"]\n')
        assert outcome == "rejected" and error is not None
        assert "no_such_skill" in error and "Hint" in error
        assert_kept(w, before)
    finally:
        edit(w, good)

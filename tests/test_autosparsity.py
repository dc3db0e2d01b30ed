"""sparsity = "auto": the smallest rung of the ladder whose localized model keeps `keep` of the finetune's accuracy on
the fit examples; the service records the choice; without examples it takes the smallest rung and says why."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_gate import trained_skill
from test_open_clip import tiny  # noqa: F401  (a fixture)

from skillhub.autosparsity import choose
from skillhub.checkpoint import write_safetensors
from skillhub.config import load_config
from skillhub.errors import LocalizeError
from skillhub.hub import Hub
from skillhub.strategies.dataless import Dataless


def write_config(root: Path, model_cfg: object, extra: str = "") -> None:
    """An open_clip service config on ``root``'s base, plus ``extra`` TOML."""
    (root / "config.toml").write_text(f'[base]\nfamily = "open_clip"\nmodel = "{model_cfg}"\n'
                                      f'weights = "{root / "base.safetensors"}"\n[state]\ndir = "{root / "state"}"\n'
                                      + extra)


class Fake:
    def __init__(self, sparsity: float) -> None:
        self.sparsity = sparsity


def test_choose_takes_the_smallest_rung_that_keeps_enough() -> None:
    acc = {1.0: 0.9, 0.01: 0.5, 0.02: 0.8, 0.05: 0.895, 0.1: 0.9}
    calls: list[float] = []

    def localize(s: float) -> Fake:
        calls.append(s)
        return Fake(s)

    c = choose(localize, lambda d: acc[d.sparsity], ladder=[0.1, 0.01, 0.05, 0.02], keep=0.99)  # type: ignore[arg-type]
    assert (c.sparsity, c.reached, c.finetune) == (0.05, True, 0.9)
    assert calls == [1.0, 0.01, 0.02, 0.05] and c.delta.sparsity == 0.05  # type: ignore[attr-defined]
    assert c.record(0.99)["accuracy"] == {"0.01": 0.5, "0.02": 0.8, "0.05": 0.895}
    never = choose(Fake, lambda d: 0.1 if d.sparsity < 1 else 0.9, ladder=[0.01, 0.02], keep=0.99)  # type: ignore[arg-type]
    assert (never.sparsity, never.reached) == (0.02, False)


def test_params_accept_auto_and_the_strategy_alone_refuses_it() -> None:
    p = Dataless.Params.model_validate({"sparsity": "auto"})
    assert p.model_dump()["auto_ladder"] == (0.01, 0.02, 0.05, 0.1, 0.2)
    assert Dataless.Params.model_validate({"sparsity": 0.05}).model_dump() == {"sparsity": 0.05}  # bytes unchanged
    with pytest.raises(ValueError):
        Dataless.Params.model_validate({"sparsity": "most"})
    with pytest.raises(LocalizeError, match="chosen from a skill's examples"):
        Dataless().localize(None, p, None)  # type: ignore[arg-type]


def test_the_service_picks_a_sparsity_from_the_drops_examples_and_records_it(tiny, tmp_path: Path) -> None:
    cfg, sd = tiny
    write_config(tmp_path, cfg, '[localize.params]\nsparsity = "auto"\nauto_ladder = [0.01, 0.05, 0.2]\n')
    ft = trained_skill(cfg, sd, 1)
    write_safetensors(tmp_path / "skill.safetensors", ft, {"skillhub.classes": json.dumps(["a", "b", "c"]),
                                                           "skillhub.head_scale": "20"})
    plain = {k: v for k, v in ft.items() if not k.startswith("skillhub.examples")}
    write_safetensors(tmp_path / "plain.safetensors", plain, {"skillhub.classes": json.dumps(["a", "b", "c"])})
    with Hub(load_config(tmp_path / "config.toml", env={})) as hub:
        row = hub.ingest(tmp_path / "skill.safetensors", skill="learnt")
        record = row.meta["auto_sparsity"]
        assert record["sparsity"] in (0.01, 0.05, 0.2) and record["keep"] == 0.99
        assert set(record["accuracy"]) <= {"0.01", "0.05", "0.2"} and repr(record["sparsity"]) in record["accuracy"]
        tried = [float(s) for s in record["accuracy"]]
        assert record["reached"] == (record["accuracy"][repr(record["sparsity"])] >= 0.99 * record["finetune_accuracy"])
        assert all(record["accuracy"][repr(s)] < 0.99 * record["finetune_accuracy"] for s in tried[:-1])
        numel = sum(v.numel() for k, v in sd.items() if k.startswith("visual.") and v.is_floating_point())
        assert row.nnz == pytest.approx(record["sparsity"] * numel, abs=2)
        assert row.params == {"sparsity": "auto", "auto_ladder": [0.01, 0.05, 0.2]}  # the request, as configured
        # without examples: the smallest rung, and why
        row = hub.ingest(tmp_path / "plain.safetensors", skill="plain")
        assert row.meta["auto_sparsity"]["sparsity"] == 0.01 and "reason" in row.meta["auto_sparsity"]
        hub.reconcile()
        assert hub.current is not None and set(hub.current.manifest["skills"]) == {"learnt", "plain"}


def test_localize_and_merge_on_the_cli_climb_the_same_ladder_as_the_service(tiny, tmp_path: Path) -> None:
    """One ladder for every path: `skillhub localize --sparsity auto` and `skillhub merge --sparsity auto` keep the
    mask the service keeps for the same checkpoint, and a checkpoint without examples gets the smallest rung."""
    from skillhub.cli import main
    from skillhub.delta import SparseDelta

    cfg, sd = tiny
    write_config(tmp_path, cfg)  # no [localize.params]: "auto" is the default
    ft = trained_skill(cfg, sd, 1)
    meta = {"skillhub.classes": json.dumps(["a", "b", "c"]), "skillhub.head_scale": "20"}
    write_safetensors(tmp_path / "skill.safetensors", ft, meta)
    plain = {k: v for k, v in ft.items() if not k.startswith("skillhub.examples")}
    write_safetensors(tmp_path / "plain.safetensors", plain, meta)
    with Hub(load_config(tmp_path / "config.toml", env={})) as hub:
        row = hub.ingest(tmp_path / "skill.safetensors", skill="skill")
        served = hub.registry.load_mask(row.mask_sha)
    assert row.params == {"sparsity": "auto"} and row.meta["auto_sparsity"]["reached"] is not None
    base, conf = str(tmp_path / "base.safetensors"), ["--config", str(tmp_path / "config.toml")]
    for name in ("skill", "plain"):
        assert main(["localize", *conf, "--base", base, "--finetuned", str(tmp_path / f"{name}.safetensors"),
                     "--out", str(tmp_path / f"{name}.mask.safetensors")]) == 0
    cli = SparseDelta.load(tmp_path / "skill.mask.safetensors")
    assert cli.nnz == served.nnz and cli.provenance.params["sparsity"] == row.meta["auto_sparsity"]["sparsity"]
    assert all(torch.equal(cli.indices[k], served.indices[k]) and torch.equal(cli.values[k], served.values[k])
               for k in served.values)
    numel = sum(v.numel() for k, v in sd.items() if k.startswith("visual.") and v.is_floating_point())
    assert SparseDelta.load(tmp_path / "plain.mask.safetensors").nnz == math.floor(0.01 * numel)
    assert main(["merge", *conf, "--base", base, "--out", str(tmp_path / "merged.safetensors"), "--masks",
                 str(tmp_path / "masks"), str(tmp_path / "skill.safetensors")]) == 0
    assert SparseDelta.load(tmp_path / "masks" / "skill.mask.safetensors").nnz == served.nnz

"""skillhub.desired: the one resolver of a skill's strategy and params, used by the service, the CLI and the config
check alike."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from skillhub.config import load_config
from skillhub.desired import localization
from skillhub.errors import ConfigError
from skillhub.plugins import check_config, load_plugins

REPO = Path(__file__).resolve().parents[1]


def cfg(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    (tmp_path / "config.toml").write_text('[localize]\nstrategy = "dataless"\n[localize.params]\nsparsity = 0.05\n'
                                          + text)
    return load_config(tmp_path / "config.toml", env={})


def test_global_settings_apply_without_a_table_or_sidecar(tmp_path: Path) -> None:
    assert localization(cfg(tmp_path, ""), "a") == ("dataless", {"sparsity": 0.05})


def test_a_skill_table_wins_over_the_sidecar_and_inherits_global_params_for_the_global_strategy(tmp_path: Path) -> None:
    c = cfg(tmp_path, '[skills.a]\nstrategy = "dataless"\n')
    assert localization(c, "a", {"strategy": "trained"}) == ("dataless", {"sparsity": 0.05})
    c = cfg(tmp_path, '[skills.a]\nparams = { sparsity = 0.2 }\n')
    assert localization(c, "a", {"strategy": "trained", "params": {"steps": 3}}) == ("dataless", {"sparsity": 0.2})


def test_another_strategy_never_gets_the_global_params(tmp_path: Path) -> None:
    c = cfg(tmp_path, '[skills.a]\nstrategy = "trained"\n')
    assert localization(c, "a") == ("trained", {})
    assert localization(cfg(tmp_path, ""), "b", {"strategy": "trained"}) == ("trained", {})
    assert localization(cfg(tmp_path, ""), "b", {"strategy": "dataless"}) == ("dataless", {"sparsity": 0.05})
    assert localization(cfg(tmp_path, ""), "b", {"params": {"sparsity": 0.1}}) == ("dataless", {"sparsity": 0.1})


def test_explicit_flags_override_like_the_cli(tmp_path: Path) -> None:
    c = cfg(tmp_path, "")
    assert localization(c, "a", params={"sparsity": 0.3}) == ("dataless", {"sparsity": 0.3})
    assert localization(c, "a", strategy="dataless") == ("dataless", {"sparsity": 0.05})
    assert localization(c, "a", strategy="trained", params={"steps": 2}) == ("trained", {"steps": 2})


def test_the_config_check_validates_what_the_service_will_use(tmp_path: Path) -> None:
    # [skills.a] names the global strategy without params: the service uses the global params, so the check must
    # validate those for this skill too (an earlier check validated {} here and disagreed with the service).
    c = cfg(tmp_path, '[skills.a]\nstrategy = "dataless"\n')
    check_config(c, load_plugins([]))
    bad = cfg(tmp_path, '[skills.a]\nstrategy = "trained"\nparams = { sparsity = 0.2 }\n')
    with pytest.raises(ConfigError, match="skills.a"):
        check_config(bad, load_plugins([]))


def test_every_environment_example_in_config_toml_works() -> None:
    text = (REPO / "config.toml").read_text()
    examples = dict(re.findall(r"(SKILLHUB_[A-Z_]+)=([^\s,)]+)", text))
    assert "SKILLHUB_STITCH__PARAMS__SCALE" in examples
    cfg = load_config(REPO / "config.toml", env=examples)
    check_config(cfg, load_plugins([REPO / "plugins"]))

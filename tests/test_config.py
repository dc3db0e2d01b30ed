"""skillhub.config: defaults, the repo's config.toml, precedence, path resolution, errors and dump()."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from skillhub.config import (
    BaseSection,
    Config,
    PluginsSection,
    SkillSection,
    SkillsSection,
    StateSection,
    WatchSection,
    load_config,
)
from skillhub.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def defaults_at(folder: Path) -> Config:
    """The default config with its paths resolved against ``folder``."""
    return Config(
        watch=WatchSection(dir=folder / "inbox"),
        state=StateSection(dir=folder / "state"),
        plugins=PluginsSection(dirs=[folder / "plugins"]),
    )


def write(folder: Path, text: str, name: str = "config.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=kwargs.pop("env", {}), **kwargs)  # type: ignore[arg-type]
    return info.value


def test_defaults() -> None:
    cfg = Config()
    assert cfg.base == BaseSection(family="state_dict", weights=None, model=None, include=[], exclude=[])
    assert (cfg.watch.dir, cfg.watch.rescan_seconds, cfg.watch.stable_seconds) == (Path("inbox"), 30.0, 1.0)
    assert (cfg.watch.shard_timeout_seconds, cfg.watch.poll) == (600.0, False)
    assert (cfg.state.dir, cfg.state.keep_versions, cfg.state.keep_staged, cfg.state.write_weights) == (
        Path("state"), 5, True, True)
    assert cfg.device == "auto"
    assert (cfg.localize.strategy, cfg.localize.params) == ("dataless", {"sparsity": "auto"})
    assert (cfg.stitch.policy, cfg.stitch.params, cfg.stitch.accumulate) == ("average", {}, "float64")
    assert cfg.skills == SkillsSection(disabled=[], per_skill={})
    assert (cfg.serve.enabled, cfg.serve.host, cfg.serve.port, cfg.serve.token_env) == (
        True, "127.0.0.1", 8750, "SKILLHUB_TOKEN")
    assert (cfg.serve.max_body_bytes, cfg.serve.max_concurrency) == (32 * 1024 * 1024, 64)
    assert cfg.plugins.dirs == [Path("plugins")]
    assert cfg.source is None


def test_auto_sparsity_is_the_default_only_where_no_params_are_written(tmp_path: Path) -> None:
    # The service's default (a mask as large as the skill needs); a written table, even an empty one, is taken as
    # it is, and another strategy's params are never given a dataless option.
    def params(text: str) -> dict:
        path = tmp_path / "c.toml"
        path.write_text(text)
        return dict(load_config(path, env={}).localize.params)

    assert params("") == {"sparsity": "auto"}
    assert params("[localize]\nmax_relative_delta = 0.4\n") == {"sparsity": "auto"}
    assert params("[localize.params]\n") == {}
    assert params("[localize.params]\nsparsity = 0.05\n") == {"sparsity": 0.05}
    assert params('[localize]\nstrategy = "trained"\n') == {}


def test_models_are_frozen() -> None:
    with pytest.raises(ValidationError):
        Config().serve.port = 1  # type: ignore[misc]


def test_no_file_gives_defaults_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(env={}) == defaults_at(tmp_path)


def test_repo_config_toml_loads_to_the_defaults() -> None:
    cfg = load_config(REPO / "config.toml", env={})
    assert cfg.source == REPO / "config.toml"
    assert cfg.model_copy(update={"source": None}) == defaults_at(REPO)


def test_repo_config_toml_shows_every_key() -> None:
    text = (REPO / "config.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    sections = {name: field.annotation for name, field in Config.model_fields.items() if name != "source"}
    for name, section in sections.items():
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            assert name in data
            continue
        for key, field in section.model_fields.items():
            if name == "skills" and key == "per_skill":
                assert "# [skills.my_skill]" in text
            elif field.default is None:  # unset by default: shown commented out
                assert f"# {key} = " in text, f"{name}.{key}"
            else:
                assert key in data[name], f"{name}.{key}"


def test_config_toml_in_cwd_and_skillhub_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "[serve]\nport = 1\n")
    other = write(tmp_path / "elsewhere", "[serve]\nport = 2\n", name="other.toml")
    monkeypatch.chdir(tmp_path)
    assert load_config(env={}).serve.port == 1
    cfg = load_config(env={"SKILLHUB_CONFIG": str(other)})
    assert (cfg.serve.port, cfg.source, cfg.state.dir) == (2, other, other.parent / "state")


def test_missing_file_is_named(tmp_path: Path) -> None:
    err = config_error(tmp_path / "nope.toml")
    assert err.path == tmp_path / "nope.toml" and "not found" in str(err)
    err = config_error(None, env={"SKILLHUB_CONFIG": str(tmp_path / "gone.toml")})
    assert err.path == tmp_path / "gone.toml" and "SKILLHUB_CONFIG" in str(err)


def test_relative_paths_resolve_against_the_file_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "conf"
    path = write(folder, f"""
[base]
weights = "models/base.safetensors"
[watch]
dir = "../drops"
[state]
dir = "{tmp_path / 'abs-state'}"
[plugins]
dirs = ["plugins", "~/my-plugins"]
""")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config("conf/config.toml", env={})
    assert cfg.source == path
    assert cfg.base.weights == folder / "models/base.safetensors"
    assert cfg.watch.dir == folder / "../drops"
    assert cfg.state.dir == tmp_path / "abs-state"
    assert cfg.plugins.dirs == [folder / "plugins", tmp_path / "home/my-plugins"]


def test_env_and_override_paths_resolve_against_the_file_folder(tmp_path: Path) -> None:
    path = write(tmp_path / "conf", "")
    cfg = load_config(path, env={"SKILLHUB_WATCH__DIR": "in"}, overrides={"state.dir": "st"})
    assert (cfg.watch.dir, cfg.state.dir) == (path.parent / "in", path.parent / "st")


def test_unknown_key_names_the_field_and_suggests_the_close_match(tmp_path: Path) -> None:
    path = write(tmp_path, "[serve]\nprot = 9000\n")
    err = config_error(path)
    assert (err.path, err.key) == (path, "serve.prot")
    assert "unknown key 'serve.prot'" in str(err)
    assert err.hint is not None and err.hint.startswith("did you mean 'port'") and "valid keys: " in err.hint
    assert err.exit_code == 2


@pytest.mark.parametrize(("text", "key"), [
    ("[sevre]\nport = 1\n", "sevre"),
    ("[skills.vision]\nenabld = false\n", "skills.vision.enabld"),
])
def test_unknown_keys_at_other_levels(tmp_path: Path, text: str, key: str) -> None:
    err = config_error(write(tmp_path, text))
    assert err.key == key and err.hint is not None and "did you mean" in err.hint


@pytest.mark.parametrize(("text", "key", "words"), [
    ("[serve]\nport = 70000\n", "serve.port", "65535"),
    ("[watch]\nrescan_seconds = -1\n", "watch.rescan_seconds", "greater than 0"),
    ('device = "gpu"\n', "device", "cuda:N"),
    ("[state]\nkeep_versions = 0\n", "state.keep_versions", "greater than or equal to 1"),
    ('[stitch]\naccumulate = "float16"\n', "stitch.accumulate", "float64"),
    ('[base]\nfamily = "open-clip"\n', "base.family", "identifier"),
    ('[base]\nfactory = "nocolon"\n', "base.factory", "module:callable"),
    ("[skills.vision]\nversion = 0\n", "skills.vision.version", "greater than or equal to 1"),
    ("[skills]\nvision = 3\n", "skills.vision", "must be a table"),
    ("serve = 5\n", "serve", "must be a table"),
])
def test_bad_values_name_the_field(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = write(tmp_path, text)
    err = config_error(path)
    assert (err.path, err.key) == (path, key)
    assert f"'{key}'" in err.message and words in err.message


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_good_devices(device: str) -> None:
    assert load_config(None, env={"SKILLHUB_DEVICE": device}).device == device


def test_several_errors_name_the_first_and_count_the_rest(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, 'device = "gpu"\n[serve]\nport = -1\nhost = 5\n'))
    assert err.key == "device" and "(and 2 more errors)" in err.message


def test_env_overrides_parse_values_as_toml(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""), env={
        "SKILLHUB_SERVE__PORT": "9000",
        "SKILLHUB_SERVE__HOST": "0.0.0.0",
        "skillhub_device": "cuda:1",
        "SKILLHUB_WATCH__POLL": "true",
        "SKILLHUB_WATCH__STABLE_SECONDS": "2.5",
        "SKILLHUB_STITCH__PARAMS__LAMBDA": "0.3",
        "SKILLHUB_LOCALIZE__PARAMS__SPARSITY": "0.05",
        "SKILLHUB_LOCALIZE__PARAMS__NOTE": "plain text",
        "SKILLHUB_SKILLS__DISABLED": '["a", "b"]',
        "SKILLHUB_SKILLS__VISION__VERSION": "3",
        "SKILLHUB_BASE__MODEL": "1e3",  # a text field keeps the text rather than becoming a float
        "SKILLHUB_BASE__INCLUDE": '["visual.*"]',
    })
    assert (cfg.serve.port, cfg.serve.host, cfg.device) == (9000, "0.0.0.0", "cuda:1")
    assert (cfg.watch.poll, cfg.watch.stable_seconds) == (True, 2.5)
    assert cfg.stitch.params == {"lambda": 0.3}
    assert cfg.localize.params == {"sparsity": 0.05, "note": "plain text"}
    assert cfg.skills.disabled == ["a", "b"] and cfg.skills.for_skill("vision").version == 3
    assert (cfg.base.model, cfg.base.include) == ("1e3", ["visual.*"])


def test_env_merges_into_file_tables(tmp_path: Path) -> None:
    path = write(tmp_path, "[stitch.params]\nalpha = 1\n[serve]\nport = 1\n")
    cfg = load_config(path, env={"SKILLHUB_STITCH__PARAMS__LAMBDA": "0.3"})
    assert cfg.stitch.params == {"alpha": 1, "lambda": 0.3} and cfg.serve.port == 1


def test_unrelated_skillhub_variables_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    env = {"SKILLHUB_TOKEN": "secret", "SKILLHUB_SOURCE": "/x", "SKILLHUB_SERV__PORT": "1", "OTHER": "1"}
    assert load_config(path, env=env).model_copy(update={"source": None}) == defaults_at(tmp_path)


def test_env_error_blames_the_variable(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, ""), env={"SKILLHUB_SERVE__PORT": "lots"})
    assert err.key == "serve.port" and "SKILLHUB_SERVE__PORT" in err.message
    err = config_error(write(tmp_path, ""), env={"SKILLHUB_SERVE__PROT": "1"})
    assert err.key == "serve.prot" and err.hint is not None and "'port'" in err.hint


def test_precedence_overrides_beat_env_beat_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[serve]\nport = 1\nhost = "file"\n[stitch]\npolicy = "sum"\n')
    env = {"SKILLHUB_SERVE__PORT": "2", "SKILLHUB_SERVE__HOST": "env"}
    cfg = load_config(path, env=env, overrides={"serve.port": 3, "device": None})
    assert (cfg.serve.port, cfg.serve.host, cfg.stitch.policy, cfg.device) == (3, "env", "sum", "auto")
    assert load_config(path, env=env).serve.port == 2
    assert load_config(path, env={}).serve.port == 1


def test_override_tables_merge_into_file_tables(tmp_path: Path) -> None:
    path = write(tmp_path, "[stitch.params]\nalpha = 1\nbeta = 2\n")
    overrides = {"stitch.params": {"beta": 3, "gamma": [4]}}
    assert load_config(path, env={}, overrides=overrides).stitch.params == {"alpha": 1, "beta": 3, "gamma": [4]}
    assert overrides == {"stitch.params": {"beta": 3, "gamma": [4]}}  # the caller's mapping is left alone


def test_override_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    err = config_error(path, overrides={"serve.port": 70000})
    assert err.key == "serve.port" and "override 'serve.port'" in err.message
    err = config_error(path, overrides={"sevre.port": 1})
    assert err.key == "sevre" and err.hint is not None and "'serve'" in err.hint
    assert config_error(path, overrides={"source": "x"}).key == "source"
    err = config_error(path, overrides={"device.x": 1})  # device is not a table
    assert err.key == "device" and "override 'device.x'" in err.message
    err = config_error(write(tmp_path, "device = 'cpu'\n"), env={"SKILLHUB_DEVICE__X": "1"})
    assert err.key == "device.x" and "is not a table" in err.message


def test_per_skill_tables_and_is_enabled(tmp_path: Path) -> None:
    path = write(tmp_path, """
[skills]
disabled = ["old"]

[skills.vision]
strategy = "dataless"
params = { sparsity = 0.02 }
version = 2

[skills.muted]
enabled = false

[skills.old]
enabled = true
""")
    skills = load_config(path, env={}).skills
    assert set(skills.per_skill) == {"vision", "muted", "old"}
    assert skills.for_skill("vision") == SkillSection(strategy="dataless", params={"sparsity": 0.02}, version=2)
    assert skills.for_skill("unknown") == SkillSection()
    assert [skills.is_enabled(n) for n in ("vision", "muted", "old", "unknown")] == [True, False, False, True]


def test_skills_section_from_python() -> None:
    skills = SkillsSection(disabled=["a"], per_skill={"b": SkillSection(enabled=False)})
    assert not skills.is_enabled("a") and not skills.is_enabled("b")
    with pytest.raises(ValidationError, match="reserved"):
        SkillsSection.model_validate({"per_skill": {"enabled": False}})


def test_source_is_rejected_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'source = "elsewhere.toml"\n')
    err = config_error(path)
    assert (err.path, err.key) == (path, "source")


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[serve]\nport = = 1\n")
    err = config_error(path)
    assert err.path == path and str(err).startswith(str(path)) and "line 2" in str(err)


def test_dump_round_trips(tmp_path: Path) -> None:
    path = write(tmp_path / "a", r"""
device = "cuda:0"
[base]
family = "open_clip"
model = "ViT-B-32"
weights = "w.safetensors"
include = ["visual.*"]
factory = "pkg.mod:build"
[watch]
stable_seconds = 0.0
[localize.params]
sparsity = 0.015
nested = { deep = [1, 2.5, "x"], inf = inf }
"odd key" = "quote \" backslash \\ tab \t"
[stitch]
accumulate = "float32"
[skills]
disabled = ["x"]
[skills."my skill.v2"]
params = { sparsity = 0.1 }
version = 4
[skills.plain]
[serve]
port = 0
""")
    cfg = load_config(path, env={})
    text = cfg.dump()
    again = load_config(write(tmp_path / "b", text), env={})
    assert again.model_copy(update={"source": None}) == cfg.model_copy(update={"source": None})
    assert math.isinf(again.localize.params["nested"]["inf"])
    assert str(path) in text.splitlines()[0]


def test_dump_of_the_defaults_round_trips(tmp_path: Path) -> None:
    text = Config().dump()
    assert "# weights is not set" in text
    assert load_config(write(tmp_path, text), env={}) == defaults_at(tmp_path).model_copy(
        update={"source": tmp_path / "config.toml"})

"""Plugins: discovery, registration errors, lookup, params and config checks, event hooks, and the DARE plugin.

Every test builds a fresh plugin manager (``load_plugins``); plugin files are written to ``tmp_path`` and loaded by
path, exactly as a user's own would be.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from skillhub import LocalizeContext, Provenance, SparseDelta, TaskVector, write_safetensors
from skillhub.stitch import stitch
from skillhub.config import load_config
from skillhub.errors import ConfigError, LocalizeError, PluginError
from skillhub.localize import resolve_params, run_localizer
from skillhub.plugins import check_config, get_plugin_manager, load_plugins

REPO_PLUGINS = Path(__file__).parent.parent / "plugins"
DARE_FILE = REPO_PLUGINS / "dare.py"


def write_plugin(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --- discovery and registration -----------------------------------------------------------------------------------


def test_builtins_are_registered_through_the_hooks() -> None:
    plugins = load_plugins([], entry_points=False)
    assert set(plugins.localizers) == {"dataless", "trained"}
    assert set(plugins.policies) == {"average", "sum", "ties"}
    assert {"state_dict", "open_clip"} <= set(plugins.families)
    assert plugins.origins[("localization strategy", "dataless")] == "skillhub.strategies.dataless"
    assert plugins.origins[("stitch policy", "ties")] == "skillhub.policies.ties"
    assert plugins.localizer("dataless").name == "dataless"
    assert plugins.make_policy("sum", {"scale": 0.5}).params.scale == 0.5


def test_builtins_with_entry_points_enabled() -> None:
    # The default path (entry points on) must work in a plain environment too.
    plugins = load_plugins([])
    assert {"dataless"} <= set(plugins.localizers)
    assert {"average", "sum", "ties"} <= set(plugins.policies)


def test_repo_plugins_folder_loads_dare_as_a_file_plugin() -> None:
    plugins = load_plugins([REPO_PLUGINS], entry_points=False)
    assert "dare" in plugins.localizers
    assert "dataless" in plugins.localizers  # the built-ins are still there
    # Loaded by path, like a user's plugin, not imported as part of the package.
    assert plugins.origins[("localization strategy", "dare")] == f"file:{DARE_FILE}"
    assert plugins.manager.get_plugin(f"file:{DARE_FILE}") is not None


def test_a_missing_plugin_folder_is_not_an_error(tmp_path: Path) -> None:
    plugins = load_plugins([tmp_path / "not-yet"], entry_points=False)
    assert set(plugins.localizers) == {"dataless", "trained"}


def test_private_files_in_a_plugin_folder_are_skipped(tmp_path: Path) -> None:
    write_plugin(tmp_path, "_helpers", "raise RuntimeError('must not be imported')\n")
    plugins = load_plugins([tmp_path], entry_points=False)
    assert set(plugins.localizers) == {"dataless", "trained"}


def test_a_plugin_file_registers_a_new_strategy_and_policy(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "mine", """
        import torch
        from skillhub import hookimpl, Localizer, StitchPolicy

        class Mine(Localizer):
            name = "mine"

        class Last(StitchPolicy):
            name = "last"

        @hookimpl
        def register_localizers():
            return [Mine]

        @hookimpl
        def register_stitch_policies():
            return [Last]
    """)
    plugins = load_plugins([tmp_path], entry_points=False)
    assert plugins.localizer("mine").name == "mine"
    assert plugins.policy("last").name == "last"
    assert plugins.origins[("stitch policy", "last")] == f"file:{path}"


# A user's plugin that registers a strategy under a built-in's name.
COPYCAT = """
    from skillhub import hookimpl, Localizer

    class Copycat(Localizer):
        name = "dataless"

    @hookimpl
    def register_localizers():
        return [Copycat]
"""


def test_duplicate_strategy_name_names_both_plugins(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "copycat", COPYCAT)
    with pytest.raises(PluginError) as err:
        load_plugins([tmp_path], entry_points=False)
    text = str(err.value)
    assert "'dataless'" in text and "twice" in text
    assert "skillhub.strategies.dataless" in text
    assert f"file:{path}" in text
    assert "Hint:" in text


def test_duplicate_policy_name_between_two_files(tmp_path: Path) -> None:
    for stem in ("one", "two"):
        write_plugin(tmp_path, stem, """
            from skillhub import hookimpl, StitchPolicy

            class Same(StitchPolicy):
                name = "same"

            @hookimpl
            def register_stitch_policies():
                return [Same]
        """)
    with pytest.raises(PluginError, match=r"stitch policy 'same' registered twice") as err:
        load_plugins([tmp_path], entry_points=False)
    text = str(err.value)
    assert f"file:{tmp_path / 'one.py'}" in text and f"file:{tmp_path / 'two.py'}" in text
    assert "Hint:" in text


def test_duplicate_message_names_the_first_registrant_first(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "copycat", COPYCAT)
    with pytest.raises(PluginError) as err:
        load_plugins([tmp_path], entry_points=False)
    assert f"by 'skillhub.strategies.dataless' and by 'file:{path}'" in str(err.value)


def test_misspelled_hook_is_an_error_naming_the_hook(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "typo", """
        from skillhub import hookimpl

        @hookimpl
        def register_localizerz():
            return []
    """)
    with pytest.raises(PluginError) as err:
        load_plugins([tmp_path], entry_points=False)
    text = str(err.value)
    assert "unknown hook" in text
    assert "register_localizerz" in text
    assert str(path) in text
    assert "register_localizers" in (err.value.hint or "")  # the hint lists the real hooks


def test_hookimpl_with_an_unknown_argument_is_a_plugin_error(tmp_path: Path) -> None:
    write_plugin(tmp_path, "badarg", """
        from skillhub import hookimpl

        @hookimpl
        def skill_registered(skill, colour):
            pass
    """)
    with pytest.raises(PluginError, match="colour"):
        load_plugins([tmp_path], entry_points=False)


def test_plugin_that_raises_on_import_names_the_file(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "broken", """
        import skillhub
        raise RuntimeError("boom at import")
    """)
    with pytest.raises(PluginError) as err:
        load_plugins([tmp_path], entry_points=False)
    assert err.value.path == path
    assert str(path) in str(err.value)
    assert "RuntimeError" in str(err.value) and "boom at import" in str(err.value)
    assert "Hint:" in str(err.value)


def test_plugin_with_a_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "syntax", "def oops(:\n")
    with pytest.raises(PluginError) as err:
        load_plugins([tmp_path], entry_points=False)
    assert err.value.path == path
    assert "SyntaxError" in str(err.value)


@pytest.mark.parametrize("returned", ["[object]", "[Localizer()]", "[NoName]", "[int]"])
def test_registering_something_that_is_not_a_named_localizer_class(tmp_path: Path, returned: str) -> None:
    write_plugin(tmp_path, "notone", f"""
        from skillhub import hookimpl, Localizer

        class NoName(Localizer):
            pass  # no `name`

        @hookimpl
        def register_localizers():
            return {returned}
    """)
    with pytest.raises(PluginError, match=r"not a named Localizer subclass.*Hint"):
        load_plugins([tmp_path], entry_points=False)


def test_registering_a_stitch_policy_as_a_localizer(tmp_path: Path) -> None:
    write_plugin(tmp_path, "mixup", """
        from skillhub import hookimpl, StitchPolicy

        class Pol(StitchPolicy):
            name = "pol"

        @hookimpl
        def register_localizers():
            return [Pol]
    """)
    with pytest.raises(PluginError, match="not a named Localizer subclass"):
        load_plugins([tmp_path], entry_points=False)


def test_registering_a_bare_class_instead_of_a_list(tmp_path: Path) -> None:
    write_plugin(tmp_path, "bare", """
        from skillhub import hookimpl, Localizer

        class Mine(Localizer):
            name = "mine"

        @hookimpl
        def register_localizers():
            return Mine
    """)
    with pytest.raises(PluginError, match="bare"):
        load_plugins([tmp_path], entry_points=False)


def test_registration_hook_that_raises_names_the_plugin(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "raiser", """
        from skillhub import hookimpl

        @hookimpl
        def register_stitch_policies():
            raise ValueError("nope")
    """)
    with pytest.raises(PluginError, match=r"register_stitch_policies.*ValueError: nope") as err:
        load_plugins([tmp_path], entry_points=False)
    assert f"file:{path}" in str(err.value)


def test_the_same_plugin_folder_listed_twice(tmp_path: Path) -> None:
    write_plugin(tmp_path, "harmless", "from skillhub import hookimpl\n")
    plugins = load_plugins([tmp_path, tmp_path], entry_points=False)
    assert set(plugins.localizers) == {"dataless", "trained"}


def test_a_fresh_manager_each_time(tmp_path: Path) -> None:
    a = get_plugin_manager([], entry_points=False)
    b = get_plugin_manager([], entry_points=False)
    assert a is not b
    assert a.get_plugin("skillhub.strategies.dataless") is not None


# --- lookup and params ----------------------------------------------------------------------------------------------


def test_unknown_strategy_lists_the_available_ones() -> None:
    plugins = load_plugins([REPO_PLUGINS], entry_points=False)
    with pytest.raises(PluginError) as err:
        plugins.localizer("nope")
    text = str(err.value)
    assert "'nope'" in text
    assert "dare" in text and "dataless" in text
    assert err.value.key == "localize.strategy"


def test_unknown_policy_and_family_list_the_available_ones() -> None:
    plugins = load_plugins([], entry_points=False)
    with pytest.raises(PluginError, match=r"unknown stitch policy 'nope'.*average, sum, ties"):
        plugins.policy("nope")
    with pytest.raises(PluginError, match=r"unknown model family 'nope'.*state_dict"):
        plugins.family("nope")


@pytest.mark.parametrize(("raw", "field"), [
    ({"sparsity": 2}, "sparsity"),
    ({"sparsity": 0}, "sparsity"),
    ({"sparsity": "lots"}, "sparsity"),
    ({"sparsty": 0.1}, "sparsty"),
])
def test_resolve_params_names_the_bad_field(raw: dict, field: str) -> None:
    dataless = load_plugins([], entry_points=False).localizer("dataless")
    with pytest.raises(LocalizeError) as err:
        resolve_params(dataless, raw)
    assert err.value.key == field
    assert field in str(err.value)
    assert "'dataless'" in str(err.value)
    assert "sparsity" in (err.value.hint or "")  # the hint lists the valid params


def test_resolve_params_defaults_and_values() -> None:
    dataless = load_plugins([], entry_points=False).localizer("dataless")
    assert resolve_params(dataless, None).model_dump() == {"sparsity": 0.01}
    assert resolve_params(dataless, {"sparsity": 0.2}).model_dump() == {"sparsity": 0.2}


def test_make_policy_with_bad_params_is_a_plugin_error() -> None:
    plugins = load_plugins([], entry_points=False)
    with pytest.raises(PluginError, match=r"stitch policy 'sum'.*scal") as err:
        plugins.make_policy("sum", {"scal": 0.3})
    assert err.value.key == "stitch.params"


# --- event hooks ------------------------------------------------------------------------------------------------------


def test_event_hooks_reach_a_plugin(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "listener", """
        from skillhub import hookimpl

        seen = []

        @hookimpl
        def skill_registered(skill, version, mask_sha, nnz, strategy):
            seen.append(("registered", skill, version, mask_sha, nnz, strategy))

        @hookimpl
        def skill_failed(skill, reason):
            seen.append(("failed", skill, reason))

        @hookimpl
        def version_published(version, manifest):
            seen.append(("published", version, manifest["policy"]))
    """)
    plugins = load_plugins([tmp_path], entry_points=False)
    hook = plugins.manager.hook
    hook.skill_registered(skill="cars", version=2, mask_sha="ab" * 32, nnz=17, strategy="dataless")
    hook.skill_failed(skill="dogs", reason="tensor 'x' holds NaN")
    hook.version_published(version=5, manifest={"policy": "average"})
    module = plugins.manager.get_plugin(f"file:{path}")
    assert module.seen == [
        ("registered", "cars", 2, "ab" * 32, 17, "dataless"),
        ("failed", "dogs", "tensor 'x' holds NaN"),
        ("published", 5, "average"),
    ]


def test_event_hook_may_take_a_subset_of_the_arguments(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "partial", """
        from skillhub import hookimpl

        names = []

        @hookimpl
        def skill_registered(skill):
            names.append(skill)
    """)
    plugins = load_plugins([tmp_path], entry_points=False)
    plugins.manager.hook.skill_registered(skill="a", version=1, mask_sha="0", nnz=1, strategy="dare")
    assert plugins.manager.get_plugin(f"file:{path}").names == ["a"]


# --- check_config ---------------------------------------------------------------------------------------------------


def test_check_config_accepts_a_good_config(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, f"""
        [localize]
        strategy = "dataless"
        params = {{ sparsity = 0.05 }}

        [stitch]
        policy = "sum"
        params = {{ scale = 0.4 }}

        [plugins]
        dirs = ["{REPO_PLUGINS.resolve().as_posix()}"]

        [skills.foo]
        strategy = "dare"          # does not inherit [localize] params meant for dataless

        [skills.bar]
        params = {{ sparsity = 0.2 }}
    """), env={})
    check_config(cfg, load_plugins(cfg.plugins.dirs, entry_points=False))


def test_check_config_does_not_import_torch(tmp_path: Path) -> None:
    # `skillhub config check` must start fast: loading the built-in plugins and validating every params model is
    # pure Python; torch (~2 s to import) loads only when tensor code runs. A fresh interpreter, as the CLI has.
    code = textwrap.dedent("""
        import sys
        from skillhub.config import load_config
        from skillhub.localize import resolve_params
        from skillhub.plugins import check_config, load_plugins
        cfg = load_config(None, env={})
        plugins = load_plugins(cfg.plugins.dirs)
        check_config(cfg, plugins)
        for name in plugins.policies:
            plugins.make_policy(name)
        for cls in plugins.localizers.values():
            resolve_params(cls, {})
        print(sorted(m for m in ("torch", "numpy") if m in sys.modules))
    """)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SKILLHUB_")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "torch" not in proc.stdout, f"modules loaded: {proc.stdout.strip()}"


def test_check_config_rejects_bad_localize_params(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        [localize]
        params = { sparsity = 5 }
    """)
    cfg = load_config(path, env={})
    with pytest.raises(ConfigError) as err:
        check_config(cfg, load_plugins([], entry_points=False))
    assert err.value.key == "localize"
    assert err.value.path == path
    assert "sparsity" in str(err.value)
    assert err.value.exit_code == 2


def test_check_config_rejects_an_unknown_strategy_for_one_skill(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, """
        [skills.foo]
        strategy = "nope"
    """), env={})
    with pytest.raises(ConfigError) as err:
        check_config(cfg, load_plugins([], entry_points=False))
    assert err.value.key == "skills.foo"
    assert "skills.foo" in str(err.value) and "'nope'" in str(err.value)
    assert "dataless" in (err.value.hint or "")


def test_check_config_rejects_bad_per_skill_params(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, """
        [skills.foo]
        params = { sparsity = 3 }
    """), env={})
    with pytest.raises(ConfigError, match=r"skills\.foo.*sparsity"):
        check_config(cfg, load_plugins([], entry_points=False))


def test_check_config_rejects_unknown_policy_and_dare_params(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "a", """
        [stitch]
        policy = "nope"
    """), env={})
    with pytest.raises(ConfigError, match=r"stitch: unknown stitch policy 'nope'") as err:
        check_config(cfg, load_plugins([], entry_points=False))
    assert err.value.key == "stitch"
    cfg = load_config(write_config(tmp_path / "b", """
        [localize]
        strategy = "dare"
        params = { drop_rate = 1.0 }
    """), env={})
    with pytest.raises(ConfigError, match=r"localize:.*drop_rate"):
        check_config(cfg, load_plugins([REPO_PLUGINS], entry_points=False))


# --- the command line, as the plugins README tells a user to use it ------------------------------------------------


def skillhub_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m skillhub`` in a subprocess, as a user would (no SKILLHUB_* settings leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SKILLHUB_")}
    return subprocess.run([sys.executable, "-m", "skillhub", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_plugins_lists_dare(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f'[plugins]\ndirs = ["{REPO_PLUGINS.resolve().as_posix()}"]\n')
    proc = skillhub_cli("plugins", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if " dare " in ln)
    assert "drop_rate=0.9" in line and "rescale=True" in line
    assert str(DARE_FILE.resolve()) in line


def test_cli_localize_with_dare_and_a_param(tmp_path: Path) -> None:
    base, ft = random_pair(3, {"w": (64, 32), "b": (64,)})
    write_safetensors(tmp_path / "base.safetensors", base, {})
    write_safetensors(tmp_path / "ft.safetensors", ft, {})
    cfg = write_config(tmp_path, f'[plugins]\ndirs = ["{REPO_PLUGINS.resolve().as_posix()}"]\n')
    out = tmp_path / "ft.mask.safetensors"
    proc = skillhub_cli("localize", "--config", str(cfg), "--base", "base.safetensors", "--finetuned",
                        "ft.safetensors", "--out", str(out), "--strategy", "dare", "--param", "drop_rate=0.8",
                        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    delta = SparseDelta.load(out)
    assert delta.provenance.strategy == "dare"
    assert delta.provenance.params == {"drop_rate": 0.8, "rescale": True}
    assert 0 < delta.nnz < delta.numel


def test_cli_bad_dare_param_is_a_usage_error(tmp_path: Path) -> None:
    base, ft = random_pair(3, {"w": (8, 4)})
    write_safetensors(tmp_path / "base.safetensors", base, {})
    write_safetensors(tmp_path / "ft.safetensors", ft, {})
    cfg = write_config(tmp_path, f'[plugins]\ndirs = ["{REPO_PLUGINS.resolve().as_posix()}"]\n')
    proc = skillhub_cli("localize", "--config", str(cfg), "--base", "base.safetensors", "--finetuned",
                        "ft.safetensors", "--out", "x.mask.safetensors", "--strategy", "dare", "--param",
                        "drop_rate=1.5", cwd=tmp_path)
    assert "drop_rate" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.returncode == 2


# --- DARE -------------------------------------------------------------------------------------------------------------


def dare():
    return load_plugins([REPO_PLUGINS], entry_points=False).localizer("dare")


def random_pair(seed: int, shapes: dict[str, tuple[int, ...]]) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    ft = {k: v + 0.1 * torch.randn(s, generator=g) for (k, v), s in zip(base.items(), shapes.values())}
    return base, ft


def run_dare(task: TaskVector, params: dict | None = None, seed: int = 0) -> SparseDelta:
    return run_localizer(dare(), task, params, LocalizeContext(seed=seed), Provenance(skill="s"))


SHAPES = {"enc.w": (40, 30), "enc.b": (40,), "head.w": (5, 6, 7)}


def test_dare_is_deterministic_for_a_seed() -> None:
    task = TaskVector.from_state_dicts(*random_pair(0, SHAPES))
    a, b = run_dare(task, seed=7), run_dare(task, seed=7)
    assert a.indices.keys() == b.indices.keys()
    for k in a.indices:
        assert torch.equal(a.indices[k], b.indices[k]) and torch.equal(a.values[k], b.values[k])
    c = run_dare(task, seed=8)
    assert any(not torch.equal(a.indices[k], c.indices[k]) for k in a.indices)


def test_dare_mask_of_a_tensor_does_not_depend_on_the_other_tensors() -> None:
    base, ft = random_pair(1, SHAPES)
    full = run_dare(TaskVector.from_state_dicts(base, ft), seed=3)
    only = run_dare(TaskVector.from_state_dicts(base, ft, keys=["head.w"]), seed=3)
    assert torch.equal(full.indices["head.w"], only.indices["head.w"])
    assert torch.equal(full.values["head.w"], only.values["head.w"])


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_dare_keeps_about_one_minus_p(p: float) -> None:
    n = 200_000
    base = {"w": torch.zeros(400, 500)}
    ft = {"w": torch.rand(400, 500, generator=torch.Generator().manual_seed(2)) + 0.5}  # every τ non-zero
    delta = run_dare(TaskVector.from_state_dicts(base, ft), {"drop_rate": p}, seed=11)
    # Binomial(n, 1 - p): 6 standard deviations either side of the mean.
    mean, sd = n * (1 - p), math.sqrt(n * p * (1 - p))
    assert abs(delta.nnz - mean) < 6 * sd, (delta.nnz, mean, sd)


def test_dare_drop_rate_zero_keeps_every_nonzero_entry() -> None:
    base, ft = random_pair(4, SHAPES)
    task = TaskVector.from_state_dicts(base, ft)
    delta = run_dare(task, {"drop_rate": 0.0})
    for k in SHAPES:
        tau = (ft[k] - base[k]).reshape(-1)
        assert torch.equal(delta.indices[k].long(), tau.nonzero().reshape(-1))
        assert torch.equal(delta.values[k], tau[tau != 0])


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_dare_rescales_exactly(p: float) -> None:
    base, ft = random_pair(5, SHAPES)
    task = TaskVector.from_state_dicts(base, ft)
    scaled = run_dare(task, {"drop_rate": p}, seed=1)
    raw = run_dare(task, {"drop_rate": p, "rescale": False}, seed=1)
    for k in SHAPES:
        tau = (ft[k] - base[k]).reshape(-1)
        idx = scaled.indices[k].long()
        assert scaled.indices[k].dtype == torch.int32
        assert torch.equal(raw.indices[k], scaled.indices[k])  # rescale changes values, not the mask
        assert torch.equal(raw.values[k], tau[idx])
        assert torch.equal(scaled.values[k], tau[idx] / (1 - p))
        assert torch.allclose(scaled.values[k].double() * (1 - p), tau[idx].double(), rtol=1e-6, atol=0)


def test_dare_never_keeps_zero_task_vector_entries() -> None:
    base, ft = random_pair(6, SHAPES)
    g = torch.Generator().manual_seed(0)
    for k in ft:  # half of every tensor is untouched by the finetune
        same = torch.rand(ft[k].shape, generator=g) < 0.5
        ft[k] = torch.where(same, base[k], ft[k])
    task = TaskVector.from_state_dicts(base, ft)
    for p in (0.0, 0.5):
        delta = run_dare(task, {"drop_rate": p}, seed=2)
        for k, idx in delta.indices.items():
            tau = (ft[k] - base[k]).reshape(-1)
            assert bool((tau[idx.long()] != 0).all())
            assert bool((delta.values[k] != 0).all())
    zero = run_dare(TaskVector.from_state_dicts(base, dict(base)), {"drop_rate": 0.0})
    assert zero.nnz == 0 and zero.shapes == {k: tuple(s) for k, s in SHAPES.items()}


def test_dare_with_sum_policy_is_drop_and_rescale_task_arithmetic() -> None:
    p = 0.7
    base, ft = random_pair(8, SHAPES)
    delta = run_dare(TaskVector.from_state_dicts(base, ft), {"drop_rate": p}, seed=4)
    policy = load_plugins([REPO_PLUGINS], entry_points=False).make_policy("sum", {"scale": 1.0})
    merged = stitch(base, {"s": delta}, policy)
    for k in SHAPES:
        # Independently: θ₀ + γ⊙τ/(1 − p) in float64, with γ the mask DARE drew.
        mask = torch.zeros(math.prod(SHAPES[k]), dtype=torch.bool)
        mask[delta.indices[k].long()] = True
        mask = mask.reshape(SHAPES[k])
        tau = ft[k].double() - base[k].double()
        expected = base[k].double() + torch.where(mask, tau / (1 - p), torch.zeros_like(tau))
        assert torch.allclose(merged[k].double(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(merged[k][~mask], base[k][~mask])  # dropped entries stay exactly θ₀
        assert 0 < int(mask.sum()) < mask.numel()


def test_dare_stores_values_in_the_base_dtype() -> None:
    base = {"h": torch.zeros(50, 20, dtype=torch.bfloat16)}
    ft = {"h": torch.randn(50, 20, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)}
    delta = run_dare(TaskVector.from_state_dicts(base, ft), {"drop_rate": 0.5})
    assert delta.values["h"].dtype == torch.bfloat16
    assert delta.dtypes["h"] == torch.bfloat16


def test_dare_rescale_overflow_in_half_precision_is_a_localize_error() -> None:
    base = {"h": torch.zeros(100, dtype=torch.float16)}
    ft = {"h": torch.full((100,), 60000.0, dtype=torch.float16)}  # τ / 0.1 is far beyond float16's 65504
    with pytest.raises(LocalizeError, match=r"overflows.*float16.*'h'") as err:
        run_dare(TaskVector.from_state_dicts(base, ft), {"drop_rate": 0.9})
    assert err.value.key == "h"
    assert "drop_rate" in (err.value.hint or "")


@pytest.mark.parametrize(("raw", "field"), [
    ({"drop_rate": 1.0}, "drop_rate"),
    ({"drop_rate": -0.1}, "drop_rate"),
    ({"rescale": "maybe"}, "rescale"),
    ({"sparsity": 0.1}, "sparsity"),  # a dataless param given to dare
])
def test_dare_params_are_validated(raw: dict, field: str) -> None:
    with pytest.raises(LocalizeError) as err:
        resolve_params(dare(), raw)
    assert err.value.key == field
    assert "'dare'" in str(err.value)


def test_dare_params_are_frozen_and_stamped() -> None:
    params = resolve_params(dare(), {"drop_rate": 0.5})
    with pytest.raises(ValidationError):
        params.drop_rate = 0.1  # type: ignore[misc]
    task = TaskVector.from_state_dicts(*random_pair(9, SHAPES))
    assert run_dare(task, {"drop_rate": 0.5}).provenance.params == {"drop_rate": 0.5, "rescale": True}


def test_dare_reports_progress_per_tensor() -> None:
    calls: list[tuple[int, int]] = []
    task = TaskVector.from_state_dicts(*random_pair(10, SHAPES))
    run_localizer(dare(), task, None, LocalizeContext(progress=lambda d, t: calls.append((d, t))), Provenance())
    assert calls == [(1, 3), (2, 3), (3, 3)]


# --- the plugins README's examples work as written ------------------------------------------------------------------


def readme_python_blocks() -> list[str]:
    text = (REPO_PLUGINS / "README.md").read_text(encoding="utf-8")
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


def test_readme_examples_load_and_work(tmp_path: Path) -> None:
    blocks = readme_python_blocks()
    assert len(blocks) == 3  # strategy, policy, event hook
    for i, block in enumerate(blocks):
        write_plugin(tmp_path, f"readme_example_{i}", block)
    plugins = load_plugins([tmp_path], entry_points=False)
    assert {"threshold", "dataless"} <= set(plugins.localizers)
    assert "scaled_mean" in plugins.policies

    base, ft = random_pair(12, SHAPES)
    task = TaskVector.from_state_dicts(base, ft)
    delta = run_localizer(plugins.localizer("threshold"), task, {"threshold": 0.1}, LocalizeContext(), Provenance())
    for k in SHAPES:
        tau = (ft[k] - base[k]).reshape(-1)
        assert torch.equal(delta.indices[k].long(), (tau.abs() >= 0.1).nonzero().reshape(-1))
        assert torch.equal(delta.values[k], tau[tau.abs() >= 0.1])

    policy = plugins.make_policy("scaled_mean", {"scale": 0.5})
    merged = stitch(base, {"a": delta, "b": delta}, policy)  # two identical skills: the mean is the value itself
    for k in SHAPES:
        expected = base[k].double() + 0.5 * delta.dense(k, torch.float64)
        assert torch.allclose(merged[k].double(), expected, rtol=1e-6, atol=1e-7)

    plugins.manager.hook.version_published(version=3, manifest={"skills": {"a": {}, "b": {}}})

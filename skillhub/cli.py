"""The ``skillhub`` command (also ``python -m skillhub``): a thin layer that parses, calls the library, and turns a
:class:`~skillhub.errors.SkillhubError` into one line on stderr and a documented exit code.

Exit codes: 0 success; 2 usage or configuration error; 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skillhub.errors import SkillhubError, UsageError


def _parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UsageError(f"--param {text!r} is not KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def _params(args: argparse.Namespace) -> dict[str, Any]:
    return dict(_parse_param(p) for p in (getattr(args, "param", None) or []))


def _config(args: argparse.Namespace) -> Any:
    from skillhub.config import load_config

    return load_config(getattr(args, "config", None))


def _plugins(cfg: Any) -> Any:
    from skillhub.plugins import load_plugins

    return load_plugins(cfg.plugins.dirs)


def cmd_localize(args: argparse.Namespace) -> int:
    from skillhub.checkpoint import open_checkpoint
    from skillhub.desired import localization
    from skillhub.localize import LocalizeContext, resolve_params
    from skillhub.log import Progress
    from skillhub.ops import localize_checkpoint

    cfg = _config(args)
    plugins = _plugins(cfg)
    flags = _params(args)
    if args.sparsity is not None:
        flags["sparsity"] = args.sparsity
    skill = args.skill or _stem(args.finetuned)
    strategy, params = localization(cfg, skill, strategy=args.strategy, params=flags)
    try:
        resolve_params(plugins.localizer(strategy), params)
    except SkillhubError as e:  # a bad flag or config value is a usage error (exit 2), not a failure
        raise UsageError(e.message, key=e.key, hint=e.hint) from None
    family = plugins.family(cfg.base.family).from_config(cfg.base)
    base, ft = open_checkpoint(args.base), open_checkpoint(args.finetuned)
    bar = Progress(f"localize {Path(args.finetuned).name}")
    ctx = LocalizeContext(progress=bar)
    needs = plugins.localizer(strategy).needs_examples  # few-shot examples and head come with the checkpoint
    prepared = family.prepare(base, ft, None, examples=needs)
    if needs:
        assert prepared.examples is not None
        ctx.examples = family.objective(base, prepared.head, prepared.examples)
    result = localize_checkpoint(base, prepared, family=family, localizer=strategy, params=params, plugins=plugins,
                                 skill=skill, ctx=ctx)
    bar.close()
    sha = result.delta.save(args.out)
    d = result.delta
    print(f"{args.out}: {d.nnz} of {d.numel} entries ({d.density:.3%}) with {strategy}, "
          f"{Path(args.out).stat().st_size / 2**20:.2f} MiB = {Path(args.out).stat().st_size / ft.nbytes:.2%} of the "
          f"checkpoint, {result.seconds:.2f} s, sha256 {sha[:16]}")
    return 0


def _stem(path: str) -> str:
    name = Path(path).name
    return name.removesuffix(".safetensors") if name.endswith(".safetensors") else Path(path).stem


def cmd_stitch(args: argparse.Namespace) -> int:
    from skillhub.log import Progress
    from skillhub.ops import stitch_masks

    cfg = _config(args)
    plugins = _plugins(cfg)
    policy_name = args.policy or cfg.stitch.policy
    params = dict(cfg.stitch.params) if policy_name == cfg.stitch.policy else {}
    params.update(_params(args))
    policy = plugins.make_policy(policy_name, params)
    bar = Progress("stitch")
    manifest = stitch_masks(args.base, args.masks, args.out, policy=policy, device=args.device or cfg.device,
                            check_base=not args.any_base, progress=bar)
    bar.close()
    print(f"{args.out}: {len(manifest['skills'])} skills stitched with {policy.name}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from skillhub.desired import localization
    from skillhub.errors import CheckpointError
    from skillhub.localize import resolve_params
    from skillhub.log import Progress
    from skillhub.merge import merge, open_inputs

    cfg = _config(args)
    plugins = _plugins(cfg)
    flags = dict(_parse_param(p) for p in (args.strategy_param or []))
    if args.sparsity is not None:
        flags["sparsity"] = args.sparsity
    if args.scope is not None:
        flags["scope"] = args.scope
    strategy, params = localization(cfg, None, strategy=args.strategy, params=flags)
    policy_name = args.policy or cfg.stitch.policy
    policy_params = dict(cfg.stitch.params) if policy_name == cfg.stitch.policy else {}
    policy_params.update(_params(args))
    try:
        resolve_params(plugins.localizer(strategy), params)
    except SkillhubError as e:  # a bad flag or config value is a usage error (exit 2), not a failure
        raise UsageError(e.message, key=e.key, hint=e.hint) from None
    policy = plugins.make_policy(policy_name, policy_params)
    family = plugins.family(cfg.base.family).from_config(cfg.base)
    try:  # headers only: a missing file or another architecture is a usage error, found before any work
        inputs = open_inputs(args.base, args.finetuned, family, examples=plugins.localizer(strategy).needs_examples)
    except CheckpointError as e:
        raise UsageError(e.message, path=e.path, key=e.key, hint=e.hint) from None
    bar = Progress("merge")
    result = merge(inputs, args.out, plugins=plugins, family=family, policy=policy, strategy=strategy, params=params,
                   device=args.device or cfg.device, masks=args.masks, threads=args.threads, progress=bar)
    bar.close()
    s = result.seconds
    print(f"{args.out}: {len(result.manifest['skills'])} skills localized with {strategy} and stitched with "
          f"{policy.name} (localize {s['localize']:.2f} s, stitch {s['stitch']:.2f} s, write {s['write']:.2f} s)")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    cfg = _config(args)
    plugins = _plugins(cfg)
    for kind, table in (("localization strategy", plugins.localizers), ("stitch policy", plugins.policies),
                        ("model family", plugins.families)):
        for name, cls in sorted(table.items()):
            params = ", ".join(f"{k}={v.default!r}" for k, v in cls.Params.model_fields.items()) \
                if hasattr(cls, "Params") else ""
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"{kind:<22} {name:<12} from {plugins.origins[(kind, name)]}  [{params}]  {doc}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from skillhub.plugins import check_config

    cfg = _config(args)
    check_config(cfg, _plugins(cfg))
    print(cfg.dump(), end="")
    print(f"# config OK ({cfg.source or 'defaults'})", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from skillhub.daemon import Daemon

    return Daemon(_config(args)).run()


def _mutate_skill(cfg: Any, action: str, name: str, version: int | None) -> str:
    """enable/disable/remove/pin: through the running service's API when it holds the state folder, else on the
    registry directly."""
    from skillhub.errors import StateLockedError
    from skillhub.registry import Registry

    try:
        reg = Registry(Path(cfg.state.dir))
    except StateLockedError:
        from skillhub.client import Client

        token = os.environ.get(cfg.serve.token_env) or _read_token(cfg)
        with Client(f"http://{cfg.serve.host}:{cfg.serve.port}", token=token) as client:
            if action == "pin":
                client.pin(name, version)
            else:
                getattr(client, action)(name)
        return "applied by the running service"
    with reg:
        reg.skill(name)  # raises for an unknown skill
        if action in ("enable", "disable"):
            reg.set_enabled(name, action == "enable")
        elif action == "pin":
            reg.set_pinned(name, version)
        else:
            reg.remove_skill(name)
    return "recorded in the registry (applied when the service starts)"


def _read_token(cfg: Any) -> str | None:
    path = Path(cfg.state.dir) / "token"
    return path.read_text().strip() if path.exists() else None


def cmd_skills(args: argparse.Namespace) -> int:
    from skillhub.registry import Registry

    cfg = _config(args)
    if args.action in ("enable", "disable", "remove", "pin"):
        if not args.name:
            raise UsageError(f"skills {args.action} needs a skill name")
        version = None
        if args.action == "pin" and args.version not in (None, "none"):
            version = int(args.version)
        print(f"{args.action} {_safe(args.name)}: {_mutate_skill(cfg, args.action, args.name, version)}")
        return 0
    state = Path(cfg.state.dir)
    from skillhub.maintenance import lock_owner

    if lock_owner(state) is not None:
        from skillhub.client import Client

        token = os.environ.get(cfg.serve.token_env) or _read_token(cfg)
        with Client(f"http://{cfg.serve.host}:{cfg.serve.port}", token=token) as client:
            views = client.skills()
        if args.action == "list":
            for v in views:
                ver = f"v{v['active_version']}" if v["active_version"] else "not served"
                pin = f" pinned@{v['pinned']}" if v["pinned"] else ""
                print(f"{_safe(v['name'])}\t{ver}\t{'enabled' if v['enabled'] else 'disabled'}{pin}")
            return 0
        match = [v for v in views if v["name"] == args.name]
        if not match:
            raise UsageError(f"unknown skill {args.name!r}", hint="`skillhub skills list` shows the skills")
        print(json.dumps(match[0], ensure_ascii=True, indent=2))
        return 0
    if not (state / "registry.sqlite3").exists():
        print("no skills registered yet", file=sys.stderr)
        return 0 if args.action == "list" else 1
    with Registry(state, readonly=True) as reg:
        if args.action == "list":
            for s in reg.skills():
                latest = s.latest_ready
                flag = "enabled" if s.enabled and cfg.skills.is_enabled(s.name) else "disabled"
                pin = f" pinned@{s.pinned}" if s.pinned else ""
                ver = f"v{latest.version} nnz={latest.nnz}" if latest else "no READY version"
                print(f"{_safe(s.name)}\t{ver}\t{flag}{pin}")
            return 0
        rows = reg.versions(args.name)
        if not rows:
            raise UsageError(f"unknown skill {args.name!r}", hint="`skillhub skills list` shows the skills")
        for r in rows:
            print(json.dumps({"skill": r.skill, "version": r.version, "status": r.status, "reason": r.reason,
                              "strategy": r.strategy, "params": r.params, "mask_sha": r.mask_sha, "nnz": r.nnz,
                              "source_sha": r.source_sha}, ensure_ascii=True))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify image files with the running service: one skill (``--skill``, on ``--route``), or several skills
    from one pass of the merged model."""
    from skillhub.client import Client

    cfg = _config(args)
    images = [Path(p) for p in args.images]
    for p in images:
        if not p.is_file():
            raise UsageError(f"no image file {str(p)!r}", hint="give the paths of PNG or JPEG files")
    token = os.environ.get(cfg.serve.token_env) or _read_token(cfg)
    with Client(f"http://{cfg.serve.host}:{cfg.serve.port}", token=token) as client:
        if args.skill:
            answer = client.predict(args.skill, images, top_k=args.top_k, route=args.route)
        else:
            if args.route == "skill":
                raise UsageError("--route skill needs --skill NAME", hint="several skills at once run merged")
            skills = [s for s in args.skills.split(",") if s] if args.skills else None
            answer = client.predict_all(images, skills, top_k=args.top_k)
    print(json.dumps(answer, ensure_ascii=True, indent=2))
    return 0


def _safe(name: str) -> str:
    return name.encode("unicode_escape").decode("ascii")


def cmd_convert(args: argparse.Namespace) -> int:
    from skillhub.convert import convert

    n = convert(args.input, args.out)
    print(f"{args.out}: {n} tensors written (read with torch.load(weights_only=True) in a separate process)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from skillhub.maintenance import doctor

    report = doctor(Path(_config(args).state.dir))
    for line in report.notes:
        print(line)
    for line in report.problems:
        print(f"PROBLEM: {line}")
    print("healthy" if report.healthy else f"{len(report.problems)} problem(s) found")
    return 0 if report.healthy else 1


def cmd_backup(args: argparse.Namespace) -> int:
    from skillhub.maintenance import backup

    copied = backup(Path(_config(args).state.dir), Path(args.dest))
    print(f"{args.dest}: registry + {copied['masks']} mask files + {copied['heads']} head files")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from skillhub.maintenance import restore

    counts = restore(Path(args.src), Path(_config(args).state.dir), force=args.force)
    print(f"restored registry + {counts['masks']} mask files + {counts['heads']} head files; start `skillhub run`")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from skillhub.demo import run_demo

    run_demo(Path(args.dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skillhub", description="Compose finetuned skills into one model "
                                "(Localize-and-Stitch).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file (default: $SKILLHUB_CONFIG, else ./config.toml if present)")
    sub = p.add_subparsers(dest="command", required=True)
    _add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return _add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    q = sub.add_parser("localize", help="localize one finetuned checkpoint into a mask file")
    q.add_argument("--base", required=True)
    q.add_argument("--finetuned", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--strategy", default=None, help="default: [localize] strategy of the config")
    q.add_argument("--sparsity", type=float, default=None)
    q.add_argument("--skill", default=None, help="skill name (default: the file's stem)")
    q.add_argument("--param", action="append", metavar="KEY=VALUE", help="strategy param (repeatable)")
    q.set_defaults(func=cmd_localize)

    q = sub.add_parser("stitch", help="merge mask files into the base, offline")
    q.add_argument("--base", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--policy", default=None, help="default: [stitch] policy of the config")
    q.add_argument("--param", action="append", metavar="KEY=VALUE", help="policy param, e.g. scale=0.3")
    q.add_argument("--device", default=None)
    q.add_argument("--any-base", action="store_true", help="skip the check that masks were made for this base")
    q.add_argument("masks", nargs="+")
    q.set_defaults(func=cmd_stitch)

    q = sub.add_parser("merge", help="localize finetuned checkpoints and stitch them into the base, in one process")
    q.add_argument("--base", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--strategy", default=None, help="default: [localize] strategy of the config")
    q.add_argument("--sparsity", type=float, default=None)
    q.add_argument("--scope", choices=["global", "tensor"], default=None, help="dataless: one threshold over all "
                   "tensors (default) or the top sparsity of every tensor (mergekit's TIES trimming)")
    q.add_argument("--strategy-param", action="append", metavar="KEY=VALUE", help="strategy param (repeatable)")
    q.add_argument("--policy", default=None, help="default: [stitch] policy of the config")
    q.add_argument("--param", action="append", metavar="KEY=VALUE", help="policy param, e.g. scale=0.3")
    q.add_argument("--device", default=None)
    q.add_argument("--masks", default=None, metavar="DIR", help="also write each skill's mask file into DIR")
    q.add_argument("--threads", type=int, default=1, help="torch's threads per operation (default 1: the merge "
                   "already localizes the next finetune while it stitches one in)")
    q.add_argument("finetuned", nargs="+")
    q.set_defaults(func=cmd_merge)

    q = sub.add_parser("skills", help="the registry's skills")
    q.add_argument("action", choices=["list", "show", "enable", "disable", "remove", "pin"])
    q.add_argument("name", nargs="?")
    q.add_argument("version", nargs="?", help="for pin: a version number, or 'none' to unpin")
    q.set_defaults(func=cmd_skills)

    q = sub.add_parser("predict", help="classify image files with the running service")
    q.add_argument("--skill", default=None, help="one skill, answered on --route (default: [serve] route)")
    q.add_argument("--skills", default=None, help="without --skill: comma-separated skills from one merged pass "
                                                  "(default: every skill served)")
    q.add_argument("--route", choices=["skill", "merged"], default=None)
    q.add_argument("--top-k", type=int, default=5)
    q.add_argument("images", nargs="+")
    q.set_defaults(func=cmd_predict)

    q = sub.add_parser("run", help="run the service (watch the inbox, stitch, serve) in the foreground")
    q.set_defaults(func=cmd_run)

    q = sub.add_parser("plugins", help="list strategies, stitch policies and families, with their plugins")
    q.set_defaults(func=cmd_plugins)

    q = sub.add_parser("config", help="configuration")
    q.add_argument("action", choices=["check"])
    q.set_defaults(func=cmd_config_check)

    q = sub.add_parser("doctor", help="check a state folder (registry, mask files, versions, disk, lock)")
    q.set_defaults(func=cmd_doctor)

    q = sub.add_parser("backup", help="copy a consistent snapshot of the state folder (safe while running)")
    q.add_argument("dest")
    q.set_defaults(func=cmd_backup)

    q = sub.add_parser("restore", help="restore a backup into the state folder (service stopped)")
    q.add_argument("src")
    q.add_argument("--force", action="store_true", help="replace an existing registry (kept aside)")
    q.set_defaults(func=cmd_restore)

    q = sub.add_parser("convert", help="convert a PyTorch pickle (.pt/.bin) to safetensors, safely")
    q.add_argument("input")
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_convert)

    q = sub.add_parser("demo", help="create a small demo base model and skills, localize and stitch them")
    q.add_argument("--dir", default="demo")
    q.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "action", None) == "show" and not args.name:
        parser.error("skills show needs a skill name")
    from skillhub.log import configure_logging

    configure_logging(os.environ.get("SKILLHUB_LOG_LEVEL", "info"))
    try:
        return int(args.func(args))
    except SkillhubError as e:
        print(f"skillhub: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("skillhub: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line, with the traceback only when asked for
        if os.environ.get("SKILLHUB_DEBUG"):
            raise
        print(f"skillhub: internal error: {type(e).__name__}: {e} (set SKILLHUB_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

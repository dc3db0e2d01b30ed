"""The ``skillhub`` commands that work on a state folder or talk to the running service: ``run``, ``skills``,
``predict``, ``analytics``, ``doctor``, ``backup``, ``restore``. A skill change goes through the running service's
API when it holds the state folder, else to the registry directly."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from skillhub.cliargs import config as _config
from skillhub.errors import UsageError


def add_service_commands(sub: Any) -> None:
    """Add these commands' parsers to the ``skillhub`` sub-command parser ``sub``."""
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

    q = sub.add_parser("analytics", help="where each served skill's mask lives and how much the masks overlap")
    q.add_argument("--version", type=int, default=None, help="a kept version (default: the current one)")
    q.add_argument("--out", default=None, metavar="FILE.html", help="write a self-contained HTML report there")
    q.add_argument("--json", action="store_true", help="print the analytics as JSON (what GET /v1/analytics says)")
    q.set_defaults(func=cmd_analytics)

    q = sub.add_parser("run", help="run the service (watch the inbox, stitch, serve) in the foreground")
    q.add_argument("--follow", action="store_true", help="a read-only replica of the state folder: serve the "
                                                         "primary's published versions, never write")
    q.add_argument("--port", type=int, default=None, help="HTTP port (overrides [serve] port; a follower needs "
                                                          "its own)")
    q.set_defaults(func=cmd_run)

    q = sub.add_parser("doctor", help="check a state folder (registry, mask files, versions, disk, lock)")
    q.set_defaults(func=cmd_doctor)

    q = sub.add_parser("backup", help="copy a consistent snapshot of the state folder (safe while running)")
    q.add_argument("dest")
    q.set_defaults(func=cmd_backup)

    q = sub.add_parser("restore", help="restore a backup into the state folder (service stopped)")
    q.add_argument("src")
    q.add_argument("--force", action="store_true", help="replace an existing registry (kept aside)")
    q.set_defaults(func=cmd_restore)


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


def cmd_analytics(args: argparse.Namespace) -> int:
    """Mask analytics of a published version: from the running service when it holds the state folder (it knows the
    skills the quality gate holds since the version was published), else from the folder's manifest and mask files."""
    from skillhub.analytics import state_analytics, summary
    from skillhub.maintenance import lock_owner

    cfg = _config(args)
    state = Path(cfg.state.dir)
    if lock_owner(state) is not None:
        from skillhub.client import Client

        token = os.environ.get(cfg.serve.token_env) or _read_token(cfg)
        with Client(f"http://{cfg.serve.host}:{cfg.serve.port}", token=token) as client:
            result = client.analytics(args.version)
    else:
        result = state_analytics(state, args.version)
    if args.out:
        from skillhub.atomic import atomic_file
        from skillhub.dashboard import render_report

        with atomic_file(Path(args.out)) as f:
            f.write(render_report(result).encode("utf-8"))
        print(f"{args.out}: the mask analytics of version {result['version']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, ensure_ascii=True, indent=2))
    elif not args.out:
        print(summary(result))
    return 0


def _safe(name: str) -> str:
    return name.encode("unicode_escape").decode("ascii")


def cmd_run(args: argparse.Namespace) -> int:
    from skillhub.config import load_config
    from skillhub.daemon import Daemon

    cfg = load_config(getattr(args, "config", None), overrides={"serve.port": args.port})
    return Daemon(cfg, follow=args.follow).run()


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

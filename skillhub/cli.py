"""The ``skillhub`` command (also ``python -m skillhub``): a thin layer that parses, calls the library, and turns a
:class:`~skillhub.errors.SkillhubError` into one line on stderr and a documented exit code.

Exit codes: 0 success; 2 usage or configuration error; 1 any other failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from skillhub.cli_service import add_service_commands
from skillhub.cliargs import config as _config
from skillhub.cliargs import params as _params
from skillhub.cliargs import parse_param as _parse_param
from skillhub.cliargs import plugins as _plugins
from skillhub.errors import SkillhubError, UsageError


def cmd_localize(args: argparse.Namespace) -> int:
    from skillhub.autosparsity import localize_auto, wants_auto
    from skillhub.checkpoint import open_checkpoint
    from skillhub.desired import localization
    from skillhub.job import prepare, scorer_for
    from skillhub.localize import LocalizeContext, resolve_params
    from skillhub.log import Progress
    from skillhub.ops import LocalizeResult, localize_checkpoint
    from skillhub.stitch import resolve_device

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
    auto = wants_auto(params)  # the ladder scores masks on the examples, as the service does
    prepared = prepare(family, base, ft, None, needs=needs, wants=auto and family.reads_examples)
    if needs:
        assert prepared.examples is not None
        ctx.examples = family.objective(base, prepared.head, prepared.examples)

    def run(p: Mapping[str, Any]) -> LocalizeResult:
        return localize_checkpoint(base, prepared, family=family, localizer=strategy, params=p, plugins=plugins,
                                   skill=skill, ctx=ctx)

    chosen = ""
    if auto:
        result, record = localize_auto(run, lambda r: r.delta, params, prepared,
                                       lambda: scorer_for(base, family, resolve_device(cfg.device)), skill=skill)
        chosen = f" (sparsity auto: {record['sparsity']:.0%}, {record.get('reason') or _ladder(record)})"
    else:
        result = run(params)
    bar.close()
    sha = result.delta.save(args.out)
    d = result.delta
    print(f"{args.out}: {d.nnz} of {d.numel} entries ({d.density:.3%}) with {strategy}{chosen}, "
          f"{Path(args.out).stat().st_size / 2**20:.2f} MiB = {Path(args.out).stat().st_size / ft.nbytes:.2%} of the "
          f"checkpoint, {result.seconds:.2f} s, sha256 {sha[:16]}")
    return 0


def _sparsity(text: str) -> float | str:
    """``--sparsity``: a fraction, or ``auto``."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction such as 0.01 nor 'auto'") from None


def _ladder(record: Mapping[str, Any]) -> str:
    """The ladder's accuracies on the fit examples, as ``skillhub localize`` prints them."""
    tried = ", ".join(f"{float(k):.0%} {v:.3f}" for k, v in record["accuracy"].items())
    return (f"finetune {record['finetune_accuracy']:.3f} on the fit examples; {tried}"
            f"{'' if record['reached'] else '; no rung reached the target, the largest kept'}")


def _stem(path: str) -> str:
    name = Path(path).name
    return name.removesuffix(".safetensors") if name.endswith(".safetensors") else Path(path).stem


def cmd_stitch(args: argparse.Namespace) -> int:
    from skillhub.log import Progress
    from skillhub.offline import stitch_masks

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
    from skillhub.merge import merge, open_inputs, reads_examples

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
        inputs = open_inputs(args.base, args.finetuned, family,
                             **reads_examples(plugins, family, strategy, params))
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


def cmd_convert(args: argparse.Namespace) -> int:
    from skillhub.convert import convert

    n = convert(args.input, args.out)
    print(f"{args.out}: {n} tensors written (read with torch.load(weights_only=True) in a separate process)")
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
    q.add_argument("--sparsity", type=_sparsity, default=None, help="a fraction, or 'auto' (the smallest rung of "
                   "the ladder that keeps the finetune's accuracy on the checkpoint's examples)")
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
    q.add_argument("--sparsity", type=_sparsity, default=None, help="a fraction, or 'auto' (see localize)")
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

    q = sub.add_parser("plugins", help="list strategies, stitch policies and families, with their plugins")
    q.set_defaults(func=cmd_plugins)

    q = sub.add_parser("config", help="configuration")
    q.add_argument("action", choices=["check"])
    q.set_defaults(func=cmd_config_check)

    q = sub.add_parser("convert", help="convert a PyTorch pickle (.pt/.bin) to safetensors, safely")
    q.add_argument("input")
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_convert)

    q = sub.add_parser("demo", help="create a small demo base model and skills, localize and stitch them")
    q.add_argument("--dir", default="demo")
    q.set_defaults(func=cmd_demo)
    add_service_commands(sub)
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

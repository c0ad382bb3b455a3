"""The ``loradex`` command: every stage's commands under one parser, and the error edge.

Each stage owns its commands and adds them with ``add_commands(sub, common)``:

    hub        init, base, register, list, show, alias, delete, verify, jobs
    training   train, plan
    evals      eval, leaderboard, review
    serving    serve, gateway (serving/fleet/cli.py)
    promote    merge, export

A :class:`LoradexError` becomes one line on stderr and its exit code; anything
else one line too (``LORADEX_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys

from loradex.evals import cli as evals_cli
from loradex.hub import cli as hub_cli
from loradex.hub.errors import LoradexError
from loradex.promote import cli as promote_cli
from loradex.serving import cli as serving_cli
from loradex.serving.fleet import cli as fleet_cli
from loradex.training import cli as training_cli

STAGES = (hub_cli, training_cli, evals_cli, serving_cli, fleet_cli, promote_cli)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser = argparse.ArgumentParser(
        prog="loradex", description="A self-hosted hub for LoRA adapters: train, score, register, serve, export.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage in STAGES:
        stage.add_commands(sub, common)
    _describe(sub)
    return parser


def _describe(sub) -> None:
    """`loradex CMD --help` opens with the one-line help `loradex --help` shows, where a command has no description."""
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, parser in sub.choices.items():
        if not parser.description and helps.get(name):
            parser.description = helps[name][0].upper() + helps[name][1:] + "."
        for action in parser._actions:  # nested ACTION groups (base add, alias set, review export ...)
            if isinstance(action, argparse._SubParsersAction):
                _describe(action)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ctx = None
    try:
        ctx = hub_cli.Context(args)
        return int(args.func(ctx) or 0)
    except LoradexError as exc:
        print(f"loradex: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("loradex: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the edge: one line, unless debugging
        if os.environ.get("LORADEX_DEBUG"):
            raise
        print(f"loradex: unexpected error: {type(exc).__name__}: {exc} (set LORADEX_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
    finally:
        if ctx is not None:
            ctx.close_catalog()


if __name__ == "__main__":
    sys.exit(main())

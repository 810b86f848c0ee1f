"""The `aiflow` command line.

Each command group lives in its own module that exposes `register(subparsers)`; a command sets
`func` on its parser, which receives the parsed args and returns an exit code. Modules are imported
here, but each keeps heavy imports (torch, tritonclient) inside its command functions so that
`aiflow validate` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Command-group modules, in the order they appear in `aiflow --help`.
COMMAND_MODULES = (
    "aiflow.cli.operator_cmds",  # operator, validate, render
    "aiflow.cli.plan_cmds",  # plan, profile
    "aiflow.cli.data_cmds",  # data generate, train
    "aiflow.cli.flow_cmds",  # up, caption, demo, link
)


class CLIError(Exception):
    """An error the user can fix; printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiflow",
        description="Split multimodal inference across device, edge and cloud Triton servers.",
    )
    from aiflow import __version__

    parser.add_argument("--version", action="version", version=f"aiflow {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # group not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"aiflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `aiflow render ... | head`: the reader left; not an error of ours.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

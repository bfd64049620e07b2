"""The ``lejepa-kernels`` command line (also ``python -m lejepa_kernels``).

Each command lives in a module with ``add_parser(commands) -> argparse.ArgumentParser``, which
registers its subcommand and sets its ``run`` default, a callable ``(args) -> exit status``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from . import check, pretrain

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: tuple[Callable[..., argparse.ArgumentParser], ...] = (
    pretrain.add_parser,
    check.add_parser,
)
"""The ``add_parser`` of every command, in the order ``--help`` lists them: add new commands here."""


def build_parser() -> argparse.ArgumentParser:
    """The ``lejepa-kernels`` parser, with a subcommand per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="lejepa-kernels", description="LeJEPA with the fused SIGReg (sliced Epps-Pulley) loss."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser in COMMANDS:
        add_parser(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``lejepa-kernels`` on ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Without a command it prints the help on stderr and returns 2; a malformed option makes
    argparse exit with status 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)

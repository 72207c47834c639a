"""What both command lines share: help layout and turning errors into one-line messages."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence

from device.errors import DoorstepError

Command = Callable[[argparse.Namespace], int]


def formatter(prog: str) -> argparse.HelpFormatter:
    """Keep the hand-written example blocks in ``epilog`` as they are written."""
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def run(
    parser: argparse.ArgumentParser,
    commands: Mapping[str, Command],
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv`` and run the chosen command; a ``DoorstepError`` becomes ``prog: error: ...``
    on stderr and exit status 2 (no traceback: the message says what was wrong and where)."""
    args = parser.parse_args(argv)
    try:
        return commands[args.command](args)
    except DoorstepError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def parse_threads(text: str | None) -> list[int] | None:
    """``--threads 1,4`` -> [1, 4]; ``None`` when not given."""
    if not text:
        return None
    try:
        threads = [int(t) for t in text.split(",")]
    except ValueError:
        raise DoorstepError(f"--threads {text!r}: expected numbers like 1,4") from None
    if any(t < 1 for t in threads):
        raise DoorstepError(f"--threads {text!r}: thread counts start at 1")
    return threads

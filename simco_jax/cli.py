"""What the command lines beside launch.py share: a user's error is one line and exit 2.

`ArgumentParser` is argparse's, with its errors (a missing, unknown or ill-typed argument) as one
line `error: ...` instead of the usage text and a second line; `fail` ends any other expected
error the same way. No JAX here: arguments are checked before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn


def fail(message: str, *, code: int = 2) -> NoReturn:
    """`error: <message>` on stderr, and exit `code` (2: the user can fix it)."""
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with one-line errors."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def comma_list(kind: Callable = str) -> Callable[[str], list]:
    """An argparse `type` for 'a,b,c': a list of `kind`, refused in one line if one is not."""

    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r} lists nothing")
        try:
            return [kind(item) for item in items]
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None

    parse.__name__ = f"comma-separated {getattr(kind, '__name__', 'value')} list"
    return parse

"""Errors the tool reports as one line, each carrying the exit code it maps to.

The library speaks Python: a bad argument of a library call raises ``ArgumentError`` (a
``ValueError``) or ``ArgumentTypeError`` (a ``TypeError``) naming the Python argument, e.g.
``class_ids=5000: outside 0..999``. The command line speaks flags: ``cli.py`` turns the same
error into ``--class-id 5000: outside 0..999`` and exit code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GradcamError(Exception):
    """A failure the user can fix; its message is the one line the CLI prints."""

    exit_code = 1


class UsageError(GradcamError, ValueError):
    """A bad call, found before any image is written (exit code 2 on the command line)."""

    exit_code = 2


class ArgumentError(UsageError):
    """One argument of a library call is unusable: which argument, its value, and why."""

    def __init__(self, argument: str, value: object, problem: str) -> None:
        super().__init__(f"{argument}={value!r}: {problem}")
        self.argument, self.value, self.problem = argument, value, problem


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of the wrong type (a ``TypeError`` as well as a ``ValueError``)."""


class InputError(GradcamError):
    """One input image could not be used; the others still run (exit code 1)."""


LISTED = 12  # an unknown name with no close match lists the known ones when there are this few


def unknown(argument: str, name: str, known: Iterable[str], kind: str = "") -> ArgumentError:
    """Refuse an unknown name, suggesting the closest known ones (or all, when they are few)."""
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=5, cutoff=0.5)
    if close:
        hint = f"; did you mean {', '.join(close)}?"
    else:
        hint = f"; choose from {', '.join(known)}" if len(known) <= LISTED else ""
    return ArgumentError(argument, name, f"unknown {kind or argument}{hint}")


def quoted(path: object) -> str:
    """A path as it goes into a one-line message: quoted when it has spaces, quotes or
    control characters (a newline in a name must not split the line), as it is otherwise."""
    text = str(path)
    plain = text.isprintable() and not any(c in text for c in " '\"\\")
    return text if plain and text else repr(text)

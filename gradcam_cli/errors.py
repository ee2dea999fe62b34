"""Errors the tool reports as one line, each carrying the exit code it maps to."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GradcamError(Exception):
    """A failure the user can fix; its message is the one line the CLI prints."""

    exit_code = 1


class UsageError(GradcamError):
    """Bad option or argument, found before any work is done (exit code 2)."""

    exit_code = 2


class InputError(GradcamError):
    """One input image could not be used; the others still run (exit code 1)."""


def unknown(kind: str, name: str, known: Iterable[str]) -> UsageError:
    """Refuse an unknown name, suggesting the closest known ones."""
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UsageError(f"unknown {kind} {name!r}{hint}")

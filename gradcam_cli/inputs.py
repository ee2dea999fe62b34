"""Which images a run covers: files, folders, globs and lists, in a stable order, sharded."""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ArgumentError, quoted

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class BadInput:
    """A path given by the user that yields no image; reported as that path's error."""

    path: str
    reason: str


def is_image_name(path: Path, also: Collection[str] = ()) -> bool:
    """Tell by its suffix whether a file found in a folder is an image to explain (or has one of
    the suffixes ``also``, e.g. videos')."""
    return path.suffix.lower() in IMAGE_SUFFIXES or path.suffix.lower() in also


def parse_suffixes(text: str | None, argument: str = "video_ext") -> frozenset[str]:
    """File suffixes from ``mp4,avi`` (dots and case aside) as {".mp4", ".avi"}; an image's
    suffix is refused, since a file is explained as one or the other."""
    names = [n.strip().lstrip(".").lower() for n in (text or "").split(",") if n.strip()]
    images = [n for n in names if f".{n}" in IMAGE_SUFFIXES]
    if images or not all(n.isalnum() for n in names):
        raise ArgumentError(argument, text, "video file suffixes, comma-separated (mp4,avi,mov), not "
                            "an image's")
    return frozenset(f".{n}" for n in names)


def read_image_list(source: str) -> list[str]:
    """Read one path per line from a file, or from stdin when ``source`` is ``-``; lines are
    decoded as the file system decodes names, so a name that is not valid UTF-8 finds its file."""
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise ArgumentError("image_list", source, f"cannot read ({exc.strerror})") from exc
    return [line.strip() for line in os.fsdecode(data).splitlines() if line.strip()]


def expand(paths: Iterable[str], also: Collection[str] = ()) -> list[Path | BadInput]:
    """Expand each given path: a file stays, a folder gives its images (and files with the
    suffixes ``also``) recursively in sorted order, a glob its sorted matches; a path yielding
    nothing becomes a BadInput."""
    found: list[Path | BadInput] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p, also))
            what = "images or videos" if also else "images"
            found.extend(images or [BadInput(given, f"{quoted(given)}: no {what} in this folder")])
        elif path.exists() or not glob.has_magic(given):
            found.append(path)  # a missing or non-image file fails when it is decoded
        else:
            matches = sorted(Path(p) for p in glob.glob(given, recursive=True) if Path(p).is_file())
            found.extend(matches or [BadInput(given, f"{quoted(given)}: no file matches this pattern")])
    return found


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """Parse ``I/N`` (1 ≤ I ≤ N) into (I, N)."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index, count = 0, 0
    if not 1 <= index <= count:
        raise ArgumentError("shard", text, "expected I/N with 1 <= I <= N, e.g. 2/8")
    return index, count


def shard(items: Sequence, part: tuple[int, int] | None) -> list:
    """Keep every N-th item starting at the I-th: disjoint parts whose union is the whole."""
    if part is None:
        return list(items)
    index, count = part
    return list(items[index - 1::count])

"""Class names and per-image classes: ``--class-name``, ``--targets FILE`` and ``--targets folder``.

Light (no torch), so that the command line can offer ``SCORES`` without loading the library.
A class is named by its exact name; else, when only one class matches it that way, by its name
with case and underscores ignored ("Great_White_Shark" is "great white shark"); in a targets
file or a folder name, also by its id.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ArgumentError, ArgumentTypeError, InputError, unknown

SCORES = ("softmax", "sigmoid", "logit")  # what a class's reported score is
FOLDER = "folder"                           # --targets folder: the image's parent folder is its class


def _loose(name: str) -> str:
    """A name with case and underscores ignored (folder names cannot hold every character)."""
    return " ".join(name.replace("_", " ").split()).casefold()


@dataclass(frozen=True)
class ClassNames:
    """A head's class names, indexed by exact and by loose name, for lookups by the thousand."""

    names: Sequence[str]
    exact: Mapping[str, list[int]]
    loose: Mapping[str, list[int]]

    @classmethod
    def of(cls, categories: Sequence[str]) -> ClassNames:
        """Index ``categories``."""
        exact: dict[str, list[int]] = {}
        loose: dict[str, list[int]] = {}
        for i, name in enumerate(categories):
            exact.setdefault(name, []).append(i)
            loose.setdefault(_loose(name), []).append(i)
        return cls(categories, exact, loose)

    def find(self, token: str, ids: bool = False) -> int | str:
        """The class id ``token`` names (also a number when ``ids``), or why it names none."""
        exact = self.exact.get(token, [])
        if len(exact) == 1:
            return exact[0]
        if ids and token.strip().isdigit():
            number, last = int(token), len(self.names) - 1
            return number if number <= last else f"class {number} outside 0..{last}"
        loose = exact or self.loose.get(_loose(token), [])
        if len(loose) == 1:
            return loose[0]
        if loose:
            named = " and ".join(f"{i} ({self.names[i]})" for i in loose)
            return f"ambiguous, classes {named}; give the exact name or its id"
        return unknown("class", token, self.names, f"class {token!r}").problem


def class_ids_of(names: Sequence[str], categories: Sequence[str]) -> list[int]:
    """The ids of ``class_names``, refusing an unknown or ambiguous name with the closest ones."""
    if isinstance(names, str):
        raise ArgumentTypeError("class_names", names, f"a sequence of class names, e.g. [{names!r}]")
    index, ids = ClassNames.of(categories), []
    for name in names:
        found = index.find(name)
        if isinstance(found, str) and found.startswith("unknown"):
            raise unknown("class_names", name, categories, "class name")
        if isinstance(found, str):
            raise ArgumentError("class_names", name, found)
        ids.append(found)
    return ids


@dataclass(frozen=True)
class ImageClasses:
    """Each image's own classes: from a table keyed by path (``rows``), or, with ``rows`` None,
    its parent folder's name (ImageFolder layout)."""

    names: ClassNames
    rows: Mapping[str, list[int]] | None = None
    by_name: Mapping[str, list[str]] = field(default_factory=dict)  # file name -> its row keys

    def ids(self, image: Path) -> list[int]:
        """The classes of ``image``; an InputError (this image fails alone) when it has none."""
        if self.rows is None:
            found = self.names.find(image.parent.name, ids=True)
            if isinstance(found, str):
                raise InputError(f"{image}: its folder {image.parent.name!r} names no class of the "
                                 f"model (--targets folder): {found}")
            return [found]
        key = _match(self.rows, self.by_name, image)
        if key is None:
            raise InputError(f"{image}: no row for it in the targets file (rows match the image's "
                             "path, or its last folders and file name)")
        return self.rows[key]

    def settings(self, image: Path) -> list[int] | str:
        """What this image explains, for the resume check (its classes, or why it has none)."""
        try:
            return self.ids(image)
        except InputError as exc:
            return str(exc)


def _match(rows: Mapping[str, list[int]], by_name: Mapping[str, list[str]], image: Path) -> str | None:
    """The row key naming ``image``: its path as given, its absolute path, or the longest key
    that ends its path (a file name alone matches every image of that name)."""
    if str(image) in rows:
        return str(image)
    absolute, best = image.absolute().parts, None
    for key in by_name.get(image.name, []):
        parts = Path(key).parts
        if Path(key).is_absolute() or ".." in parts:
            hit = Path(key).resolve() == image.resolve()
        else:
            hit = absolute[-len(parts):] == parts
        if hit and (best is None or len(parts) > len(Path(best).parts)):
            best = key
    return best


def read_targets(targets: str | Path | Mapping[str, Sequence[int | str]] | None,
                 categories: Sequence[str]) -> ImageClasses | None:
    """``targets``: "folder", a CSV file ``image,class`` (header optional, one row per class,
    the class an id or a name) or a mapping image -> classes; each class checked here, once."""
    if targets is None:
        return None
    index = ClassNames.of(categories)
    if isinstance(targets, str) and targets == FOLDER:
        return ImageClasses(index)
    rows = _mapping_rows(targets) if isinstance(targets, Mapping) else _csv_rows(Path(targets))
    if not rows:
        raise ArgumentError("targets", _shown(targets), "no rows; expected image,class pairs")
    table: dict[str, list[int]] = {}
    for image, token, where in rows:
        found = index.find(str(token), ids=True)
        if isinstance(found, str):
            raise ArgumentError("targets", _shown(targets), f"{where}: {found}")
        classes = table.setdefault(image, [])
        if found not in classes:
            classes.append(found)
    by_name: dict[str, list[str]] = {}
    for key in table:
        by_name.setdefault(Path(key).name, []).append(key)
    return ImageClasses(index, table, by_name)


def _shown(targets: object) -> object:
    """How ``targets`` appears in an error: a file's path; a mapping as "mapping"."""
    return "mapping" if isinstance(targets, Mapping) else str(targets)


def _mapping_rows(targets: Mapping[str, Sequence[int | str]]) -> list[tuple[str, str, str]]:
    """(image, class, where) for each class of a mapping image -> classes."""
    return [(str(image), str(c), f"image {image!r}")
            for image, classes in targets.items()
            for c in ([classes] if isinstance(classes, (int, str)) else classes)]


def _csv_rows(path: Path) -> list[tuple[str, str, str]]:
    """(image, class, where) for each row of a targets CSV; a first row ``image,class`` is a header."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ArgumentError("targets", str(path), f"cannot read ({getattr(exc, 'strerror', None) or exc}); "
                            "expected a CSV file image,class, or 'folder'") from exc
    rows = []
    for number, row in enumerate(csv.reader(lines), 1):
        cells = [cell.strip() for cell in row]
        if not any(cells) or (number == 1 and [c.casefold() for c in cells] == ["image", "class"]):
            continue
        if len(cells) != 2 or not all(cells):
            raise ArgumentError("targets", str(path), f"line {number}: expected two columns image,class")
        rows.append((cells[0], cells[1], f"line {number}"))
    return rows

"""Tasks beyond classification, each a ``runner.Task`` with its own targets and record:
``segment`` (semantic segmentation) and ``detect`` (object detection). What they share: which
methods they run and which classes they explain, checked here once."""

from __future__ import annotations

from collections.abc import Sequence

from ..classes import class_ids_of
from ..errors import ArgumentError, ArgumentTypeError


def check_methods(methods: Sequence[str], allowed: Sequence[str], task: str) -> None:
    """Refuse a method the task does not run (perturbation and path methods), naming the others."""
    for name in methods:
        if name not in allowed:
            raise ArgumentError("methods", name, f"not available for {task}, which runs no perturbed "
                                f"or path passes; choose from {', '.join(allowed)}")


def chosen_classes(categories: Sequence[str], class_ids: Sequence[int],
                   class_names: Sequence[str]) -> tuple[int, ...]:
    """The classes given by id and by name, in order, once each; an id outside the model's
    classes is refused."""
    if isinstance(class_ids, (int, str)):
        raise ArgumentTypeError("class_ids", class_ids, f"a sequence of class ids, e.g. [{class_ids!r}]")
    bad = [c for c in class_ids if not 0 <= c < len(categories)]
    if bad:
        raise ArgumentError("class_ids", bad[0], f"outside 0..{len(categories) - 1}")
    return tuple(dict.fromkeys([*class_ids, *class_ids_of(class_names, categories)]))

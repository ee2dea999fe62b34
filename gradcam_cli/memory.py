"""Keeping a long run's memory flat: its cyclic garbage is collected on a time budget.

Every grid is drawn on a matplotlib figure, whose figure, canvas, artists and transforms refer
to each other, so it is freed only by the cyclic garbage collector. The young generations'
collections run every few thousand allocations of any thread, and those that come while a
grid is being drawn promote its live objects to the oldest generation. CPython collects that
one only when the objects promoted since its last collection outnumber a quarter of all
long-lived ones; with torch and torchvision loaded (some 380,000 objects) that takes
thousands of images, and until then each image's dead figure keeps 10-20 KB of native memory
(issue 11: +60 MB from image 100 to 900). For the same reason a full collection costs 0.1 to
0.3 s, too much after every batch: ``collect_garbage`` runs one only when the last is far
enough behind for collections to take at most ``BUDGET`` of the wall time, and never in a
process's first ``FIRST_AFTER`` seconds of calls, so a short run pays nothing.
"""

from __future__ import annotations

import gc
import time

BUDGET = 0.02  # the largest share of the wall time that full collections may take
FIRST_AFTER = 10.0  # seconds from the first call to the first collection (a few MB of garbage)

_next_at: list[float | None] = [None]  # time.monotonic() before which nothing is collected


def collect_garbage(budget: float = BUDGET) -> bool:
    """Run a full garbage collection unless the last one is too recent for ``budget``; say whether it ran."""
    start = time.monotonic()
    if _next_at[0] is None:
        _next_at[0] = start + FIRST_AFTER
    if start < _next_at[0] or not gc.isenabled():
        return False
    gc.collect()
    _next_at[0] = start + (time.monotonic() - start) / budget
    return True

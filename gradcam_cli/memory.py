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
enough behind for collections to take at most ``BUDGET`` of the wall time.
"""

from __future__ import annotations

import gc
import time

BUDGET = 0.02  # the largest share of the wall time that full collections may take

_next_at = [0.0]  # time.monotonic() before which collect_garbage does nothing


def collect_garbage(budget: float = BUDGET) -> bool:
    """Run a full garbage collection unless the last one is too recent for ``budget``; say whether it ran."""
    start = time.monotonic()
    if start < _next_at[0] or not gc.isenabled():
        return False
    gc.collect()
    _next_at[0] = start + (time.monotonic() - start) / budget
    return True

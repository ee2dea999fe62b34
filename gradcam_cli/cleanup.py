"""Leftovers of killed runs: the atomic writer's temporary files.

``io.atomic_write`` writes ``.<name>.<random>.tmp`` beside its target and renames it into
place. A process killed in between (SIGKILL, out of memory, power loss) leaves the temporary
file behind, and ``--skip-existing`` never looks at it, so a run removes such files under its
output folder when it starts. Only files untouched for ``STALE_AFTER`` seconds go: the shards
of a job array share the folder, and a temporary file of a running shard is seconds old.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

# mkstemp(prefix=".<name>.", suffix=".tmp" or ".tmp.mp4")
TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp(\.mp4)?")
STALE_AFTER = 600.0  # seconds: far longer than any write, and than clock skew on shared disks


def remove_temporaries(folder: str | Path, stale_after: float = STALE_AFTER) -> int:
    """Remove the atomic writer's temporary files under ``folder`` that were last modified more
    than ``stale_after`` seconds ago; return how many were removed."""
    cutoff = time.time() - stale_after
    removed = 0
    for root, _folders, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            if TEMPORARY.fullmatch(name) and _modified_before(path, cutoff):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _modified_before(path: Path, cutoff: float) -> bool:
    """Whether the file was last modified before ``cutoff`` (False once it is gone)."""
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:  # renamed into place meanwhile
        return False

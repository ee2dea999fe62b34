"""collect_garbage: nothing in a process's first seconds, then at most its time budget."""

from __future__ import annotations

import pytest

from gradcam_cli import memory


def test_collections_wait_for_first_after_then_keep_to_the_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now, collected = [100.0], []
    monkeypatch.setattr(memory.time, "monotonic", lambda: now[0])

    def slow_collect() -> None:
        collected.append(now[0])
        now[0] += 0.2

    monkeypatch.setattr(memory.gc, "collect", slow_collect)
    monkeypatch.setattr(memory, "_next_at", [None])
    assert not memory.collect_garbage()             # the first call only starts the clock
    now[0] += memory.FIRST_AFTER - 0.01
    assert not memory.collect_garbage()             # a short run pays nothing
    now[0] += 0.02
    assert memory.collect_garbage()                  # a 0.2 s collection at 2%: next in 10 s
    now[0] += 9.0
    assert not memory.collect_garbage()
    now[0] += 1.0
    assert memory.collect_garbage()
    assert len(collected) == 2

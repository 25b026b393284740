"""Timelines of one or more iterations as Chrome/Perfetto trace-event JSON (``chrome://tracing``,
ui.perfetto.dev): the simulator's streams and the bench's measured per-rank spans alike.

Span times are seconds; the trace's are microseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Span:
    """Something that kept a stream busy from ``start_s`` to ``end_s`` (seconds)."""

    track: str
    name: str
    start_s: float
    end_s: float


def chrome_trace(processes: dict[str, Sequence[Span]], tracks: Sequence[str] | None = None,
                 marks: dict[str, float] | None = None, other: dict | None = None) -> dict:
    """Trace-event JSON (object format): one process per key of ``processes``, one thread per track
    (``tracks`` in that order, else in order of first appearance); ``marks``: an "iteration end"
    instant event for the processes it names, at that time (seconds); ``other``: extra metadata."""
    events = []
    for pid, (process, spans) in enumerate(processes.items()):
        order = list(tracks or dict.fromkeys(s.track for s in spans))
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": process}})
        for tid, track in enumerate(order):
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": track}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        for s in spans:
            events.append({"ph": "X", "name": s.name, "cat": s.track, "pid": pid, "tid": order.index(s.track),
                           "ts": s.start_s * 1e6, "dur": max(0.0, s.end_s - s.start_s) * 1e6})
        if marks and process in marks:
            events.append({"ph": "i", "name": "iteration end", "pid": pid, "tid": 0, "s": "p",
                           "ts": marks[process] * 1e6})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"time_unit": "microseconds", **(other or {})}}

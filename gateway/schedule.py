"""Retry timing: when to try a message again, and when it has been queued too long.

Pure functions over `(attempts, received, now)`; the worker owns the clock. The retry schedule
lists the seconds to wait after the first, second, ... failed try; its last interval repeats.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta


def delay(*, attempts: int, schedule: Sequence[int]) -> int:
    """Return the seconds to wait after `attempts` tries have failed (the last interval repeats)."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, not {attempts}")
    if not schedule:
        raise ValueError("the retry schedule is empty")
    seconds = schedule[min(attempts - 1, len(schedule) - 1)]
    if seconds < 0:
        raise ValueError(f"retry interval {seconds} is negative")
    return seconds


def deadline(*, received: datetime, max_lifetime: int) -> datetime:
    """Return the moment a message received at `received` has been queued too long."""
    return received + timedelta(seconds=max_lifetime)


def expired(*, received: datetime, now: datetime, max_lifetime: int) -> bool:
    """Tell whether `now` is past the message's queue lifetime."""
    return now > deadline(received=received, max_lifetime=max_lifetime)


def next_attempt(
    *,
    attempts: int,
    received: datetime,
    now: datetime,
    schedule: Sequence[int],
    max_lifetime: int,
) -> datetime | None:
    """Return when to try again after `attempts` failed tries, or None: time to bounce."""
    due = now + timedelta(seconds=delay(attempts=attempts, schedule=schedule))
    if due > deadline(received=received, max_lifetime=max_lifetime):
        return None
    return due

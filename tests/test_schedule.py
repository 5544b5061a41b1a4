from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.schedule import delay, expired, next_attempt

RECEIVED = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
SCHEDULE = (60, 300, 900, 3600)

schedules = st.lists(st.integers(min_value=1, max_value=86_400), min_size=1, max_size=8)
attempt_counts = st.integers(min_value=1, max_value=1000)
lifetimes = st.integers(min_value=1, max_value=10 * 86_400)
elapsed = st.integers(min_value=0, max_value=20 * 86_400)


def test_first_retry_uses_first_interval():
    """After the first failure the wait is the first interval."""
    now = RECEIVED + timedelta(seconds=5)
    expected = now + timedelta(seconds=60)
    actual = next_attempt(
        attempts=1, received=RECEIVED, now=now, schedule=SCHEDULE, max_lifetime=432_000
    )
    assert expected == actual


def test_none_when_retry_would_pass_lifetime():
    """A retry that would land after the queue lifetime is None: bounce instead."""
    now = RECEIVED + timedelta(seconds=432_000 - 30)
    actual = next_attempt(
        attempts=1, received=RECEIVED, now=now, schedule=SCHEDULE, max_lifetime=432_000
    )
    assert actual is None


def test_retry_exactly_at_lifetime_is_allowed():
    """A retry landing exactly on the end of the lifetime still happens."""
    now = RECEIVED + timedelta(seconds=432_000 - 60)
    actual = next_attempt(
        attempts=1, received=RECEIVED, now=now, schedule=SCHEDULE, max_lifetime=432_000
    )
    assert RECEIVED + timedelta(seconds=432_000) == actual
    assert not expired(received=RECEIVED, now=actual, max_lifetime=432_000)


def test_expired_only_after_lifetime():
    """A message is expired once now is past received plus the lifetime."""
    end = RECEIVED + timedelta(seconds=100)
    assert not expired(received=RECEIVED, now=end, max_lifetime=100)
    assert expired(received=RECEIVED, now=end + timedelta(seconds=1), max_lifetime=100)


@pytest.mark.parametrize("attempts", [0, -1])
def test_attempts_below_one_are_refused(attempts):
    """Asking for a retry before any try failed is a programming error."""
    with pytest.raises(ValueError, match="attempts"):
        delay(attempts=attempts, schedule=SCHEDULE)


def test_empty_schedule_is_refused():
    """An empty schedule has no interval to give."""
    with pytest.raises(ValueError, match="empty"):
        delay(attempts=1, schedule=())


@given(schedules, attempt_counts)
def test_last_interval_repeats(schedule, attempts):
    """Any try beyond the schedule's length waits the last interval."""
    expected = schedule[-1]
    assert expected == delay(attempts=len(schedule) + attempts, schedule=schedule)


@given(schedules, attempt_counts, lifetimes, elapsed)
def test_never_past_lifetime(schedule, attempts, lifetime, seconds):
    """A next attempt, when there is one, is never after the end of the lifetime."""
    now = RECEIVED + timedelta(seconds=seconds)
    due = next_attempt(
        attempts=attempts, received=RECEIVED, now=now, schedule=schedule, max_lifetime=lifetime
    )
    if due is not None:
        assert due <= RECEIVED + timedelta(seconds=lifetime)
        assert due >= now
    else:
        assert now + timedelta(seconds=delay(attempts=attempts, schedule=schedule)) > (
            RECEIVED + timedelta(seconds=lifetime)
        )


@given(st.lists(st.integers(min_value=1, max_value=86_400), min_size=1, max_size=8), elapsed)
def test_monotone_for_a_sorted_schedule(raw, seconds):
    """With a non-decreasing schedule, more failures never mean an earlier retry."""
    schedule = sorted(raw)
    now = RECEIVED + timedelta(seconds=seconds)
    lifetime = 10**9
    dues = [
        next_attempt(
            attempts=n, received=RECEIVED, now=now, schedule=schedule, max_lifetime=lifetime
        )
        for n in range(1, len(schedule) + 3)
    ]
    assert all(d is not None for d in dues)
    assert dues == sorted(dues)


@given(schedules, attempt_counts, elapsed, elapsed)
def test_later_now_never_gives_earlier_retry(schedule, attempts, first, extra):
    """Asking later never yields an earlier time (absent the lifetime)."""
    early = RECEIVED + timedelta(seconds=first)
    late = early + timedelta(seconds=extra)
    args = {"attempts": attempts, "received": RECEIVED, "schedule": schedule}
    a = next_attempt(now=early, max_lifetime=10**9, **args)
    b = next_attempt(now=late, max_lifetime=10**9, **args)
    assert a is not None
    assert b is not None
    assert a <= b

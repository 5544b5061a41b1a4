import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.reference import is_reference, new_reference, reference_time

NOW = dt.datetime(2026, 6, 1, 12, 30, 45, 123456, tzinfo=dt.UTC)
times = st.datetimes(
    min_value=dt.datetime(1970, 1, 1, tzinfo=dt.UTC).replace(tzinfo=None),
    max_value=dt.datetime(9999, 12, 31, tzinfo=dt.UTC).replace(tzinfo=None),
    timezones=st.just(dt.UTC),
)
randoms = st.binary(min_size=10, max_size=10)


def test_shape():
    """A reference is SG- and 26 Crockford base32 characters."""
    ref = new_reference(NOW)
    assert len(ref) == 29
    assert ref.startswith("SG-")
    assert is_reference(ref)
    assert not set("ILOU") & set(ref[3:])


def test_known_value():
    """The encoding follows the ULID layout: 48-bit milliseconds then 80 random bits."""
    ref = new_reference(dt.datetime(1970, 1, 1, tzinfo=dt.UTC), bytes(9) + b"\x01")
    assert ref == "SG-" + "0" * 25 + "1"
    top = new_reference(dt.datetime(1970, 1, 1, tzinfo=dt.UTC), b"\xff" * 10)
    assert top == "SG-" + "0" * 10 + "Z" * 16


def test_random_by_default():
    """Two references made at the same millisecond differ."""
    assert new_reference(NOW) != new_reference(NOW)


def test_time_round_trip_to_the_millisecond():
    """The time of a reference is its creation time truncated to the millisecond."""
    assert reference_time(new_reference(NOW)) == NOW.replace(microsecond=123000)


def test_other_timezones_are_converted():
    """An aware time in another zone gives the same reference time as its UTC equivalent."""
    local = NOW.astimezone(dt.timezone(dt.timedelta(hours=5)))
    assert reference_time(new_reference(local)) == reference_time(new_reference(NOW))


@pytest.mark.parametrize(
    ("now", "random"),
    [
        (NOW.replace(tzinfo=None), None),
        (NOW, b"short"),
        (dt.datetime(1969, 12, 31, tzinfo=dt.UTC), None),
    ],
)
def test_bad_input(now, random):
    """A naive or out-of-range time, or the wrong amount of randomness, is a ValueError."""
    with pytest.raises(ValueError):
        new_reference(now, random)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SG-",
        "SG-01ARZ3NDEKTSV4RRFFQ69G5FA",
        "SG-01ARZ3NDEKTSV4RRFFQ69G5FAVV",
        "sg-01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "SG-01arz3ndektsv4rrffq69g5fav",
        "SG-01ARZ3NDEKTSV4RRFFQ69G5FAI",
        "SG-81ARZ3NDEKTSV4RRFFQ69G5FAV",
        "XX-01ARZ3NDEKTSV4RRFFQ69G5FAV",
    ],
)
def test_not_references(text):
    """Wrong length, prefix, case, letters or an overflowing first character are refused."""
    assert not is_reference(text)
    with pytest.raises(ValueError):
        reference_time(text)


@given(times, randoms)
def test_round_trip(now, random):
    """Every reference is well formed and gives back its time to the millisecond."""
    ref = new_reference(now, random)
    assert is_reference(ref)
    assert reference_time(ref) == now.replace(microsecond=now.microsecond // 1000 * 1000)


@given(times, times, randoms, randoms)
def test_sortable_by_time(a, b, random_a, random_b):
    """References made at different milliseconds sort in time order."""
    ref_a, ref_b = new_reference(a, random_a), new_reference(b, random_b)
    if reference_time(ref_a) < reference_time(ref_b):
        assert ref_a < ref_b

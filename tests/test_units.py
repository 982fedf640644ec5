"""Durations and sizes as ops write them in TOML (SPEC §2)."""

import pytest

from ambassador.units import formatDuration, parseDuration, parseSize


@pytest.mark.parametrize(
    "value, seconds",
    [
        (5, 5.0),
        (0.25, 0.25),
        ("50ms", 0.05),
        ("2s", 2.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("5m", 300.0),
        ("2h", 7200.0),
        (" 10 s ", 10.0),
    ],
)
def test_duration_with_or_without_unit(value, seconds):
    assert parseDuration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [0, -1, -0.5, "0s", "0ms", "-1s", "5", "5 sec", "5d", "s", "", True, None, [5],
     float("inf"), float("nan")],
)
def test_bad_or_non_positive_duration_is_refused(value):
    with pytest.raises(ValueError):
        parseDuration(value)


@pytest.mark.parametrize(
    "value, size",
    [
        (0, 0),
        (65536, 65536),
        ("100", 100),
        ("100B", 100),
        ("1KiB", 1024),
        ("1MiB", 1024**2),
        ("2GiB", 2 * 1024**3),
        ("1.5KiB", 1536),
    ],
)
def test_size_with_or_without_unit(value, size):
    assert parseSize(value) == size


@pytest.mark.parametrize("value", [-1, "1MB", "1 mb", "KiB", "-1KiB", True, 1.5, None])
def test_bad_size_is_refused(value):
    with pytest.raises(ValueError):
        parseSize(value)


@pytest.mark.parametrize("seconds, text", [(0.05, "50ms"), (2.0, "2s"), (300.0, "300s")])
def test_format_duration_round_trips(seconds, text):
    assert formatDuration(seconds) == text
    assert parseDuration(text) == pytest.approx(seconds)

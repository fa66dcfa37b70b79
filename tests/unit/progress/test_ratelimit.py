"""The per-migration rate limit of progress reports."""

import pytest

from nova_xen_ncm.progress.ratelimit import RateLimiter


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_first_report_of_each_key_passes():
    limiter = RateLimiter(5.0, clock=Clock())
    assert limiter.allow("a")
    assert limiter.allow("b")


def test_reports_within_the_interval_are_refused():
    clock = Clock()
    limiter = RateLimiter(5.0, clock=clock)
    assert limiter.allow("a")
    clock.now += 4.9
    assert not limiter.allow("a")
    clock.now += 0.1
    assert limiter.allow("a")
    # The interval restarts at the allowed report, not the refused one.
    clock.now += 4.0
    assert not limiter.allow("a")


def test_forget_lets_the_next_report_through():
    clock = Clock()
    limiter = RateLimiter(5.0, clock=clock)
    limiter.allow("a")
    limiter.forget("a")
    assert len(limiter) == 0
    assert limiter.allow("a")


def test_zero_interval_allows_everything():
    limiter = RateLimiter(0.0, clock=Clock())
    assert all(limiter.allow("a") for _ in range(5))


def test_negative_interval_is_refused():
    with pytest.raises(ValueError):
        RateLimiter(-1.0)

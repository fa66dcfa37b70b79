"""The retry helper: attempts, seconds and deadline bounds, reporting."""

import pytest
from oslo_config import cfg

from nova_xen_ncm.conf import xen_ncm
from nova_xen_ncm.engine import retry
from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.engine.errors import RetryExhausted
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.retry import RetryBudget


class FakeTime:
    """A clock that moves only when slept on (or told to)."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


class Flaky:
    def __init__(self, failures, error=TransportError, cost=0.0, ft=None):
        self.failures = failures
        self.error = error
        self.calls = 0
        self.cost = cost
        self.ft = ft

    def __call__(self):
        self.calls += 1
        if self.ft is not None:
            self.ft.now += self.cost
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return "ok"


def run(fn, budget, ft, **kw):
    return retry.call(
        fn, what="step", budget=budget, clock=ft.clock, sleep=ft.sleep, **kw
    )


def test_succeeds_after_retries_and_reports_each():
    ft = FakeTime()
    events = []
    fn = Flaky(2)
    budget = RetryBudget(
        attempts=5, seconds=100, initial_delay=1, max_delay=10
    )
    assert run(fn, budget, ft, on_retry=events.append) == "ok"
    assert fn.calls == 3
    assert [e.attempt for e in events] == [1, 2]
    assert [e.delay for e in events] == [1, 2]
    assert ft.sleeps == [1, 2]
    assert isinstance(events[0].error, TransportError)
    assert events[0].what == "step"


def test_attempts_bound():
    ft = FakeTime()
    fn = Flaky(100)
    budget = RetryBudget(attempts=3, seconds=1000, initial_delay=0.1)
    with pytest.raises(RetryExhausted) as info:
        run(fn, budget, ft)
    assert fn.calls == 3
    assert info.value.attempts == 3
    assert isinstance(info.value.__cause__, TransportError)
    assert "3 attempts" in str(info.value)


def test_delay_doubles_up_to_max():
    ft = FakeTime()
    budget = RetryBudget(
        attempts=6, seconds=1000, initial_delay=1, max_delay=5
    )
    with pytest.raises(RetryExhausted):
        run(Flaky(100), budget, ft)
    assert ft.sleeps == [1, 2, 4, 5, 5]


def test_seconds_bound_never_sleeps_past_it():
    ft = FakeTime()
    fn = Flaky(100, cost=1.0, ft=ft)
    budget = RetryBudget(
        attempts=100, seconds=10, initial_delay=1, max_delay=2
    )
    with pytest.raises(RetryExhausted, match="10"):
        run(fn, budget, ft)
    assert ft.now - 1000.0 <= 10
    # Calls end at 1, 3, 6, 9 s; a 2 s wait and a fifth call would not
    # fit in the 10 s.
    assert fn.calls == 4
    assert ft.sleeps == [1, 2, 2]


def test_absolute_deadline():
    ft = FakeTime()
    fn = Flaky(100, cost=0.5, ft=ft)
    budget = RetryBudget(
        attempts=100, seconds=1000, initial_delay=1, max_delay=1
    )
    with pytest.raises(RetryExhausted, match="deadline") as info:
        run(fn, budget, ft, deadline=1003.0)
    # Calls end at 1000.5 and 1002; a third could start only at the
    # deadline.
    assert ft.now == 1002.0
    assert info.value.attempts == fn.calls == 2


def test_deadline_already_past_still_tries_once():
    ft = FakeTime()
    fn = Flaky(0)
    budget = RetryBudget(attempts=3, seconds=10)
    assert run(fn, budget, ft, deadline=900.0) == "ok"
    fn = Flaky(5)
    with pytest.raises(RetryExhausted):
        run(fn, budget, ft, deadline=900.0)
    assert fn.calls == 1


def test_other_errors_are_not_retried():
    ft = FakeTime()
    fn = Flaky(1, error=ProtocolError)
    with pytest.raises(ProtocolError):
        run(fn, RetryBudget(attempts=5, seconds=100), ft)
    assert fn.calls == 1
    assert ft.sleeps == []


def test_real_sleep_tiny_delays():
    fn = Flaky(2)
    budget = RetryBudget(
        attempts=3, seconds=5, initial_delay=0.001, max_delay=0.002
    )
    assert retry.call(fn, what="tiny", budget=budget) == "ok"
    assert fn.calls == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(attempts=0, seconds=1),
        dict(attempts=1, seconds=-1),
        dict(attempts=1, seconds=1, initial_delay=-0.1),
    ],
)
def test_budget_validation(kwargs):
    with pytest.raises(ValueError):
        RetryBudget(**kwargs)


@pytest.mark.parametrize(
    "step,attempts,seconds",
    [
        (
            retry.Step.CONNECT,
            "connect_retry_attempts",
            "connect_retry_timeout",
        ),
        (
            retry.Step.TRANSFER,
            "transfer_retry_attempts",
            "transfer_retry_timeout",
        ),
        (
            retry.Step.COMMIT_QUERY,
            "commit_query_attempts",
            "commit_query_timeout",
        ),
    ],
)
def test_budget_from_conf(step, attempts, seconds):
    conf = cfg.ConfigOpts()
    xen_ncm.register_opts(conf)
    conf([])
    conf.set_override(attempts, 7, group="xen_ncm")
    conf.set_override(seconds, 42.0, group="xen_ncm")
    conf.set_override("retry_initial_delay", 0.25, group="xen_ncm")
    budget = RetryBudget.from_conf(conf, step)
    assert budget == RetryBudget(
        attempts=7,
        seconds=42.0,
        initial_delay=0.25,
        max_delay=conf.xen_ncm.retry_max_delay,
    )


@pytest.mark.parametrize(
    "transfer,downtime,stopping,expected",
    [
        (120.0, 30.0, False, 120.0),
        (120.0, 30.0, True, 30.0),
        (10.0, 30.0, True, 10.0),
    ],
)
def test_resume_wait_is_one_figure_for_both_ends(
    transfer, downtime, stopping, expected
):
    conf = cfg.ConfigOpts()
    xen_ncm.register_opts(conf)
    conf([])
    conf.set_override("transfer_retry_timeout", transfer, group="xen_ncm")
    conf.set_override("downtime_budget", downtime, group="xen_ncm")
    assert retry.resume_wait(conf.xen_ncm, stopping=stopping) == expected

"""Settling the migrations a source engine left in flight when it died.

A restarted source (``nova-xen-ncm recover``, the compute service's
start) reads its journal (:mod:`nova_xen_ncm.engine.journal`) and settles
each entry by the rule of architecture.rst section 5, never leaving two
running copies:

- stopped before the commit decision (PRECOPY, STOP_AND_COPY, RESTORE,
  ROLLBACK): the destination never got COMMIT, so it never runs the
  guest (it destroys its copy when the source goes silent). The source
  copy is rolled back: throttle lifted, backends resumed, log-dirty off,
  and unpaused if it ran before. Outcome FAILED.
- stopped after it (COMMIT, IN_DOUBT): the destination is asked the
  commit query. It runs the guest: the source copy is destroyed
  (outcome DONE). It rolled back: the source copy is rolled back
  (FAILED). No answer within the commit query budget: the guest stays
  paused here and the entry stays for a later attempt (IN_DOUBT).
- CLEANUP: the destination had acknowledged; the source copy is
  destroyed (DONE).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine import protocol
from nova_xen_ncm.engine import retry
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.errors import ProtocolError
from nova_xen_ncm.engine.errors import TransportError
from nova_xen_ncm.engine.journal import Entry
from nova_xen_ncm.engine.journal import Journal
from nova_xen_ncm.engine.state import TERMINAL
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.engine.transport import Channel
from nova_xen_ncm.host import base

LOG = logging.getLogger(__name__)

_BEFORE_COMMIT = frozenset(
    {
        Phase.SETUP,
        Phase.PRECOPY,
        Phase.STOP_AND_COPY,
        Phase.RESTORE,
        Phase.ROLLBACK,
    }
)
_ASK = frozenset({Phase.COMMIT, Phase.IN_DOUBT})
# Destination phases in which it runs the guest (the receiver's).
_DESTINATION_RUNS = frozenset({Phase.CLEANUP.value, Phase.DONE.value})
_DESTINATION_ROLLED_BACK = frozenset(
    {Phase.FAILED.value, Phase.CANCELLED.value}
)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one journalled migration was settled.

    ``phase`` is DONE (the guest runs on the destination, the source copy
    is gone), FAILED (it runs here again) or IN_DOUBT (paused here; the
    destination could not be asked).
    """

    migration_id: str
    domid: int
    journalled: Phase
    phase: Phase
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {
            "migration_id": self.migration_id,
            "domid": self.domid,
            "journalled": self.journalled.value,
            "phase": self.phase.value,
            "reason": self.reason,
        }


class _NotYetKnown(TransportError):
    """The destination has not decided yet: ask again."""


def query_destination(entry: Entry, conf: cfg.ConfigOpts) -> protocol.Status:
    """Ask the destination of ``entry`` once where its migration stands;
    raises :class:`TransportError` while it cannot tell."""
    opts = conf.xen_ncm
    channel = Channel.connect(
        entry.host,
        entry.port,
        connect_timeout=opts.connect_timeout,
        io_timeout=opts.io_timeout,
        max_data=opts.max_frame_bytes,
    )
    try:
        channel.client_handshake(entry.migration_id, entry.token_bytes)
        channel.send(protocol.Query())
        status = channel.receive()
    finally:
        channel.close()
    if not isinstance(status, protocol.Status):
        raise ProtocolError(f"expected STATUS, got {type(status).__name__}")
    if not status.committed and status.phase not in {
        p.value for p in TERMINAL
    }:
        raise _NotYetKnown(f"destination is in phase {status.phase}")
    return status


def recover(
    host: base.HostDriver,
    journal: Journal,
    conf: cfg.ConfigOpts | None = None,
    *,
    query: Callable[[Entry, cfg.ConfigOpts], protocol.Status] | None = None,
) -> list[Outcome]:
    """Settle every migration of ``journal`` whose guest is on ``host``."""
    if conf is None:
        from nova_xen_ncm.conf import CONF as conf
    ask = query or query_destination
    outcomes = []
    for entry in journal.entries():
        outcome = _settle(host, journal, conf, entry, ask)
        LOG.warning(
            "Recovered migration %s of domain %d (journalled in %s): %s: %s",
            outcome.migration_id,
            outcome.domid,
            outcome.journalled,
            outcome.phase,
            outcome.reason,
        )
        outcomes.append(outcome)
    return outcomes


def _settle(
    host: base.HostDriver,
    journal: Journal,
    conf: cfg.ConfigOpts,
    entry: Entry,
    ask: Callable[[Entry, cfg.ConfigOpts], protocol.Status],
) -> Outcome:
    journalled = Phase(entry.phase)

    def done(phase: Phase, reason: str) -> Outcome:
        if phase is Phase.IN_DOUBT:
            entry.phase = Phase.IN_DOUBT.value
            journal.write(entry)
        else:
            journal.remove(entry.migration_id)
        return Outcome(
            entry.migration_id, entry.domid, journalled, phase, reason
        )

    def rolled_back(what: str) -> Outcome:
        try:
            why = _roll_back(host, entry)
        except EngineError as exc:
            # Kept for another attempt: the guest may still be paused.
            return done(Phase.IN_DOUBT, str(exc))
        return done(Phase.FAILED, f"{what}; {why}")

    if journalled in _BEFORE_COMMIT:
        return rolled_back(
            f"stopped in {journalled} before the commit decision"
        )
    if journalled is Phase.CLEANUP:
        return done(Phase.DONE, _destroy(host, entry, "acknowledged"))
    if journalled not in _ASK:
        # DONE, FAILED, CANCELLED are never journalled: a foreign file.
        return done(
            Phase.IN_DOUBT,
            f"journalled in {journalled}, which recovery does not settle",
        )
    budget = retry.RetryBudget.from_conf(conf, retry.Step.COMMIT_QUERY)
    try:
        status = retry.call(
            lambda: ask(entry, conf),
            what=f"commit query of migration {entry.migration_id}",
            budget=budget,
        )
    except EngineError as exc:
        return done(
            Phase.IN_DOUBT,
            f"the destination could not be asked ({exc}); the guest stays "
            "paused here",
        )
    if status.committed or status.phase in _DESTINATION_RUNS:
        return done(
            Phase.DONE,
            _destroy(host, entry, f"the destination is in {status.phase}"),
        )
    if status.phase in _DESTINATION_ROLLED_BACK:
        return rolled_back(f"the destination rolled back ({status.phase})")
    return done(
        Phase.IN_DOUBT,
        f"the destination is in {status.phase} and does not run the "
        "guest; the guest stays paused here",
    )


def _destroy(host: base.HostDriver, entry: Entry, why: str) -> str:
    try:
        host.destroy_domain(entry.domid)
    except base.DomainNotFound:
        return f"{why}; the source copy was already gone"
    return f"{why}; the source copy was destroyed"


def _roll_back(host: base.HostDriver, entry: Entry) -> str:
    """Undo what the migration did to the source copy: it runs again if
    it ran before."""
    try:
        info = host.domain_info(entry.domid)
    except base.DomainNotFound:
        return f"domain {entry.domid} is no longer on {host.hostname}"
    failures = []
    steps: list[tuple[str, Callable[[], None]]] = [
        ("lift the throttle", lambda: host.set_vcpu_throttle(entry.domid, 1)),
        ("stop log-dirty", lambda: host.disable_log_dirty(entry.domid)),
    ]
    if info.pv_drivers:
        steps.append(
            ("resume backends", lambda: host.resume_backends(entry.domid))
        )
    if entry.running and info.state == base.DomainState.PAUSED:
        steps.append(("unpause", lambda: host.unpause(entry.domid)))
    for what, step in steps:
        try:
            step()
        except base.HostError as exc:
            failures.append(f"could not {what}: {exc}")
    if failures:
        raise EngineError(
            f"rolling back domain {entry.domid}: {'; '.join(failures)}"
        )
    state = host.domain_info(entry.domid).state.value
    return f"the source copy was rolled back ({state})"

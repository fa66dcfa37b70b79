"""Settling the migrations an engine left in flight when it died.

A restarted engine (``nova-xen-ncm recover``, the compute service's
start) reads its journals (:mod:`nova_xen_ncm.engine.journal`). An entry
whose lock is held belongs to a live migration and is left alone. Before
any action on a guest, the entry's host boot id and guest uuid are
checked: after a reboot, or once the domid belongs to another guest,
nothing is done to the domain that now holds it.

Source entries are settled by the rule of architecture.rst section 5,
never leaving two running copies:

- stopped before the commit decision (PRECOPY, STOP_AND_COPY, RESTORE,
  ROLLBACK): the destination never got COMMIT, so it never runs the
  guest (it destroys its copy when the source goes silent). The source
  copy is rolled back: throttle lifted, backends resumed, log-dirty off,
  and unpaused if it ran before. Outcome FAILED. Past the pause it
  resumes only once the destination confirmed its copy is gone, or its
  lease ran out (the live sender's fence).
  After a reboot of this host STOP_AND_COPY and RESTORE say less: the
  COMMIT record is appended before COMMIT goes and synced while it
  travels, and only the host's crash loses such an append. The copy
  here went with that crash, so nothing resumes; the destination is
  asked (until its final answer or its lease) whether it runs the
  guest: DONE if it does, FAILED (the guest runs nowhere) if it
  destroyed its copy, IN_DOUBT without an answer.
  On the same boot, one the journal marked (:meth:`Journal.mark`, on
  tmpfs, written before COMMIT went) lost its COMMIT record: its sync
  failed and the page cache dropped the line. It is settled the same
  way, the copy here destroyed (DONE) or rolled back (FAILED) on the
  destination's answer, and kept paused (IN_DOUBT) without one: the
  lease alone never resumes it.
- stopped after it (COMMIT, IN_DOUBT): the destination is asked the
  commit query (commit.py, the sender's own). It runs the guest: the
  source copy is destroyed (DONE). It never unpaused it: the source copy
  is rolled back (FAILED). No answer, or the destination itself cannot
  tell: the guest stays paused here and the entry stays (IN_DOUBT) until
  a later attempt, or until an operator who looked marks it resolved
  (:func:`resolve`).
- CLEANUP: the destination had acknowledged; the source copy is
  destroyed (DONE).

Destination entries (:func:`recover_incoming`): a copy that never got
COMMIT is destroyed (the source rolls back without it); one that got
COMMIT runs if it was unpaused, else the commit is completed (the source
decided it). The entry then stays, with its answer, for the source to
ask (:func:`answer_incoming`) until it acknowledges.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence

from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine import commit
from nova_xen_ncm.engine import messages
from nova_xen_ncm.engine import retry
from nova_xen_ncm.engine.acceptor import Acceptor
from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.journal import FORGET_WAIT
from nova_xen_ncm.engine.journal import Entry
from nova_xen_ncm.engine.journal import Hold
from nova_xen_ncm.engine.journal import Journal
from nova_xen_ncm.engine.journal import JournalError
from nova_xen_ncm.engine.state import Phase
from nova_xen_ncm.engine.transport import Listener
from nova_xen_ncm.engine.transport import tls_context
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
# Past the pause the destination may hold the whole guest, backends
# connected: the source copy resumes once that one is gone (fencing).
_PAST_PAUSE = frozenset({Phase.STOP_AND_COPY, Phase.RESTORE, Phase.ROLLBACK})
# The source's last synced records before its COMMIT, which is synced
# only while COMMIT travels: after this host's crash COMMIT may have
# gone on either.
_COMMIT_MAY_FOLLOW = frozenset({Phase.STOP_AND_COPY, Phase.RESTORE})
# Seconds between two looks at whether an answered entry was resolved.
ANSWER_POLL = 1.0
# Destination phases that are its final answer.
_SETTLED_HERE = frozenset(
    {Phase.DONE, Phase.FAILED, Phase.CANCELLED, Phase.IN_DOUBT}
)
# Destination phases in which it may have sent READY (the source may
# ask), from STOP_AND_COPY, whose record covers RESTORE's: the source is
# past its pause then, and it asks before its copy resumes.
_MAY_BE_ASKED = frozenset(
    {
        Phase.STOP_AND_COPY,
        Phase.RESTORE,
        Phase.ROLLBACK,
        Phase.COMMIT,
        Phase.CLEANUP,
        Phase.DONE,
        Phase.IN_DOUBT,
        Phase.FAILED,
        Phase.CANCELLED,
    }
)

Query = Callable[[Entry, cfg.ConfigOpts], messages.Status]

#: Where a settled migration's guest runs (Outcome.guest).
SOURCE = "source"
DESTINATION = "destination"
NOWHERE = "nowhere"
#: IN_DOUBT with the copy here gone (this host rebooted): the guest runs
#: on the destination or on no host, which only the destination knows.
ELSEWHERE = "destination or nowhere"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one journalled migration was settled.

    ``phase`` is DONE (the guest runs on the destination, the source copy
    is gone), FAILED (it runs here again) or IN_DOUBT (paused here, or
    its copy here gone; the destination could not say). ``skipped``: a
    live engine holds the entry and nothing was done (``phase`` is the
    journalled one).
    ``guest`` says where the guest runs once settled: ``source``,
    ``destination``, ``nowhere`` (:attr:`lost`: the migration failed and
    the copy it would have run on again is gone, after a reboot or once
    its domid went to another guest; it must be started again from its
    disk), ``destination or nowhere`` (IN_DOUBT with the copy here gone:
    it must not be started before the destination was checked), or empty
    when that is not known.
    """

    migration_id: str
    domid: int
    journalled: Phase
    phase: Phase
    reason: str
    uuid: str = ""
    role: str = "source"
    skipped: bool = False
    guest: str = ""

    @property
    def in_doubt(self) -> bool:
        return not self.skipped and self.phase is Phase.IN_DOUBT

    @property
    def lost(self) -> bool:
        """The guest runs on neither host: an operator must start it."""
        return not self.skipped and self.guest == NOWHERE

    def as_dict(self) -> dict[str, object]:
        return {
            "migration_id": self.migration_id,
            "domid": self.domid,
            "uuid": self.uuid,
            "role": self.role,
            "journalled": self.journalled.value,
            "phase": self.phase.value,
            "skipped": self.skipped,
            "guest": self.guest,
            "reason": self.reason,
        }


def _coordinator(entry: Entry, conf: cfg.ConfigOpts) -> commit.CommitQuery:
    return commit.CommitQuery(
        conf,
        entry.endpoint,
        entry.migration_id,
        entry.token_bytes,
        entry.source_address or None,
    )


def recover(
    host: base.HostDriver,
    journal: Journal,
    conf: cfg.ConfigOpts | None = None,
    *,
    query: Query | None = None,
    others: Sequence[Journal] = (),
) -> list[Outcome]:
    """Settle every migration of the source ``journal`` whose guest is on
    ``host`` and whose engine is gone (and whose guest no engine
    migrates now, here or in ``others``)."""
    if conf is None:
        from nova_xen_ncm.conf import CONF as conf
    outcomes = []
    boot_id = host.boot_id()
    held = _held(journal, others)
    try:
        outcomes = _recover(host, boot_id, journal, conf, query, held)
    finally:
        for _, hold, _ in held:
            if hold is not None:
                hold.release()
    return outcomes


def _recover(
    host: base.HostDriver,
    boot_id: str,
    journal: Journal,
    conf: cfg.ConfigOpts,
    query: Query | None,
    held: list[tuple[Entry, Hold | None, str]],
) -> list[Outcome]:
    outcomes = []
    for listed, hold, why in held:
        if hold is None:
            outcome = Outcome(
                listed.migration_id,
                listed.domid,
                Phase(listed.phase),
                Phase(listed.phase),
                why,
                listed.uuid,
                skipped=True,
            )
        else:
            with hold:
                # Read again under the lock: the engine may have ended.
                entry = journal.read(listed.migration_id)
                if entry is None:
                    continue
                outcome = _settle(host, boot_id, journal, conf, entry, query)
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


def _guest(entry: Entry) -> str:
    return entry.uuid or f"domid {entry.domid}"


def _held(
    journal: Journal, others: Sequence[Journal] = ()
) -> list[tuple[Entry, Hold | None, str]]:
    """Each entry with its lock, or None and why it is left alone: its
    engine runs, or another migration of the same guest is live, in
    ``journal`` or ``others`` (a stale entry of a guest that a running
    engine now migrates again must not unpause or destroy it under that
    engine)."""
    taken: list[tuple[Entry, Hold | None, str]] = []
    live = set()
    for other in others:
        for listed in other.entries():
            hold = other.try_hold(listed.migration_id)
            if hold is None:
                live.add(_guest(listed))
            else:
                hold.release()
    try:
        for listed in journal.entries():
            hold = journal.try_hold(listed.migration_id)
            if hold is None:
                live.add(_guest(listed))
            taken.append(
                (
                    listed,
                    hold,
                    "a running engine holds this migration: left alone",
                )
            )
    except BaseException:
        for _, hold, _ in taken:
            if hold is not None:
                hold.release()
        raise
    result = []
    for listed, hold, why in taken:
        if hold is not None and _guest(listed) in live:
            hold.release()
            hold = None
            why = (
                f"another migration of guest {_guest(listed)} is running: "
                "left alone"
            )
        result.append((listed, hold, why))
    return result


def _conclude(
    journal: Journal,
    entry: Entry,
    journalled: Phase,
    phase: Phase,
    reason: str,
    *,
    keep: bool,
    role: str = "source",
    guest: str = "",
) -> Outcome:
    """The outcome of settling ``entry``, recorded: with ``keep`` the
    entry stays, rewritten in ``phase``; otherwise it goes. ``guest``:
    where the guest runs (Outcome.guest)."""
    if keep:
        entry.phase = phase.value
        journal.write(entry)
    else:
        journal.remove(entry.migration_id)
    return Outcome(
        entry.migration_id,
        entry.domid,
        journalled,
        phase,
        reason,
        entry.uuid,
        role=role,
        guest=guest,
    )


def _copy_here(
    host: base.HostDriver, boot_id: str, entry: Entry
) -> tuple[base.DomainInfo | None, str]:
    """The journalled guest's domain on ``host`` if it is still that
    guest, else None and why not."""
    if entry.boot_id and entry.boot_id != boot_id:
        return None, (
            f"{host.hostname} rebooted since (boot {entry.boot_id}): the "
            f"copy of domain {entry.domid} is gone and its domid means "
            "another guest now"
        )
    try:
        info = host.domain_info(entry.domid)
    except base.DomainNotFound:
        return None, f"domain {entry.domid} is no longer on {host.hostname}"
    if entry.uuid and info.uuid != entry.uuid:
        return None, (
            f"domain {entry.domid} is now guest {info.uuid}, not "
            f"{entry.uuid}: left alone"
        )
    return info, ""


def _settle(
    host: base.HostDriver,
    boot_id: str,
    journal: Journal,
    conf: cfg.ConfigOpts,
    entry: Entry,
    query: Query | None,
) -> Outcome:
    journalled = Phase(entry.phase)

    def done(phase: Phase, reason: str, guest: str = "") -> Outcome:
        # Kept only while nobody knows: recovery asks again.
        return _conclude(
            journal,
            entry,
            journalled,
            phase,
            reason,
            keep=phase is Phase.IN_DOUBT,
            guest=guest,
        )

    info, gone = _copy_here(host, boot_id, entry)

    def rolled_back(what: str) -> Outcome:
        if info is None:
            # The destination never ran it and the copy that would run
            # again here is gone: failed, and not running anywhere.
            LOG.error(
                "Migration %s: guest %s runs nowhere: %s; %s. Start it "
                "again from its disk.",
                entry.migration_id,
                _guest(entry),
                what,
                gone,
            )
            return done(
                Phase.FAILED,
                f"the guest runs nowhere: {what}; {gone}; start it again "
                "from its disk",
                NOWHERE,
            )
        try:
            why = _roll_back(host, entry, info)
        except EngineError as exc:
            # Kept for another attempt: the guest may still be paused.
            return done(Phase.IN_DOUBT, str(exc))
        return done(Phase.FAILED, f"{what}; {why}", SOURCE)

    def destroyed(what: str) -> Outcome:
        if info is None:
            return done(Phase.DONE, f"{what}; {gone}", DESTINATION)
        return done(Phase.DONE, _destroy(host, entry, what), DESTINATION)

    if (
        journalled in _COMMIT_MAY_FOLLOW
        and info is None
        and entry.boot_id
        and entry.boot_id != boot_id
    ):
        return _after_reboot(entry, conf, query, gone, done, destroyed)
    if journalled in _COMMIT_MAY_FOLLOW and journal.marked(
        entry.migration_id, boot_id
    ):
        # Marked before COMMIT went, and its record not read back: its
        # sync failed and the page cache dropped it. The destination
        # alone says; no lease lets the copy here resume.
        runs_there, said = _fence(entry, conf, query)
        if runs_there:
            outcome = destroyed(f"{said} (COMMIT went, its record lost)")
        elif runs_there is False:
            outcome = rolled_back(
                f"COMMIT may have gone, its record lost; {said}"
            )
        else:
            return done(
                Phase.IN_DOUBT,
                f"COMMIT may have gone (its record lost: its sync failed) "
                f"and {said}: the guest may run on the destination, "
                + (
                    "the guest stays paused here"
                    if info is not None
                    else f"{gone}; check the destination before starting "
                    "the guest again"
                ),
                "" if info is not None else ELSEWHERE,
            )
        if query is None and not outcome.in_doubt:
            # Recorded here (the entry is gone): the destination may
            # forget.
            _coordinator(entry, conf).acknowledge()
        return outcome
    if journalled in _BEFORE_COMMIT:
        what = f"stopped in {journalled} before the commit decision"
        if (
            journalled in _PAST_PAUSE
            and info is not None
            and info.state == base.DomainState.PAUSED
            and entry.running
        ):
            runs_there, fenced = _fence(entry, conf, query)
            if runs_there:
                return done(
                    Phase.IN_DOUBT,
                    "the destination says it runs the guest, though no "
                    "COMMIT was journalled here: the guest stays paused",
                )
            outcome = rolled_back(f"{what}; {fenced}")
            if runs_there is False and query is None and not outcome.in_doubt:
                # Recorded here (the entry is gone): the destination,
                # which confirmed its teardown, may forget.
                _coordinator(entry, conf).acknowledge()
            return outcome
        return rolled_back(what)
    if journalled is Phase.CLEANUP:
        return destroyed("the destination had acknowledged")
    if journalled not in _ASK:
        # DONE, FAILED, CANCELLED are never journalled: a foreign file.
        return done(
            Phase.IN_DOUBT,
            f"journalled in {journalled}, which recovery does not settle",
        )
    coordinator = _coordinator(entry, conf)
    if query is None:
        verdict = coordinator.ask()
    else:
        budget = retry.RetryBudget.from_conf(conf, retry.Step.COMMIT_QUERY)
        try:
            verdict = commit.verdict_of(
                retry.call(
                    lambda: query(entry, conf),
                    what=f"commit query of migration {entry.migration_id}",
                    budget=budget,
                )
            )
        except EngineError as exc:
            verdict = commit.Verdict(
                None, f"the destination could not be asked ({exc})"
            )
    if verdict.runs_there:
        outcome = destroyed(verdict.reason)
    elif verdict.runs_there is False:
        outcome = rolled_back(verdict.reason)
    elif info is None:
        # Nothing paused here to keep: the guest runs there or nowhere.
        return done(
            Phase.IN_DOUBT,
            f"{verdict.reason}; {gone}: check the destination before "
            "starting the guest again",
            ELSEWHERE,
        )
    else:
        return done(
            Phase.IN_DOUBT, f"{verdict.reason}; the guest stays paused here"
        )
    if query is None and outcome.phase is not Phase.IN_DOUBT:
        # Recorded here (the entry is gone): the destination may forget.
        coordinator.acknowledge()
    return outcome


def _after_reboot(
    entry: Entry,
    conf: cfg.ConfigOpts,
    query: Query | None,
    gone: str,
    done: Callable[..., Outcome],
    destroyed: Callable[[str], Outcome],
) -> Outcome:
    """A STOP_AND_COPY or RESTORE entry of a copy this host's reboot
    took: COMMIT may have gone with its record not yet synced. Nothing
    here can run again; the destination says where the guest is."""
    runs_there, said = _fence(entry, conf, query)
    if runs_there:
        outcome = destroyed(
            "the destination runs the guest (COMMIT went before this "
            "host's crash)"
        )
        if query is None:
            # Recorded here (the entry is gone): the destination may
            # forget.
            _coordinator(entry, conf).acknowledge()
        return outcome
    if runs_there is False:
        LOG.error(
            "Migration %s: guest %s runs nowhere: %s; %s. Start it again "
            "from its disk.",
            entry.migration_id,
            _guest(entry),
            said,
            gone,
        )
        outcome = done(
            Phase.FAILED,
            f"the guest runs nowhere: {said}; {gone}; start it again "
            "from its disk",
            NOWHERE,
        )
        if query is None:
            # Recorded here (the entry is gone): the destination may
            # forget.
            _coordinator(entry, conf).acknowledge()
        return outcome
    return done(
        Phase.IN_DOUBT,
        f"{gone}; COMMIT may have gone before the crash and {said}: "
        "the guest may run on the destination, check it before starting "
        "it again",
        ELSEWHERE,
    )


def _fence(
    entry: Entry, conf: cfg.ConfigOpts, query: Query | None
) -> tuple[bool | None, str]:
    """Before a copy paused for stop-and-copy resumes: until the
    destination says its copy is gone, or for its lease (counted from
    now, the engine's death being of unknown time), as the live sender
    does. Whether the guest runs there (True), never ran there and its
    copy is gone (False), or no answer came within the lease (None),
    and what was learnt."""
    if query is None:
        coordinator = _coordinator(entry, conf)

        def ask() -> messages.Status:
            return coordinator.once()
    else:

        def ask() -> messages.Status:
            return query(entry, conf)

    lease = commit.lease(conf)
    deadline = time.monotonic() + lease
    while True:
        try:
            status = ask()
        except EngineError as exc:
            LOG.debug("Teardown query of %s: %s", entry.migration_id, exc)
        else:
            if status.phase in commit.NEVER_RAN:
                # Acknowledged by the caller once the outcome is
                # recorded: a crash before that finds the answer kept.
                return False, "the destination confirmed its copy is gone"
            if status.committed or status.phase in commit.RUNS_THERE:
                return True, "the destination runs the guest"
        left = deadline - time.monotonic()
        if left <= 0:
            return None, (
                f"the destination's lease ({lease:g}s) ran out without its "
                "confirmation"
            )
        time.sleep(min(conf.xen_ncm.retry_max_delay, left))


def _destroy(host: base.HostDriver, entry: Entry, why: str) -> str:
    try:
        host.destroy_domain(entry.domid)
    except base.DomainNotFound:
        return f"{why}; the source copy was already gone"
    return f"{why}; the source copy was destroyed"


def _roll_back(
    host: base.HostDriver, entry: Entry, info: base.DomainInfo
) -> str:
    """Undo what the migration did to the source copy: it runs again if
    it ran before."""
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


def resolve(journal: Journal, migration_id: str) -> Entry:
    """Forget the entry of ``migration_id`` after an operator settled its
    guest by hand (an IN_DOUBT migration); refused while an engine holds
    it. Returns the entry forgotten."""
    hold = journal.try_hold(migration_id)
    if hold is None:
        raise JournalError(
            f"migration {migration_id} is running: nothing to resolve"
        )
    with hold:
        entry = journal.read(migration_id)
        if entry is None:
            raise JournalError(
                f"no migration {migration_id} in {journal.path}"
            )
        journal.remove(migration_id)
    LOG.warning(
        "Migration %s of domain %d (journalled in %s) marked resolved by "
        "an operator",
        migration_id,
        entry.domid,
        entry.phase,
    )
    return entry


# -- the destination's side -----------------------------------------------


def recover_incoming(
    host: base.HostDriver,
    journal: Journal,
    others: Sequence[Journal] = (),
) -> list[Outcome]:
    """Settle the destination ``journal``: whatever a dead engine left
    half done, so that its answer to the commit query holds."""
    held = _held(journal, others)
    try:
        return _recover_incoming(host, journal, held)
    finally:
        for _, hold, _ in held:
            if hold is not None:
                hold.release()


def _recover_incoming(
    host: base.HostDriver,
    journal: Journal,
    held: list[tuple[Entry, Hold | None, str]],
) -> list[Outcome]:
    outcomes = []
    boot_id = host.boot_id()
    for listed, hold, why in held:
        if hold is None:
            outcomes.append(
                Outcome(
                    listed.migration_id,
                    listed.domid,
                    Phase(listed.phase),
                    Phase(listed.phase),
                    why,
                    listed.uuid,
                    role="destination",
                    skipped=True,
                )
            )
            continue
        with hold:
            entry = journal.read(listed.migration_id)
            if entry is None:
                continue
            outcome = _settle_incoming(host, boot_id, journal, entry)
        LOG.warning(
            "Recovered incoming migration %s of domain %d (journalled in "
            "%s): %s: %s",
            outcome.migration_id,
            outcome.domid,
            outcome.journalled,
            outcome.phase,
            outcome.reason,
        )
        outcomes.append(outcome)
    return outcomes


def _settle_incoming(
    host: base.HostDriver, boot_id: str, journal: Journal, entry: Entry
) -> Outcome:
    journalled = Phase(entry.phase)
    info, gone = _copy_here(host, boot_id, entry)

    def settled(phase: Phase, reason: str, guest: str = "") -> Outcome:
        # The source may ask: the answer is kept until it acknowledges.
        return _conclude(
            journal,
            entry,
            journalled,
            phase,
            reason,
            keep=journalled in _MAY_BE_ASKED,
            role="destination",
            guest=guest,
        )

    if journalled in (Phase.CLEANUP, Phase.DONE):
        if entry.boot_id and entry.boot_id != boot_id:
            # The answer stands (the source must not run its copy: the
            # guest ran on here), but the reboot ended the guest.
            LOG.error(
                "Migration %s: guest %s ran here after COMMIT and %s: it "
                "runs nowhere now. Start it again from its disk.",
                entry.migration_id,
                _guest(entry),
                gone,
            )
            return settled(
                Phase.DONE,
                f"the guest ran here after COMMIT, but {gone}: it runs "
                "nowhere now; start it again from its disk",
                NOWHERE,
            )
        return settled(
            Phase.DONE, "the guest ran here after COMMIT", DESTINATION
        )
    if journalled in (Phase.FAILED, Phase.CANCELLED, Phase.IN_DOUBT):
        # Settled before (by the engine's rollback or an earlier
        # recovery): the entry only keeps the answer. A domain of this
        # guest here now is a later migration's (domid and uuid travel
        # with the guest), never touched.
        return settled(journalled, f"kept from the migration ({journalled})")
    if journalled is Phase.COMMIT:
        if info is None:
            return settled(
                Phase.IN_DOUBT,
                f"COMMIT was received, but {gone}: whether the guest ran "
                "here cannot be told",
            )
        if info.state == base.DomainState.PAUSED and entry.running:
            try:
                host.unpause(entry.domid)
            except base.HostError as exc:
                return settled(
                    Phase.IN_DOUBT, f"COMMIT received, unpause failed: {exc}"
                )
        return settled(
            Phase.DONE, "COMMIT was received: the guest runs here", DESTINATION
        )
    # Before COMMIT: the source rolls back (or did); the copy goes.
    if info is None:
        return settled(Phase.FAILED, f"no COMMIT received; {gone}")
    if info.state != base.DomainState.PAUSED:
        # Without COMMIT this side never unpaused its copy: a running
        # domain of this guest is another migration's, and runs on.
        return settled(
            Phase.FAILED,
            f"no COMMIT received; domain {entry.domid} runs, so it is "
            "not the copy of this migration: left alone",
        )
    _destroy_copy(host, entry)
    return settled(
        Phase.FAILED, "no COMMIT received: the copy here was destroyed"
    )


def _destroy_copy(host: base.HostDriver, entry: Entry) -> None:
    try:
        host.destroy_domain(entry.domid)
    except base.DomainNotFound:
        pass


def answer_incoming(
    journal: Journal, conf: cfg.ConfigOpts, seconds: float | None = None
) -> list[str]:
    """Answer the commit queries of the destination ``journal``'s
    entries, each on its journalled port, until its source acknowledges
    or an operator resolves it (its entry is gone), for at most
    ``seconds`` when given; the migrations acknowledged.

    The entries are settled (:func:`recover_incoming`): nothing here
    acts on a guest, so they are not held while answered, and
    :func:`resolve` ends the answers. The source's acknowledgement
    removes an entry under its lock (:meth:`Journal.forget_locked`): a
    recovery settling it at that moment cannot write it back."""
    finished: list[str] = []
    threads = []
    until = None if seconds is None else time.monotonic() + seconds
    opts = conf.xen_ncm
    for entry in journal.entries():
        if Phase(entry.phase) not in _SETTLED_HERE:
            # Not settled yet (recovery did not run, or an engine holds
            # it): its answer is not final.
            continue
        try:
            listener = Listener(
                opts.listen_address,
                entry.port,
                entry.port,
                allowed_sources=opts.allowed_sources,
                tls=tls_context(conf, server=True),
                handshake_timeout=opts.connect_timeout,
            )
        except EngineError as exc:
            LOG.error(
                "Migration %s: cannot answer commit queries: %s",
                entry.migration_id,
                exc,
            )
            continue
        status = messages.Status(
            phase=entry.phase, committed=entry.phase in commit.RUNS_THERE
        )

        def forget(mid: str = entry.migration_id) -> None:
            # Unheld while answered: under its lock, or a recovery
            # settling it now would write it back after it went.
            if journal.forget_locked(mid, FORGET_WAIT):
                finished.append(mid)

        acceptor = Acceptor(
            listener,
            entry.migration_id,
            entry.token_bytes,
            conf,
            status=lambda status=status: status,
            on_finished=forget,
            source=False,
        )

        def serve(
            acceptor=acceptor, listener=listener, mid=entry.migration_id
        ) -> None:
            try:
                while until is None or time.monotonic() < until:
                    wait = ANSWER_POLL
                    if until is not None:
                        wait = min(wait, max(0.0, until - time.monotonic()))
                    if acceptor.finished.wait(wait):
                        return
                    if journal.read(mid) is None:
                        return
            except EngineError as exc:
                LOG.error("Migration %s: %s", mid, exc)
            finally:
                acceptor.close()
                listener.close()

        thread = threading.Thread(
            target=serve,
            name=f"migration-{entry.migration_id}-answers",
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return finished

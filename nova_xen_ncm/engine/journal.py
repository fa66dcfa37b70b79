"""The journals of the migrations a host has in flight, on either side.

A source engine that dies (a crash, SIGKILL, a host reboot of dom0's
toolstack) leaves its guest in whatever state the migration had put it:
paused, throttled, backends quiesced, log-dirty on, and possibly a COMMIT
on the wire. The source journal keeps what a restarted engine needs to
settle each such migration (:mod:`nova_xen_ncm.engine.recovery`): the
guest (domid, uuid, and the boot of the host it ran on), the destination
and its one-time token (to ask it the commit query), whether the guest
ran before, and the phase, the commit decision included.

The destination journal keeps its side's outcome (whether it unpaused
the guest) until the source acknowledged it, so that a source restarted
after any delay learns it, and a restarted destination still answers.

One file per migration under ``<[xen_ncm] state_path>/migrations``
(source) or ``.../incoming`` (destination): a log of the entry's
versions, one line each (CRC-32 of the JSON, the JSON), appended and
made durable by one ``fdatasync``; the last whole line with a right
CRC is the entry (an append a crash cut short is a line without its
newline or with a wrong CRC, and the version before it stands). Its
first write also syncs the directory (the file's name is durable then).
Writing it is part of each phase transition (the state machine's
``journal`` hook): a write that fails stops the transition
before the side effect it covers.

Only what a side effect needs is synced while the guest is paused
(:class:`Record`'s ``lazy`` and ``background``: those versions are
written by a thread of the record's, in order, since on a busy host even
an append may wait for the file system's journal). The source's
STOP_AND_COPY is durable before the pause and covers its RESTORE
(recovery treats the two alike); COMMIT is appended before the COMMIT
message goes and synced by the record's thread while COMMIT travels
(``sync_behind``): a restarted engine of the same host reads it (the
kernel keeps an append past the process that made it), so one that
finds no COMMIT knows COMMIT never went; only the host's own crash can
lose it before its sync, and that crash ends the source copy too, so
nothing is resumed on its word (recovery asks the destination whether
it runs the guest). A failed sync of it is not left at that (a failed
writeback leaves the pages clean, not on disk, and the page cache may
drop them): it is written again with its own sync. Should the page be
dropped all the same, the mark says it: before the append the record
writes ``<id>.sent`` (the boot id) under ``[xen_ncm] runtime_path``, a
tmpfs, which has no writeback to fail, outlives the engine and goes with
the boot (:meth:`Journal.mark`); a recovery of the same boot that finds
it with a STOP_AND_COPY or RESTORE entry asks the destination and never
resumes on the lease alone. It goes with the entry. The destination's
STOP_AND_COPY,
entered on the source's STOPPING (or on the stopped guest's first
record), is synced in the background while the guest is paused and the
last pages arrive, and is durable before READY goes: from it on a
restarted destination keeps its answer for the source, so it covers
RESTORE too; COMMIT is durable before the guest is
unpaused there, and CLEANUP (which only says the unpause happened, as
the running guest does to a recovery after the engine's restart; after
the host's reboot a COMMIT entry without it is answered IN_DOUBT) is
synced while COMMITTED goes.

The engine holds an exclusive lock (``flock``) on ``<id>.lock`` for
the migration's life; recovery skips an entry whose lock is held, so it
never acts on a live migration. The files hold a token, so the
directories are private to the service's user.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import threading
import time
import zlib
from collections.abc import Mapping
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from nova_xen_ncm.engine.errors import EngineError
from nova_xen_ncm.engine.state import Phase

LOG = logging.getLogger(__name__)

VERSION = 2
SUBDIR = "migrations"
INCOMING = "incoming"
SUFFIX = ".json"
LOCK_SUFFIX = ".lock"
MARK_SUFFIX = ".sent"
# What the check before a migration writes and removes (never read).
PROBE_SUFFIX = ".probe"
# [xen_ncm] runtime_path's default: a tmpfs, emptied by a reboot.
RUNTIME_PATH = "/run/nova-xen-ncm"
# Seconds an unheld entry's removal waits for a recovery that holds it
# (a recovery settles an entry in well under a second).
FORGET_WAIT = 5.0
# Migration ids become file names: nothing that could leave the directory.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# The migration is over on this side.
_SETTLED = frozenset({Phase.DONE, Phase.FAILED, Phase.CANCELLED})
# Transitions whose journal write must succeed: the side effect they
# cover (log-dirty, pause, COMMIT, unpause) must not run unrecorded. The
# others go on, the failure logged: ROLLBACK and IN_DOUBT undo or stop,
# and CLEANUP follows an outcome already known on both sides (a restart
# that finds COMMIT journalled asks again and learns the same).
_MUST_RECORD = frozenset(
    {
        Phase.PRECOPY,
        Phase.STOP_AND_COPY,
        Phase.RESTORE,
        Phase.COMMIT,
    }
)


class JournalError(EngineError):
    """The journal cannot be read or written."""


def _check_common(entry: Any, where: str) -> None:
    try:
        Phase(entry.phase)
        bytes.fromhex(entry.token)
    except (TypeError, ValueError) as exc:
        raise JournalError(f"{where}: {exc}") from None
    for name in ("domid", "port"):
        if not isinstance(getattr(entry, name), int):
            raise JournalError(f"{where}: {name} must be an integer")


@dataclasses.dataclass
class Entry:
    """One source migration in flight."""

    migration_id: str
    domid: int
    #: The destination's endpoint, for the commit query.
    host: str
    port: int
    #: The one-time migration token (hex), which authenticates the query.
    token: str
    #: Whether the guest ran before the migration paused it.
    running: bool
    #: The guest's uuid: a domid is reused after the guest is gone.
    uuid: str = ""
    #: The source host's boot id: domids restart after a reboot.
    boot_id: str = ""
    #: The address the source connects from (the one it announced), for
    #: the commit query; empty: any.
    source_address: str = ""
    #: The phase the source last entered (a :class:`Phase` value).
    phase: str = Phase.SETUP.value
    #: Wall-clock time of the last update.
    updated: float = 0.0

    @property
    def token_bytes(self) -> bytes:
        return bytes.fromhex(self.token)

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.host, self.port

    def to_dict(self) -> dict[str, Any]:
        return {"version": VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Any:
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise JournalError(
                f"{where}: not a version {VERSION} journal entry"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        # A field added later has a default: older entries still read.
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
        }
        missing = sorted(required - set(values))
        if missing:
            raise JournalError(f"{where}: missing {', '.join(missing)}")
        entry = cls(**values)
        _check_common(entry, where)
        return entry


@dataclasses.dataclass
class IncomingEntry(Entry):
    """One destination migration whose outcome the source may not know.

    ``host`` is the address the destination listened on and ``port`` its
    port: a restarted destination answers the commit query there.
    """


class Hold:
    """The engine's exclusive lock on one journal entry."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Journal:
    """The journal kept under ``state_path`` (``subdir``: which side)."""

    def __init__(
        self,
        state_path: str,
        subdir: str = SUBDIR,
        entry_type: type[Entry] = Entry,
        runtime_path: str | None = None,
    ) -> None:
        self.path = os.path.join(state_path, subdir)
        self.entry_type = entry_type
        # The marks of this journal (one journal's per directory: two
        # state paths on a host never read each other's), created with
        # the first mark.
        key = hashlib.sha256(os.path.realpath(self.path).encode()).hexdigest()
        self.runtime = os.path.join(
            runtime_path or RUNTIME_PATH, f"{subdir}-{key[:16]}"
        )
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise JournalError(
                f"cannot create the journal directory {self.path}: {exc}"
            ) from exc

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> Journal:
        """The source journal under ``[xen_ncm] state_path``."""
        return cls(_state_path(conf), runtime_path=_runtime_path(conf))

    @classmethod
    def incoming_from_conf(cls, conf: cfg.ConfigOpts) -> Journal:
        """The destination journal under ``[xen_ncm] state_path``."""
        return cls(
            _state_path(conf),
            INCOMING,
            IncomingEntry,
            runtime_path=_runtime_path(conf),
        )

    def mark(self, migration_id: str, boot_id: str) -> None:
        """Say, until the entry goes, that a version of it was sent on
        before it was durable (the source's COMMIT): a file under the
        runtime directory (tmpfs: no writeback to fail, so it outlives
        the engine but not the host's boot), written, not synced."""
        path = self._mark_file(migration_id, MARK_SUFFIX)
        try:
            self._write_mark(path, boot_id.encode())
        except OSError as exc:
            raise JournalError(f"cannot write mark {path}: {exc}") from exc

    def check_marks(self, migration_id: str) -> None:
        """Create the runtime directory (0700) and write and remove a
        mark's stand-in, so that a migration whose COMMIT could not be
        marked is refused before it starts, not in its pause."""
        path = self._mark_file(migration_id, PROBE_SUFFIX)
        try:
            self._write_mark(path, b"")
            os.unlink(path)
        except OSError as exc:
            raise JournalError(
                f"[xen_ncm] runtime_path {os.path.dirname(self.runtime)}: "
                f"cannot write a COMMIT mark in {self.runtime}: {exc}; "
                "create the directory for the service's user (0700)"
            ) from exc

    def _write_mark(self, path: str, data: bytes) -> None:
        for directory in (os.path.dirname(self.runtime), self.runtime):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(
            path,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
            0o600,
        )
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
        finally:
            os.close(fd)

    def marked(self, migration_id: str, boot_id: str) -> bool:
        """Whether :meth:`mark` was called for the entry in this boot
        (``boot_id``, the host's now). Unreadable counts as marked: the
        mark only ever makes recovery more careful."""
        path = self._mark_file(migration_id, MARK_SUFFIX)
        try:
            with open(path, "rb") as f:
                written = f.read().decode(errors="replace")
        except FileNotFoundError:
            return False
        except OSError as exc:
            LOG.error("Mark %s unreadable, taken as set: %s", path, exc)
            return True
        # Not a tmpfs after all: a mark of another boot says nothing.
        return written in ("", boot_id)

    def _unmark(self, migration_id: str) -> None:
        path = self._mark_file(migration_id, MARK_SUFFIX)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            # Harmless once the entry is gone: only an entry is settled.
            LOG.warning("Mark %s not removed: %s", path, exc)

    def _mark_file(self, migration_id: str, suffix: str) -> str:
        return os.path.join(self.runtime, self._name(migration_id, suffix))

    def _file(self, migration_id: str, suffix: str = SUFFIX) -> str:
        return os.path.join(self.path, self._name(migration_id, suffix))

    @staticmethod
    def _name(migration_id: str, suffix: str) -> str:
        if not _ID.match(migration_id):
            raise JournalError(
                f"migration id {migration_id!r} cannot name a journal entry"
            )
        return migration_id + suffix

    def check_id(self, migration_id: str) -> None:
        """Raise unless ``migration_id`` can name an entry."""
        self._file(migration_id)

    def write(self, entry: Entry, *, sync: bool = True) -> None:
        """Append the entry's new version durably: one ``fdatasync``,
        and a directory sync when the file is new. Without ``sync`` the
        version is only appended (the next synced write of the same
        file makes it durable: a sync flushes the file, whichever
        descriptor wrote it) unless the file is new."""
        self.append(entry.migration_id, self.encode(entry), sync=sync)

    @staticmethod
    def encode(entry: Entry) -> bytes:
        """The line of the entry's new version (stamped now)."""
        entry.updated = time.time()
        data = json.dumps(entry.to_dict(), sort_keys=True).encode()
        return b"%08x %s\n" % (zlib.crc32(data), data)

    def sync(self, migration_id: str) -> None:
        """Make what was appended to the entry durable (one
        ``fdatasync``; a sync flushes the file, whichever descriptor
        wrote it)."""
        path = self._file(migration_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise JournalError(
                f"cannot sync journal entry {path}: {exc}"
            ) from exc

    def append(
        self, migration_id: str, line: bytes, *, sync: bool = True
    ) -> None:
        """Append a version's ``line`` (:meth:`encode`), as :meth:`write`."""
        path = self._file(migration_id)
        try:
            fd = os.open(
                path,
                os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                0o600,
            )
            try:
                size = os.fstat(fd).st_size
                new = size == 0
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    # A crash cut the last append short: end it, so that
                    # this version is a line of its own.
                    line = b"\n" + line
                    # Cut short before any version was whole: the name
                    # was never synced either.
                    new = b"\n" not in os.pread(fd, size, 0)
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, "short write")
                if sync or new:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            if new:
                self._sync_dir()
        except OSError as exc:
            raise JournalError(
                f"cannot write journal entry {path}: {exc}"
            ) from exc

    def remove(self, migration_id: str) -> None:
        path = self._file(migration_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise JournalError(
                f"cannot remove journal entry {path}: {exc}"
            ) from exc
        with contextlib.suppress(OSError):
            # Unlinked while held: a recovery that opened it before still
            # finds it locked, one that opens it after finds no entry.
            os.unlink(self._file(migration_id, LOCK_SUFFIX))
        # After the entry: a mark without its entry says nothing.
        self._unmark(migration_id)
        try:
            self._sync_dir()
        except OSError as exc:
            raise JournalError(f"cannot sync {self.path}: {exc}") from exc

    def _sync_dir(self) -> None:
        # The rename or unlink is durable only once the directory is.
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def hold(self, migration_id: str) -> Hold:
        """Lock the entry of ``migration_id`` for a migration's life;
        raises :class:`JournalError` if another holds it."""
        held = self.try_hold(migration_id)
        if held is None:
            raise JournalError(
                f"journal entry of migration {migration_id} is held by a "
                "running engine"
            )
        return held

    def try_hold(self, migration_id: str) -> Hold | None:
        """Lock the entry of ``migration_id``; None while a live engine
        holds it."""
        path = self._file(migration_id, LOCK_SUFFIX)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot open {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise JournalError(f"cannot lock {path}: {exc}") from exc
        return Hold(fd, path)

    def forget_locked(self, migration_id: str, wait: float) -> bool:
        """Remove the entry of ``migration_id`` under its lock, waiting
        up to ``wait`` seconds for it: an entry no engine holds (answered
        after its migration) may be settled by a recovery at the same
        moment, which would write it back after it went. Whether it is
        gone."""
        until = time.monotonic() + wait
        while True:
            hold = self.try_hold(migration_id)
            if hold is not None:
                break
            if time.monotonic() >= until:
                LOG.error(
                    "Journal entry of migration %s not removed: held "
                    "for more than %.1fs",
                    migration_id,
                    wait,
                )
                return False
            time.sleep(0.05)
        with hold:
            self.remove(migration_id)
        return True

    def read(self, migration_id: str) -> Entry | None:
        """The entry of ``migration_id``, None if there is none."""
        where = self._file(migration_id)
        try:
            with open(where, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise JournalError(f"{where}: unreadable: {exc}") from exc
        data = _last_version(raw, where)
        if data is None:
            return None
        entry = self.entry_type.from_dict(data, where)
        if entry.migration_id != migration_id:
            raise JournalError(
                f"{where}: holds migration {entry.migration_id!r}"
            )
        return entry

    def entries(self) -> list[Any]:
        """Every migration in flight, oldest update first."""
        found = []
        for name in sorted(os.listdir(self.path)):
            if name.endswith(SUFFIX):
                entry = self.read(name[: -len(SUFFIX)])
                if entry is not None:
                    found.append(entry)
        return sorted(found, key=lambda e: e.updated)


def _last_version(raw: bytes, where: str) -> Any:
    """The last whole version in a journal file's octets (an entry of
    version 2 written whole is one JSON object, read as it is); None if
    no version was ever whole (a crash during the first append)."""
    if raw.lstrip().startswith(b"{"):
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise JournalError(f"{where}: unreadable: {exc}") from exc
    if b"\n" not in raw:
        # Created, then the first append cut short (or never made): its
        # sync never returned, so no transition depended on it. Not an
        # entry, rather than one that stops every later recovery.
        return None
    # A last line without its newline was cut short by a crash.
    for line in reversed(raw.split(b"\n")[:-1]):
        crc, _, data = line.partition(b" ")
        try:
            if int(crc, 16) != zlib.crc32(data):
                continue
            return json.loads(data)
        except ValueError:
            continue
    raise JournalError(f"{where}: unreadable: no whole entry")


def _state_path(conf: cfg.ConfigOpts) -> str:
    path = conf.xen_ncm.state_path
    if not path:
        raise JournalError(
            "[xen_ncm] state_path is empty: migrations need a journal"
        )
    return path


def _runtime_path(conf: cfg.ConfigOpts) -> str:
    return conf.xen_ncm.runtime_path or RUNTIME_PATH


class Record:
    """The journal entry of one migration, kept as part of its state
    machine: :meth:`on_transition` is the state's ``journal`` hook.

    The entry is locked (:meth:`Journal.hold`) from :meth:`open` to
    :meth:`close`. ``keep_settled``: a settled migration keeps its entry
    (the destination, until the source acknowledged the outcome).

    What is durable when is the side's choice, so that the guest's pause
    waits for no sync that no side effect needs. ``lazy`` maps a phase
    to the phase whose record covers it (recovery acts the same on
    either): entered straight from that one, once that one is durable,
    its record is appended without a sync. ``background``: phases whose
    record is appended and synced without waiting; waited for (and a
    failure raised) at the next transition. Both are written by the
    record's thread, in order, before any later version.
    ``sync_behind``: phases whose record is appended before the
    transition goes on (a restarted engine of this host reads it) and
    synced by the thread (written again if that sync fails: its side
    effect may have gone); the next transition waits for that sync.
    """

    def __init__(
        self,
        journal: Journal,
        entry: Entry,
        *,
        keep_settled: bool = False,
        lazy: Mapping[Phase, Phase] | None = None,
        background: frozenset[Phase] = frozenset(),
        sync_behind: frozenset[Phase] = frozenset(),
    ) -> None:
        self.journal = journal
        self.entry = entry
        self.keep_settled = keep_settled
        self.lazy = dict(lazy or {})
        self.background = background
        self.sync_behind = sync_behind
        # The writes made in the background, in order: a thread started
        # before the first of them (a thread's start waits for it to
        # run: not in the pause), the versions queued (line, sync,
        # appended: the line is in the file already, only its sync is
        # left) and how many were asked for and done, and the last
        # failure. Even
        # an append without a sync may wait for the file system's
        # journal on a busy host, so neither is made in the pause.
        self._syncer: threading.Thread | None = None
        self._sync_cond = threading.Condition()
        self._queue: collections.deque[tuple[bytes, bool, bool]] = (
            collections.deque()
        )
        self._sync_asked = 0
        self._sync_done = 0
        self._sync_error: JournalError | None = None
        self._sync_stop = False
        self._hold: Hold | None = None
        # Nothing is written before there is something to settle.
        self.started = False
        #: The phase last written, or queued for the record's thread
        #: (durable only once awaited), None before the first write.
        self.written: Phase | None = None
        #: Whether the entry was removed (the migration is settled).
        self.forgotten = False
        # The destination forgets on the acceptor's thread (the source's
        # FINISHED) while its own thread may still record a transition:
        # once forgotten, nothing writes the entry back.
        self._lock = threading.Lock()

    def open(self) -> None:
        if self._hold is None:
            self._hold = self.journal.hold(self.entry.migration_id)

    def close(self) -> None:
        self._await_sync(raising=False)
        self._stop_syncer()
        if self._hold is not None:
            if not self.started or self.forgotten:
                # No entry to guard: the lock file goes too (unlinked
                # while held, as Journal.remove does).
                with contextlib.suppress(OSError):
                    os.unlink(self._hold.path)
            self._hold.release()
            self._hold = None

    def write(self, phase: Phase | None = None, *, sync: bool = True) -> None:
        """Write the entry now (in ``phase``); raises on failure.
        Without ``sync`` it is appended only (Journal.write)."""
        # After the versions queued before it.
        self._drain()
        with self._lock:
            if self.forgotten:
                # The other side acknowledged the outcome already.
                return
            if phase is not None:
                self.entry.phase = phase.value
            self.started = True
            self.journal.write(self.entry, sync=sync)
            self.written = Phase(self.entry.phase)
        # Ready before the pause needs it.
        self._start_syncer()

    def _start_syncer(self) -> None:
        if self._syncer is not None or not (
            self.background or self.lazy or self.sync_behind
        ):
            return
        self._syncer = threading.Thread(
            target=self._sync_loop,
            name=f"journal-{self.entry.migration_id}",
            daemon=True,
        )
        self._syncer.start()

    def _sync_loop(self) -> None:
        cond = self._sync_cond
        while True:
            with cond:
                while not self._queue:
                    if self._sync_stop:
                        return
                    cond.wait()
                line, sync, appended = self._queue[0]
            error = None
            try:
                with self._lock:
                    # Once forgotten, nothing writes the entry back.
                    if self.forgotten:
                        pass
                    elif appended:
                        self._sync_appended(line)
                    else:
                        self.journal.append(
                            self.entry.migration_id, line, sync=sync
                        )
            except JournalError as exc:
                error = exc
            except Exception as exc:
                # Counted done all the same: the pause waits for it.
                error = JournalError(
                    f"journal entry of migration "
                    f"{self.entry.migration_id} not written: {exc!r}"
                )
            finally:
                with cond:
                    self._queue.popleft()
                    if error is not None:
                        self._sync_error = error
                    self._sync_done += 1
                    cond.notify_all()

    def _sync_appended(self, line: bytes) -> None:
        """Make ``line``, appended already, durable. Its side effect
        (COMMIT) may have gone already: a failure is not left at that."""
        mid = self.entry.migration_id
        try:
            self.journal.sync(mid)
            return
        except JournalError as exc:
            LOG.error(
                "Migration %s: the %s record could not be synced (%s); "
                "written again",
                mid,
                self.entry.phase,
                exc,
            )
        # A failed writeback leaves the pages clean, not on disk: a
        # second fdatasync alone may succeed with the line lost. Written
        # again, its page is dirty again and its own sync says.
        try:
            self.journal.append(mid, line, sync=True)
        except JournalError as exc:
            LOG.error(
                "Migration %s: the %s record is not durable: %s. A crash "
                "of this host, or the page cache dropping it, may lose "
                "it: if this migration is interrupted, check on the "
                "destination whether the guest runs there before "
                "resuming or starting it here.",
                mid,
                self.entry.phase,
                exc,
            )
            raise

    def _write_later(self, phase: Phase, *, sync: bool) -> None:
        """Queue the entry's version in ``phase`` for the thread."""
        with self._lock:
            if self.forgotten:
                return
            self.entry.phase = phase.value
            self.started = True
            line = self.journal.encode(self.entry)
            self.written = phase
        if self._syncer is None:
            self._start_syncer()
        with self._sync_cond:
            self._queue.append((line, sync, False))
            self._sync_asked += 1
            self._sync_cond.notify_all()

    def _write_sync_behind(self, phase: Phase) -> None:
        """Append the entry's version in ``phase`` now (in the file
        when this returns), and have the thread sync it."""
        # After the versions queued before it.
        self._drain()
        with self._lock:
            if self.forgotten:
                return
            self.entry.phase = phase.value
            self.started = True
            line = self.journal.encode(self.entry)
            # Marked first: if the sync fails, a failed writeback may
            # let the page cache drop the line, the mark on tmpfs stays
            # (a restarted engine of this boot asks the destination).
            self.journal.mark(self.entry.migration_id, self.entry.boot_id)
            self.journal.append(self.entry.migration_id, line, sync=False)
            self.written = phase
        self._start_syncer()
        with self._sync_cond:
            self._queue.append((line, True, True))
            self._sync_asked += 1
            self._sync_cond.notify_all()

    def _stop_syncer(self) -> None:
        with self._sync_cond:
            self._sync_stop = True
            self._sync_cond.notify_all()
        thread, self._syncer = self._syncer, None
        if thread is not None:
            thread.join()

    def _drain(self) -> None:
        with self._sync_cond:
            while self._sync_done != self._sync_asked:
                self._sync_cond.wait()

    def _await_sync(
        self, *, raising: bool = True, appends: bool = True
    ) -> None:
        """Wait for the background writes asked for (without
        ``appends``, only for those that promised durability: a version
        appended unsynced, covered by an earlier one, promises nothing
        that a transition waits for); raise a failure (once), unless the
        entry is gone meanwhile."""
        if appends:
            self._drain()
        else:
            with self._sync_cond:
                while any(sync for _, sync, _ in self._queue):
                    self._sync_cond.wait()
        with self._sync_cond:
            error, self._sync_error = self._sync_error, None
        if error is None or self.forgotten:
            return
        if raising:
            raise error
        LOG.error(
            "Migration %s: journal entry in %s not durable: %s",
            self.entry.migration_id,
            self.entry.phase,
            error,
        )

    def forget(self) -> None:
        """The other side knows the outcome: the entry goes (under its
        lock once :meth:`close` released it: the answers after the
        migration run unheld, and a recovery may settle it meanwhile)."""
        with self._lock:
            try:
                if self._hold is None and self.started:
                    if not self.journal.forget_locked(
                        self.entry.migration_id, FORGET_WAIT
                    ):
                        return
                else:
                    self.journal.remove(self.entry.migration_id)
            except JournalError as exc:
                LOG.error("Journal entry not removed: %s", exc)
                return
            self.forgotten = True

    def on_transition(
        self, old: Phase, new: Phase, detail: Mapping[str, Any]
    ) -> None:
        if "running" in detail:
            self.entry.running = bool(detail["running"])
        if new in _SETTLED and not self.keep_settled:
            self._await_sync(raising=False)
            self.forget()
            return
        if not self.started and new not in _MUST_RECORD:
            # Failed before anything needed a record.
            return
        try:
            # What the previous record promised is durable first: a
            # must-record transition does not go on without it. A
            # covered version still queued is not waited for: the
            # thread writes the next ones after it, in order.
            self._await_sync(raising=new in _MUST_RECORD, appends=False)
            covered = self.lazy.get(new) is old and self.written is old
            if new in self.background or covered:
                self._write_later(new, sync=not covered)
            elif new in self.sync_behind:
                self._write_sync_behind(new)
            else:
                self.write(new)
        except JournalError as exc:
            if new in _MUST_RECORD:
                raise
            LOG.error(
                "Migration %s enters %s unrecorded: %s",
                self.entry.migration_id,
                new,
                exc,
            )
